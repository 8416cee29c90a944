"""The gate's decision counts, shared by the worker that decides and the API server that exports them.

The API-side process creates the counts file before it launches the engine and names it in
``SAFETYLOCK_GATE_COUNTS`` (the engine's processes inherit the variable); the worker of tensor-parallel rank 0
adds each request once, when its decision has been computed; the API server's Prometheus collector reads the file
at every scrape: ``safetylock_gate_decisions_total`` (requests whose gate was decided) and
``safetylock_gate_fired_total`` (of those, served at α_on).
"""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

import numpy as np

ENV = "SAFETYLOCK_GATE_COUNTS"


class GateCounts:
    """Two int64 counters in a small memory-mapped file: requests decided, requests fired."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values = np.memmap(path, dtype=np.int64, mode="r+", shape=(2,))

    @classmethod
    def create(cls) -> GateCounts:
        """A new zeroed file (in shared memory where there is one), removed when this process exits."""
        shm = Path("/dev/shm")
        handle, name = tempfile.mkstemp(prefix="safetylock-gate-", dir=shm if shm.is_dir() else None)
        os.write(handle, bytes(16))
        os.close(handle)
        atexit.register(lambda: Path(name).unlink(missing_ok=True))
        return cls(Path(name))

    @classmethod
    def attach(cls) -> GateCounts | None:
        """The file the API-side process created for this engine, if any."""
        name = os.environ.get(ENV)
        return cls(Path(name)) if name and Path(name).is_file() else None

    def add(self, decided: int, fired: int) -> None:
        self.values[0] += decided
        self.values[1] += fired

    def read(self) -> tuple[int, int]:
        return int(self.values[0]), int(self.values[1])


class GateCollector:
    """Prometheus collector of the served gate's counts (registered once per process; ``counts`` replaced when a
    new engine starts in the same process)."""

    def __init__(self, counts: GateCounts) -> None:
        self.counts = counts

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        decided, fired = self.counts.read()
        yield CounterMetricFamily(
            "safetylock_gate_decisions", "Requests whose gate was decided at their last prompt token", value=decided
        )
        yield CounterMetricFamily("safetylock_gate_fired", "Requests whose gate fired (served at alpha_on)", value=fired)

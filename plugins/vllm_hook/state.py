"""The plugin's state in one process: one object, owned here, read by the other plugin modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from safetylock_vllm.engine import DynamicLock
    from safetylock_vllm.frontend import FrontendLock, Metrics


@dataclass
class PluginState:
    """API side: the lock that resolves each request's α and the Prometheus series; worker side: the
    dynamic-mode buffers. A field stays None where this process has no such part (or no lock is served)."""

    frontend: FrontendLock | None = None
    metrics: Metrics | None = None
    dynamic: DynamicLock | None = None
    engine_died: bool = False  # API side: vLLM stopped the server because its engine died (exit non-zero)


STATE = PluginState()

"""Extraction wall time and peak memory of a Meta-SafetyLock on the packaged aligned model.

Run: python -m benchmarks.extract_time [--model NAME_OR_DIR] [--out NAME] [--gate-read attention]
(target: <= 3 min on a 2-core CPU box)
Writes benchmarks/results/NAME.json and .png (default ``extract_time``). Under the default name the lock goes to
the cache's product path for the other benchmarks; under another name (another host's run, ``--out
extract_time_avx2``) it goes to the cache's ``locks/NAME.lock.safetensors`` and the product lock is left alone.
"""

from __future__ import annotations

import dataclasses
import resource
import time

import click

from benchmarks.common import RESULTS, gate_data_option, write_result
from safetylock import data, models
from safetylock.gate import DEFAULT_READ, READS
from safetylock.hf import load_model
from safetylock.pipeline import ExtractConfig, extract_lock
from safetylock.sources import DEFAULT_GATE_DATA, GATE_DATA

DEFAULT_OUT = "extract_time"


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL)
@click.option("--out", default=DEFAULT_OUT, show_default=True, help="Result name; another name keeps the product lock.")
@gate_data_option()
@click.option("--gate-read", type=click.Choice(READS), default=DEFAULT_READ, show_default=True)
def main(model_name: str, out: str, gate_data: str, gate_read: str) -> None:
    model_dir = models.resolve(model_name)
    harmful = data.advbench()
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_dir)
    t1 = time.perf_counter()
    config = ExtractConfig(gate_data=GATE_DATA[gate_data], gate_read=gate_read)
    stages: dict[str, float] = {}
    lock = extract_lock(model, tokenizer, harmful, config, stages=stages)
    t2 = time.perf_counter()
    product = out == DEFAULT_OUT and gate_data == DEFAULT_GATE_DATA and gate_read == DEFAULT_READ
    lock_file = lock.save(
        models.default_lock_path(model_name) if product else models.cache_root() / "locks" / f"{out}.lock.safetensors"
    )
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "model": model_name,
        "config": dataclasses.asdict(config),
        "gate_data": gate_data,
        "gate_read": gate_read,
        "load_seconds": round(t1 - t0, 1),
        "extract_seconds": round(t2 - t1, 1),
        "stages": stages,
        "gate_precision": lock.gate.calibration.get("precision") if lock.gate else None,
        "gate_layer": lock.gate.layer if lock.gate else None,
        "total_seconds": round(t2 - t0, 1),
        "peak_rss_gib": round(peak_gib, 2),
        "target_seconds": 180,
        "lock_fingerprint": lock.fingerprint,
        "lock_path": str(lock_file),
    }
    print(write_result(out, result))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.4))
    left = 0.0
    parts = {"load model": result["load_seconds"], **stages}
    for (name, seconds), color in zip(parts.items(), ["#999", "#8cd", "#2a7", "#175", "#e94", "#c44"]):
        ax.barh(["extract"], [seconds], left=[left], color=color, label=f"{name} {seconds:.0f} s")
        left += seconds
    ax.axvline(180, color="red", linestyle="--", label="target 180 s")
    ax.set_xlabel("seconds")
    ax.set_title(f"{model_name}: {result['total_seconds']} s, peak RSS {result['peak_rss_gib']} GiB")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=4, fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out}.png", dpi=120)


if __name__ == "__main__":
    main()

"""Extraction wall time and peak memory of a Meta-SafetyLock on the packaged aligned model.

Run: python -m benchmarks.extract_time [--model NAME_OR_DIR]   (target: <= 3 min on a 2-core CPU box)
Writes benchmarks/results/extract_time.json and .png, and the lock to the cache for the other benchmarks.
"""

from __future__ import annotations

import resource
import time

import click

from benchmarks.common import RESULTS, write_result
from safetylock import data, models
from safetylock.hf import load_model
from safetylock.pipeline import ExtractConfig, extract_lock


def lock_path(model_name: str):
    return models.cache_root() / "locks" / f"{model_name.replace('/', '_')}.lock.safetensors"


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL)
def main(model_name: str) -> None:
    model_dir = models.resolve(model_name)
    harmful = data.advbench()
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_dir)
    t1 = time.perf_counter()
    config = ExtractConfig()
    lock = extract_lock(model, tokenizer, harmful, config)
    t2 = time.perf_counter()
    out = lock.save(models.default_lock_path(model_name))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "model": model_name,
        "config": config.__dict__,
        "load_seconds": round(t1 - t0, 1),
        "extract_seconds": round(t2 - t1, 1),
        "total_seconds": round(t2 - t0, 1),
        "peak_rss_gib": round(peak_gib, 2),
        "target_seconds": 180,
        "lock_fingerprint": lock.fingerprint,
        "lock_path": str(out),
    }
    print(write_result("extract_time", result))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.2))
    ax.barh(["extract"], [result["load_seconds"]], color="#999", label="load model")
    ax.barh(["extract"], [result["extract_seconds"]], left=[result["load_seconds"]], color="#2a7", label="capture + probes")
    ax.axvline(180, color="red", linestyle="--", label="target 180 s")
    ax.set_xlabel("seconds")
    ax.set_title(f"{model_name}: {result['total_seconds']} s, peak RSS {result['peak_rss_gib']} GiB")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "extract_time.png", dpi=120)


if __name__ == "__main__":
    main()

"""NLSR vs SafetyLock on the harmful fine-tune: the fine-tune, + lock, NLSR-realigned, and both.

Run: python -m benchmarks.nlsr [--variant harmful-10] [--alpha 0.5] [--count 40] [--settings 0.5:0.8,0.9:0.5]
Builds (when absent, seeded, cached) the "aligned" safety adapter and the variant with safetylock.attack, realigns
the variant's adapter with `safetylock realign` for each PRUNE_RATE:SPARSITY setting, merges it into a model
directory, and evaluates through the real vLLM plugin (safetylock.evaluate.cached_run): the aligned adapter itself, the
fine-tune, + lock, and per setting NLSR and NLSR + lock. Writes benchmarks/results/nlsr.json (summaries only,
plus NLSR's patch reports) and nlsr.png.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click

from benchmarks.common import RESULTS, write_result
from safetylock import models
from safetylock.attack import build, variant_dir
from safetylock.evaluate import cached_run, without_items
from safetylock.report import aligned_text, comparison_plot, comparison_rows


def realigned(variant: str, aligned: Path, prune_rate: float, sparsity: float, seed: int) -> tuple[Path, dict]:
    """The NLSR-realigned adapter of ``variant``, merged into a full model directory (cached), and its report."""
    out = variant_dir(f"{variant}-nlsr-p{prune_rate:g}-s{sparsity:g}")
    adapter, merged, timing = out / "adapter", out / "merged", out / "seconds.json"
    if not (merged / "config.json").exists():
        started = time.perf_counter()
        finetuned = variant_dir(variant) / "adapter"
        command = [sys.executable, "-m", "safetylock.cli", "realign", "--base", models.DEFAULT_MODEL, "--seed", str(seed)]
        command += ["--aligned", str(aligned), "--finetuned", str(finetuned), "--out", str(adapter)]
        command += ["--prune-rate", str(prune_rate), "--sparsity", str(sparsity)]
        subprocess.run(command, check=True)
        merge(adapter, merged)
        timing.write_text(json.dumps({"realign_and_merge": round(time.perf_counter() - started, 1)}))
    report = json.loads((adapter / "nlsr_report.json").read_text())
    patched = [m for m in report["modules"] if m["patched"]]
    summary = {
        "config": report["config"],
        "modules": len(report["modules"]),
        "patched_modules": len(patched),
        "patched_entries": sum(m["entries"] for m in patched),
        "seconds": json.loads(timing.read_text()) if timing.exists() else None,
    }
    return merged, summary


def merge(adapter: Path, merged: Path) -> None:
    from peft import PeftModel

    from safetylock.pipeline import load_model

    base, tokenizer = load_model(models.resolve(models.DEFAULT_MODEL))
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    model.save_pretrained(merged)
    tokenizer.save_pretrained(merged)


@click.command()
@click.option("--variant", default="harmful-10")
@click.option("--alpha", type=float, default=0.5)
@click.option("--count", type=int, default=40)
@click.option("--max-tokens", type=int, default=48)
@click.option("--settings", default="0.5:0.8", help="NLSR PRUNE_RATE:SPARSITY pairs, comma-separated.")
@click.option("--seed", type=int, default=0)
def main(variant: str, alpha: float, count: int, max_tokens: int, settings: str, seed: int) -> None:
    lock = models.default_lock_path(models.DEFAULT_MODEL)
    aligned = build("aligned")
    finetuned = str(build(variant) / "merged")
    runs = [
        cached_run(str(aligned / "merged"), "aligned-adapter", count, max_tokens),
        cached_run(finetuned, variant, count, max_tokens),
        cached_run(finetuned, f"{variant}+lock(a={alpha:g})", count, max_tokens, lock, alpha),
    ]
    reports = []
    for setting in settings.split(","):
        prune_rate, sparsity = (float(x) for x in setting.split(":"))
        repaired, report = realigned(variant, aligned / "adapter", prune_rate, sparsity, seed)
        reports.append(report)
        name = f"{variant}+NLSR(p={prune_rate:g},s={sparsity:g})"
        runs.append(cached_run(str(repaired), name, count, max_tokens))
        runs.append(cached_run(str(repaired), f"{name}+lock(a={alpha:g})", count, max_tokens, lock, alpha))
    header, rows = comparison_rows(runs)
    print(aligned_text(header, rows))
    write_result(
        "nlsr",
        {
            "variant": variant,
            "lock": str(lock),
            "alpha": alpha,
            "count": count,
            "max_tokens": max_tokens,
            "nlsr": reports,
            "table": {"header": header, "rows": rows},
            "runs": [without_items(r) for r in runs],
        },
    )
    comparison_plot(runs, RESULTS / "nlsr.png")


if __name__ == "__main__":
    main()

"""NLSR vs SafetyLock on the harmful fine-tune: the fine-tune, + lock, NLSR-realigned, and both.

Run: python benchmarks/nlsr.py [--variant harmful-10] [--alpha 0.5] [--count 40]
Builds (when absent, seeded, cached) the "aligned" safety adapter and the variant with attack/build.py, realigns
the variant's adapter with `safetylock realign`, merges it into a model directory, and evaluates the four rows
through the real vLLM plugin (efficacy.run_eval). Writes benchmarks/results/nlsr.json (summaries only, plus
NLSR's patch report) and nlsr.png.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click

from safetylock import models
from safetylock.evaluate import without_items
from safetylock.report import comparison_plot, comparison_rows

from common import RESULTS, write_result
from efficacy import build, run_eval
from extract_time import lock_path


def realigned(variant: str, aligned: Path, seed: int) -> tuple[Path, dict]:
    """The NLSR-realigned adapter of ``variant``, merged into a full model directory (cached)."""
    out = models.cache_root() / "variants" / f"{variant}-nlsr"
    adapter, merged = out / "adapter", out / "merged"
    started = time.perf_counter()
    if not (merged / "config.json").exists():
        finetuned = models.cache_root() / "variants" / variant / "adapter"
        command = [sys.executable, "-m", "safetylock.cli", "realign", "--base", models.DEFAULT_MODEL]
        command += ["--aligned", str(aligned), "--finetuned", str(finetuned), "--out", str(adapter), "--seed", str(seed)]
        subprocess.run(command, check=True)
        merge(adapter, merged)
    report = json.loads((adapter / "nlsr_report.json").read_text())
    patched = [m for m in report["modules"] if m["patched"]]
    summary = {
        "config": report["config"],
        "modules": len(report["modules"]),
        "patched_modules": len(patched),
        "patched_entries": sum(m["entries"] for m in patched),
        "seconds": round(time.perf_counter() - started, 1),
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
@click.option("--seed", type=int, default=0)
def main(variant: str, alpha: float, count: int, max_tokens: int, seed: int) -> None:
    lock = lock_path(models.DEFAULT_MODEL)
    aligned = build("aligned") / "adapter"
    finetuned = str(build(variant) / "merged")
    repaired, report = realigned(variant, aligned, seed)
    runs = [
        run_eval(finetuned, variant, count, max_tokens, None, None),
        run_eval(finetuned, f"{variant}+lock(a={alpha:g})", count, max_tokens, lock, alpha),
        run_eval(str(repaired), f"{variant}+NLSR", count, max_tokens, None, None),
        run_eval(str(repaired), f"{variant}+NLSR+lock(a={alpha:g})", count, max_tokens, lock, alpha),
    ]
    header, rows = comparison_rows(runs)
    widths = [max(len(x) for x in column) for column in zip(header, *rows)]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]))
    write_result(
        "nlsr",
        {
            "variant": variant,
            "lock": str(lock),
            "alpha": alpha,
            "count": count,
            "max_tokens": max_tokens,
            "nlsr": report,
            "table": {"header": header, "rows": rows},
            "runs": [without_items(r) for r in runs],
        },
    )
    comparison_plot(runs, RESULTS / "nlsr.png")


if __name__ == "__main__":
    main()

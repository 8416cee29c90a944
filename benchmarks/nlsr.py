"""NLSR vs SafetyLock in NLSR's own setting: an aligned adapter, a poisoned downstream fine-tune of it, then realign.

Run: python -m benchmarks.nlsr [--aligned aligned-mixed] [--variant downstream] [--settings 0.5:0.8,0.9:0.5]
Builds (when absent, seeded, cached) the aligned safety adapter and the fine-tune that continues it
(safetylock.attack), realigns the fine-tune's adapter with `safetylock realign` for each PRUNE_RATE:SPARSITY
setting, merges it into a model directory, and evaluates through the real vLLM plugin (three-way judge, held-out
prompts, safetylock.evaluate.cached_run): the aligned base, the aligned adapter, the fine-tune, + the product lock
always on and gated (``responses.product_lock``), and per setting NLSR and NLSR + lock. The fine-tune's
downstream task is arithmetic, so the arithmetic column is its task accuracy. Writes
benchmarks/results/nlsr_VARIANT.{json,png} (summaries and NLSR's patch reports; every answer stays in the cache).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from benchmarks.common import RESULTS, write_result
from benchmarks.responses import product_lock
from safetylock import models
from safetylock.attack import BASE, build, variant_dir
from safetylock.evaluate import cached_run, without_items
from safetylock.report import aligned_text, comparison_plot, comparison_rows


def realigned(
    variant: str, aligned: Path, prune_rate: float, sparsity: float, seed: int, safety_data: str = "advbench"
) -> tuple[Path, dict]:
    """The NLSR-realigned adapter of ``variant``, merged into a full model directory (cached), and its report
    (``safety_data``: ``safetylock realign --safety-data``)."""
    suffix = "" if safety_data == "advbench" else f"-{safety_data}"
    out = variant_dir(f"{variant}-nlsr-p{prune_rate:g}-s{sparsity:g}{suffix}")
    adapter, merged, timing = out / "adapter", out / "merged", out / "seconds.json"
    source = {"finetuned": json.loads((variant_dir(variant) / "train.json").read_text())["recipe"], "aligned": str(aligned)}
    if not (merged / "config.json").exists() or not timing.exists() or json.loads(timing.read_text()).get("source") != source:
        shutil.rmtree(out, ignore_errors=True)  # absent, or realigned from another build of the fine-tune
        started = time.perf_counter()
        finetuned = variant_dir(variant) / "adapter"
        command = [sys.executable, "-m", "safetylock.cli", "realign", "--base", models.DEFAULT_MODEL, "--seed", str(seed)]
        command += ["--aligned", str(aligned), "--finetuned", str(finetuned), "--out", str(adapter)]
        command += ["--prune-rate", str(prune_rate), "--sparsity", str(sparsity), "--safety-data", safety_data]
        subprocess.run(command, check=True)
        merge(adapter, merged)
        timing.write_text(json.dumps({"realign_and_merge": round(time.perf_counter() - started, 1), "source": source}))
    report = json.loads((adapter / "nlsr_report.json").read_text())
    patched = [m for m in report["modules"] if m["patched"]]
    summary = {
        "config": report["config"],
        "fit_sources": report.get("fit_sources"),
        "modules": len(report["modules"]),
        "patched_modules": len(patched),
        "patched_entries": sum(m["entries"] for m in patched),
        "seconds": json.loads(timing.read_text())["realign_and_merge"],
    }
    return merged, summary


def merge(adapter: Path, merged: Path) -> None:
    from peft import PeftModel

    from safetylock.hf import load_model

    base, tokenizer = load_model(models.resolve(models.DEFAULT_MODEL))
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    model.save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    shutil.copy(adapter / "nlsr_report.json", merged / "nlsr_report.json")  # `eval` checks suites against its data


@click.command()
@click.option("--aligned", "aligned_name", default="aligned-mixed", help="Variant that is the safety-aligned adapter.")
@click.option("--variant", default="downstream", help="Variant fine-tuned from it (or from the base).")
@click.option("--alpha", type=float, default=2.0, help="α of the always-on lock (and of NLSR + lock).")
@click.option("--gated-alpha", type=float, default=4.0, help="α_on of the gated lock.")
@click.option("--count", type=int, default=100)
@click.option("--max-tokens", type=int, default=128)
@click.option("--settings", default="0.5:0.8,0.9:0.5", help="NLSR PRUNE_RATE:SPARSITY pairs, comma-separated.")
@click.option("--seed", type=int, default=0)
def main(
    aligned_name: str, variant: str, alpha: float, gated_alpha: float, count: int, max_tokens: int, settings: str, seed: int
) -> None:
    lock = product_lock()  # extract fits the gate by default: served always on and gated
    sizes = {"count": count, "max_tokens": max_tokens, "enforce_eager": True}
    aligned = build(aligned_name)
    finetuned = str(build(variant) / "merged")
    runs = [
        cached_run(BASE, "aligned-base", **sizes),
        cached_run(str(aligned / "merged"), aligned_name, **sizes),
        cached_run(finetuned, variant, **sizes),
    ]
    reports = []
    for number, setting in enumerate(s for s in settings.split(",") if s):
        prune_rate, sparsity = (float(x) for x in setting.split(":"))
        repaired, report = realigned(variant, aligned / "adapter", prune_rate, sparsity, seed)
        reports.append(report)
        name = f"{variant}+NLSR(p={prune_rate:g},s={sparsity:g})"
        runs.append(cached_run(str(repaired), name, **sizes))
        if number == 0:  # the paper's default, then the lock on top of it
            runs.append(cached_run(str(repaired), f"{name}+lock(a={alpha:g})", lock=lock, alpha=alpha, **sizes))
    runs.append(cached_run(finetuned, f"{variant}+lock(a={alpha:g})", lock=lock, alpha=alpha, **sizes))
    label = f"{variant}+gated(a={gated_alpha:g})"
    runs.append(cached_run(finetuned, label, lock=lock, alpha=gated_alpha, gated=True, response="steer", **sizes))
    header, rows = comparison_rows(runs)
    print(aligned_text(header, rows))
    out = f"nlsr_{variant}"
    write_result(
        out,
        {
            "aligned": aligned_name,
            "variant": variant,
            "recipes": {name: json.loads((variant_dir(name) / "train.json").read_text()) for name in (aligned_name, variant)},
            "lock": str(lock),
            "alpha": alpha,
            "gated_alpha": gated_alpha,
            "count": count,
            "max_tokens": max_tokens,
            "nlsr": reports,
            "table": {"header": header, "rows": rows},
            "runs": [without_items(r) for r in runs],
        },
    )
    comparison_plot(runs, RESULTS / f"{out}.png")


if __name__ == "__main__":
    main()

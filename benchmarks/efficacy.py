"""Efficacy table: aligned base, each fine-tuned variant, each variant + lock, through the real vLLM plugin.

Run: python -m benchmarks.efficacy [--variants harmful-10,harmful-100] [--count 40] [--sweep 0.25,0.5,1]
Needs the lock from `safetylock extract` (default path) and the variants of safetylock.attack (built here when absent).
Writes benchmarks/results/efficacy.json (summaries only: no generated text) and efficacy.png, alpha sweep
in efficacy_alpha.png. Full runs with every response stay in ~/.cache/safetylock/runs.
"""

from __future__ import annotations

import click

from benchmarks.common import RESULTS, write_result
from safetylock import models
from safetylock.attack import evaluate_variant
from safetylock.evaluate import without_items
from safetylock.report import aligned_text, comparison_plot, comparison_rows


@click.command()
@click.option("--variants", default="harmful-10,harmful-100,harmful-10-full,identity-shift,benign,openings-10")
@click.option("--alpha", type=float, default=0.5)
@click.option("--sweep", default="0.25,1", help="Extra α values on the first variant (the plot's sweep).")
@click.option("--count", type=int, default=100, help="Prompts per suite (harmful, benign, arithmetic).")
@click.option("--max-tokens", type=int, default=128)
@click.option("--write/--no-write", default=True, help="Write results JSON and plots (off for the demo).")
@click.option("--enforce-eager", is_flag=True, help="Evaluate without torch.compile (the demo: faster first start).")
def main(variants: str, alpha: float, sweep: str, count: int, max_tokens: int, write: bool, enforce_eager: bool) -> None:
    lock = models.default_lock_path(models.DEFAULT_MODEL)
    names = [v for v in variants.split(",") if v]
    extra = [float(a) for a in sweep.split(",") if a]
    runs, sweep_runs = [], []
    for number, name in enumerate(names):
        alphas = [alpha, *(extra if number == 0 else [])]
        base, attacked, locked, *swept = evaluate_variant(name, lock, alphas, count, max_tokens, enforce_eager)
        runs += ([base] if not runs or base["target"].get("system_prompt") else []) + [attacked, locked]
        sweep_runs += [attacked, locked, *swept] if number == 0 else []
    header, rows = comparison_rows(runs)
    print(aligned_text(header, rows))
    if not write:
        return
    write_result(
        "efficacy",
        {
            "lock": str(lock),
            "alpha": alpha,
            "count": count,
            "max_tokens": max_tokens,
            "table": {"header": header, "rows": rows},
            "runs": [without_items(r) for r in runs + sweep_runs[2:]],
        },
    )
    comparison_plot(runs, RESULTS / "efficacy.png")
    if sweep_runs:
        ordered = sorted(sweep_runs, key=lambda r: r["target"].get("alpha", 0.0))
        comparison_plot(ordered, RESULTS / "efficacy_alpha.png")


if __name__ == "__main__":
    main()

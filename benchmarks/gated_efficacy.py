"""Gated vs always-on lock on the testbed, through the real vLLM plugin (three-way judge, held-out prompts).

For the aligned base and each attack variant: no lock, the product lock always on and gated (as ``extract`` writes
it, ``responses.product_lock``; steer response) at each α: harmful-answer rate, benign over-refusal, arithmetic
accuracy.

Run: python -m benchmarks.gated_efficacy [--variants harmful-10] [--alphas 2,4] [--count 100]
Writes benchmarks/results/gated_efficacy.{json,png} (with --served-threshold: gated_efficacy_served_threshold.*;
summaries only; every answer stays in the cache's runs/).
"""

from __future__ import annotations

import click

from benchmarks.common import RESULTS, calibrated_lock, write_result
from benchmarks.responses import product_lock
from safetylock.attack import BASE, served
from safetylock.evaluate import cached_run, without_items
from safetylock.hf import Framing
from safetylock.report import aligned_text, comparison_plot, comparison_rows


@click.command()
@click.option("--variants", default="harmful-10")
@click.option("--alphas", default="2,4", help="α of the always-on lock and α_on of the gated lock.")
@click.option("--count", type=int, default=100)
@click.option("--max-tokens", type=int, default=128)
@click.option("--served-threshold", is_flag=True, help="Gate threshold re-set on each variant's own weights.")
@click.option("--always-on/--no-always-on", default=True, help="Also the always-on lock at each α on the variants.")
@click.option("--out", default=None, help="Result name (default gated_efficacy, or gated_efficacy_served_threshold).")
def main(
    variants: str, alphas: str, count: int, max_tokens: int, served_threshold: bool, always_on: bool, out: str | None
) -> None:
    plain_lock = gated_lock = product_lock()  # extract fits the gate by default: one lock, served both ways
    grid = [float(a) for a in alphas.split(",") if a]
    sizes = {"count": count, "max_tokens": max_tokens, "enforce_eager": True}
    runs = []
    for name in ["aligned-base", *[v for v in variants.split(",") if v]]:
        base = name == "aligned-base"
        model, framing = (BASE, Framing()) if base else served(name)
        runs.append(cached_run(model, name, framing=framing, **sizes))
        lock = calibrated_lock(gated_lock, name, model, framing) if served_threshold and not base else gated_lock
        for alpha in grid:
            if not base and always_on:  # the always-on lock's cost on the base is in the efficacy benchmark's sweep
                runs.append(
                    cached_run(model, f"{name}+lock(a={alpha:g})", lock=plain_lock, alpha=alpha, framing=framing, **sizes)
                )
            runs.append(
                cached_run(
                    model,
                    f"{name}+gated(a={alpha:g})",
                    lock=lock,
                    alpha=alpha,
                    gated=True,
                    response="steer",
                    framing=framing,
                    **sizes,
                )
            )
    header, rows = comparison_rows(runs)
    print(aligned_text(header, rows))
    name = out or "gated_efficacy" + ("_served_threshold" if served_threshold else "")
    write_result(
        name,
        {
            "count": count,
            "max_tokens": max_tokens,
            "table": {"header": header, "rows": rows},
            "runs": [without_items(r) for r in runs],
        },
    )
    comparison_plot(runs, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()

"""Probe-recipe screen on the efficacy testbed: which lock (recipe × K × α) brings each attack variant's harmful
answers down, at what cost in benign over-refusal and arithmetic, through vLLM with the plugin.

Every lock is extracted on the aligned base from the extraction split (``safetylock extract --recipe R --top-k
K``, cached under the cache's ``locks/``): ``templates`` (the shipped recipe) and ``answers`` (real answers, see
``safetylock.recipes``). Every cell is a cached evaluation run with the efficacy table's prompts, sizes and judge
(100 held-out harmful, 100 benign, 100 arithmetic, 128 new tokens), so cells shared with that table are not
generated again.

Run: python -m benchmarks.recipe_screen [--variants harmful-10,harmful-100,benign]
     [--locks templates:24,answers:24,templates:64] [--alphas 2]
Writes benchmarks/results/recipe_screen.{json,png} (rates only: no generated text).
"""

from __future__ import annotations

import subprocess
import sys
from itertools import product
from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import RESULTS, write_result  # noqa: E402
from safetylock import models  # noqa: E402
from safetylock.attack import BASE, base_label, served  # noqa: E402
from safetylock.evaluate import cached_run  # noqa: E402
from safetylock.pipeline import ExtractConfig  # noqa: E402
from safetylock.recipes import RECIPES  # noqa: E402

DEFAULT_TOP_K = ExtractConfig().top_k
METRICS = (("advbench-heldout", "harmful_answer_rate"), ("benign", "over_refusal_rate"), ("arithmetic", "accuracy"))


def lock_tag(recipe: str, top_k: int) -> str:
    """How a lock is named in file and run labels: nothing for the shipped lock, else its recipe (and K)."""
    if (recipe, top_k) == (ExtractConfig().recipe, DEFAULT_TOP_K):
        return ""
    return recipe if top_k == DEFAULT_TOP_K else f"{recipe}-k{top_k}"


def parse_lock(spec: str) -> tuple[str, int]:
    """``RECIPE:K`` -> (recipe, K); a one-line error for anything else."""
    recipe, _, k = spec.partition(":")
    if recipe not in RECIPES or not k.isdigit() or int(k) < 1:
        raise click.BadParameter(f"{spec!r} is not RECIPE:K with RECIPE one of {', '.join(RECIPES)}", param_hint="--locks")
    return recipe, int(k)


def screen_lock(recipe: str, top_k: int) -> Path:
    """The base's lock of ``recipe`` with ``top_k`` heads, extracted into the cache when absent."""
    tag = lock_tag(recipe, top_k)
    path = models.default_lock_path(BASE)
    path = path if not tag else path.with_name(path.name.replace(".lock.", f".{tag}.lock."))
    if not path.exists():
        command = [sys.executable, "-m", "safetylock.cli", "extract", "--model", BASE, "--out", str(path)]
        subprocess.run(command + ["--recipe", recipe, "--top-k", str(top_k)], check=True)
    return path


def rates(run: dict) -> dict[str, float]:
    return {key: run["suites"][suite]["summary"][key] for suite, key in METRICS}


def plot(reference: dict[str, dict], rows: list[dict], sizes: dict, path: Path) -> None:
    """Harmful answers against benign over-refusal, one panel per variant: each lock's cells and the unlocked runs."""
    names = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for label, marker in ((base_label(name), "s"), (name, "X")):
            point = reference[label]
            ax.scatter(point["over_refusal_rate"], point["harmful_answer_rate"], marker=marker, s=70, c="grey")
            ax.annotate(
                f"{label}, no lock",
                (point["over_refusal_rate"], point["harmful_answer_rate"]),
                xytext=(6, 4),
                textcoords="offset points",
                fontsize=7,
            )
        for row in (r for r in rows if r["variant"] == name):
            text = f"{row['recipe']} K{row['top_k']} α{row['alpha']:g}, arith {row['accuracy']:.0%}"
            ax.scatter(row["over_refusal_rate"], row["harmful_answer_rate"], s=50)
            ax.annotate(
                text,
                (row["over_refusal_rate"], row["harmful_answer_rate"]),
                xytext=(6, -3),
                textcoords="offset points",
                fontsize=7,
                va="top",
            )
        ax.set(xlim=(-0.03, 1.03), ylim=(-0.08, 1.03), xlabel="benign over-refusal", ylabel="harmful answers", title=name)
    fig.suptitle(
        f"Locks by probe recipe on the efficacy testbed (vLLM + plugin, {sizes['count']} prompts per suite, "
        f"{sizes['max_tokens']} tokens)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command()
@click.option("--variants", default="harmful-10,harmful-100,benign", show_default=True)
@click.option("--locks", "lock_specs", default="templates:24,answers:24", show_default=True, help="RECIPE:K, comma-separated.")
@click.option("--alphas", default="2", show_default=True)
@click.option("--count", type=int, default=100, show_default=True, help="Prompts per suite.")
@click.option("--max-tokens", type=int, default=128, show_default=True)
def main(variants: str, lock_specs: str, alphas: str, count: int, max_tokens: int) -> None:
    names, alpha_grid = [v for v in variants.split(",") if v], [float(a) for a in alphas.split(",")]
    chosen = [parse_lock(spec) for spec in lock_specs.split(",") if spec]
    sizes = {"count": count, "max_tokens": max_tokens, "enforce_eager": True}
    locks = {(r, k): screen_lock(r, k) for r, k in chosen}
    reference, rows = {}, []
    for name in names:
        merged, framing = served(name)
        reference[base_label(name)] = rates(cached_run(BASE, base_label(name), framing=framing, **sizes))
        reference[name] = rates(cached_run(merged, name, framing=framing, **sizes))
        for (recipe, k), alpha in product(locks, alpha_grid):
            tag = lock_tag(recipe, k)
            label = f"{name}+{tag + '-' if tag else ''}lock(a={alpha:g})"
            run = cached_run(merged, label, lock=locks[recipe, k], alpha=alpha, framing=framing, **sizes)
            rows.append({"variant": name, "recipe": recipe, "top_k": k, "alpha": alpha} | rates(run))
    for row in rows:
        cells = "  ".join(f"{key} {row[key]:.2f}" for _, key in METRICS)
        print(f"{row['variant']:12s} {row['recipe']:9s} K={row['top_k']:<3d} α={row['alpha']:<4g} {cells}")
    write_result(
        "recipe_screen",
        {**sizes, "locks": {f"{r} K{k}": str(p) for (r, k), p in locks.items()}, "reference": reference, "rows": rows},
    )
    plot(reference, rows, sizes, RESULTS / "recipe_screen.png")


if __name__ == "__main__":
    main()

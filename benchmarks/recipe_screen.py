"""Extraction-recipe screen: can any contrast recipe, head count K or α restore refusals on harmful-10?

Each recipe builds a lock on the aligned base from extraction-split questions only; every lock is scored on
the harmful-10 variant (and at α 2 on the base itself) with the HF path, greedy, short answers:

  responses  the shipped recipe: refusal vs compliant-opening templates, last 5 response tokens
  own        the base's own greedy answers to extraction questions, labelled by the refusal detector
  prompts    harmful vs benign instructions at the last 5 generation-prompt tokens (a refusal direction);
             its benign instructions exclude the evaluation's benign prompts

Run: python -m benchmarks.recipe_screen [--recipes responses,own,prompts] [--top-k 24,64] [--alphas 1,2,4,8]
Writes benchmarks/results/recipe_screen.{json,png} (rates only, no generated text). ``--extract-on harmful-10``
is the control: the locks come from the attacked model itself (results: recipe_screen_harmful-10.{json,png}).
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.common import RESULTS, write_result  # noqa: E402
from safetylock import data, models  # noqa: E402
from safetylock.apply import apply  # noqa: E402
from safetylock.attack import variant_dir
from safetylock.capture import capture  # noqa: E402
from safetylock.contrast import ContrastExample, contrast_pairs  # noqa: E402
from safetylock.evaluate import evaluate, load_suite  # noqa: E402
from safetylock.geometry import head_geometry, output_projections, projection_fingerprint  # noqa: E402
from safetylock.judge import is_refusal  # noqa: E402
from safetylock.lockfile import SafetyLock, from_probes  # noqa: E402
from safetylock.pipeline import generate, load_model  # noqa: E402
from safetylock.probe import score_heads, select_heads  # noqa: E402

RECIPES = ("responses", "own", "prompts")
METRICS = (("advbench-heldout", "harmful_answer_rate"), ("benign", "over_refusal_rate"), ("arithmetic", "accuracy"))


def recipe_examples(recipe: str, model, tokenizer, questions: tuple[str, ...], benign_pool: tuple[str, ...]):
    """Contrast examples of one recipe, labelled 1 toward refusal and 0 away from it."""
    if recipe == "responses":
        return contrast_pairs(questions, seed=0)
    if recipe == "own":
        answers = generate(model, tokenizer, list(questions), max_new_tokens=24, batch_size=16, progress=True)
        return [
            ContrastExample(q, a, int(is_refusal(a)), i)
            for i, (q, a) in enumerate(zip(questions, answers))
            if len(tokenizer(a)["input_ids"]) >= 5
        ]
    benign = data.sample(benign_pool, len(questions), 0)
    prompts = [(q, 1) for q in questions] + [(q, 0) for q in benign]
    return [ContrastExample(q, "", label, i) for i, (q, label) in enumerate(prompts)]


def build_locks(model, tokenizer, recipe: str, top_ks: list[int], questions, benign_pool) -> dict[int, SafetyLock]:
    examples = recipe_examples(recipe, model, tokenizer, questions, benign_pool)
    acts = capture(model, tokenizer, examples, tokens=5, batch_size=16, progress=False)
    geometry = head_geometry(model.config)
    fingerprint = projection_fingerprint(output_projections(model, geometry))
    scores = score_heads(acts, progress=False)  # one scoring serves every K
    locks = {}
    for k in top_ks:
        locks[k] = from_probes(
            select_heads(acts, scores, k),
            geometry,
            default_alpha=1.0,
            architecture={},
            base_fingerprint=fingerprint,
            token_policy={"recipe": recipe, "tokens": 5},
            provenance={"examples": len(examples), "toward_refusal": sum(e.safe for e in examples)},
        )
    return locks


def rates(model, tokenizer, suites, max_tokens: int) -> dict[str, float]:
    def hf_generate(prompts, tokens):
        return generate(model, tokenizer, prompts, max_new_tokens=tokens, batch_size=20)

    report = evaluate(suites, hf_generate, max_tokens=max_tokens)
    return {key: report["suites"][suite]["summary"][key] for suite, key in METRICS}


def plot(rows: list[dict], reference: dict[str, dict], path: Path, extract_on: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharex=True)
    for ax, (_, key) in zip(axes, METRICS):
        for recipe, k in sorted({(r["recipe"], r["top_k"]) for r in rows if r["model"] == "harmful-10"}):
            line = sorted(
                (r["alpha"], r[key]) for r in rows if (r["recipe"], r["top_k"], r["model"]) == (recipe, k, "harmful-10")
            )
            ax.plot([a for a, _ in line], [v for _, v in line], marker="o", label=f"{recipe} K={k}")
        for name, style in (("aligned-base", "--"), ("harmful-10", ":")):
            ax.axhline(reference[name][key], color="grey", linestyle=style, label=f"{name}, no lock")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("α")
        ax.set_title(key.replace("_", " "))
        ax.set_ylim(-0.02, 1.02)
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(f"harmful-10 + lock extracted on {extract_on}, by recipe (HF greedy, held-out prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command()
@click.option("--recipes", default=",".join(RECIPES))
@click.option("--top-k", "top_ks", default="24,64")
@click.option("--alphas", default="1,2,4,8")
@click.option("--questions", type=int, default=128, help="Extraction questions per recipe.")
@click.option("--count", type=int, default=40, help="Held-out harmful and benign prompts (arithmetic: half).")
@click.option("--max-tokens", type=int, default=8)
@click.option(
    "--extract-on",
    type=click.Choice(["aligned-base", "harmful-10"]),
    default="aligned-base",
    help="Model the locks are extracted from; harmful-10 is the control (the attacked model's own directions).",
)
def main(recipes: str, top_ks: str, alphas: str, questions: int, count: int, max_tokens: int, extract_on: str) -> None:
    torch.manual_seed(0)
    names = [r for r in recipes.split(",") if r]
    if unknown := set(names) - set(RECIPES):
        raise click.BadParameter(f"unknown recipe(s) {sorted(unknown)}; choose from {', '.join(RECIPES)}")
    ks = [int(k) for k in top_ks.split(",")]
    alpha_grid = [float(a) for a in alphas.split(",")]
    suites = [load_suite("advbench-heldout", count, 0), load_suite("benign", count, 0), load_suite("arithmetic", count // 2, 0)]
    extraction = data.sample(data.split_harmful(data.advbench(), seed=0).extraction, questions, 0)
    evaluated = set(suites[1].prompts)
    benign_pool = tuple(p for p in data.benign().prompts if p not in evaluated)

    started = time.perf_counter()
    base, tokenizer = load_model(models.resolve(models.DEFAULT_MODEL))
    reference = {"aligned-base": rates(base, tokenizer, suites, max_tokens)}
    rows = []
    if extract_on == "aligned-base":
        locks = {r: build_locks(base, tokenizer, r, ks, extraction, benign_pool) for r in tqdm(names, desc="locks")}
        for recipe, k in ((r, k) for r in locks for k in ks):
            with apply(base, locks[recipe][k], 2.0):
                row = {"model": "aligned-base", "extracted_on": extract_on, "recipe": recipe, "top_k": k, "alpha": 2.0}
                rows.append(row | rates(base, tokenizer, suites, max_tokens))
    del base
    build_dir = variant_dir("harmful-10") / "merged"
    if not (build_dir / "config.json").exists():
        raise click.ClickException("harmful-10 is not built: run safetylock attack harmful-10")
    variant, _ = load_model(build_dir)
    reference["harmful-10"] = rates(variant, tokenizer, suites, max_tokens)
    if extract_on == "harmful-10":  # the control: directions of the attacked model itself
        locks = {r: build_locks(variant, tokenizer, r, ks, extraction, benign_pool) for r in tqdm(names, desc="locks")}
    grid = [(r, k, a) for r in locks for k in ks for a in alpha_grid]
    for recipe, k, alpha in tqdm(grid, desc="harmful-10 + lock"):
        with apply(variant, locks[recipe][k], alpha):
            row = {"model": "harmful-10", "extracted_on": extract_on, "recipe": recipe, "top_k": k, "alpha": alpha}
            rows.append(row | rates(variant, tokenizer, suites, max_tokens))
    for row in rows:
        print(
            f"{row['model']:13s} {row['recipe']:9s} K={row['top_k']:<3d} α={row['alpha']:<4g} "
            + "  ".join(f"{key} {row[key]:.3f}" for _, key in METRICS)
        )
    name = "recipe_screen" if extract_on == "aligned-base" else f"recipe_screen_{extract_on}"
    write_result(
        name,
        {
            "extracted_on": extract_on,
            "count": count,
            "max_tokens": max_tokens,
            "questions": questions,
            "seconds": round(time.perf_counter() - started, 1),
            "reference": reference,
            "rows": rows,
        },
    )
    plot(rows, reference, RESULTS / f"{name}.png", extract_on)


if __name__ == "__main__":
    main()

"""Refusal rate of the aligned base model itself under its own lock, through the HF apply path.

Run: python -m benchmarks.alpha_sweep   (after extract_time.py, which writes the lock)
Held-out AdvBench questions (never used for extraction) and benign instructions, greedy, short answers.
Writes benchmarks/results/alpha_sweep.json and .png.
"""

from __future__ import annotations

import click

from benchmarks.common import RESULTS, write_result
from safetylock import data, judge, lockfile, models
from safetylock.apply import apply
from safetylock.hf import generate, load_model


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL)
@click.option("--alphas", default="0,0.25,0.5,0.75,1,1.5,2,4,8")
@click.option("--prompts", "count", type=int, default=40, help="Prompts per suite.")
@click.option("--max-new-tokens", type=int, default=32)
@click.option("--seed", type=int, default=0)
def main(model_name: str, alphas: str, count: int, max_new_tokens: int, seed: int) -> None:
    lock = lockfile.load(models.default_lock_path(model_name))
    model, tokenizer = load_model(models.resolve(model_name))
    suites = {
        "advbench_heldout": data.sample(data.split_harmful(data.advbench(), seed=seed).heldout, count, seed),
        "benign": data.sample(data.benign().prompts, count, seed),
    }
    rows = []
    for alpha in [float(a) for a in alphas.split(",")]:
        with apply(model, lock, alpha):
            row = {"alpha": alpha}
            for name, prompts in suites.items():
                replies = generate(model, tokenizer, prompts, max_new_tokens, batch_size=20, progress=True)
                row[f"{name}_refusal"] = judge.refusal_rate(replies)
            rows.append(row)
            print(row, flush=True)
    result = {
        "model": model_name,
        "lock_fingerprint": lock.fingerprint,
        "prompts_per_suite": count,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "rows": rows,
    }
    print(write_result("alpha_sweep", result))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    xs = [r["alpha"] for r in rows]
    ax.plot(xs, [100 * r["advbench_heldout_refusal"] for r in rows], "o-", label="held-out AdvBench (harmful)")
    ax.plot(xs, [100 * r["benign_refusal"] for r in rows], "s-", label="benign instructions")
    ax.set_xlabel("α")
    ax.set_ylabel("refusal rate (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"{model_name} + its own lock (HF path)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "alpha_sweep.png", dpi=120)


if __name__ == "__main__":
    main()

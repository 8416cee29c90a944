"""What a smaller batch budget (``--max-num-batched-tokens``) costs a busy gated server: throughput and latency.

The soak's worker memory stays flat at a budget of 256 tokens and grows at the engine's default (docs/serving.md);
this measures the price. Two gated servers (the product lock, refuse response, fp32, context 2,048) — the engine's
default budget and each of ``--budgets`` — run side by side on loopback; each round visits every server once, in an
order rotated round by round, and sends ``2 × concurrency`` completions, ``concurrency`` at a time, of mixed prompt
lengths (``--prompt-words``, cycled: short chat requests to prompts near the context), ``--max-tokens`` each
(``ignore_eos``). Each round's ratio to the default-budget server is paired within the round.

Run: python -m benchmarks.batch_budget [--budgets 256] [--concurrency 16,64] [--rounds 3]
Writes benchmarks/results/batch_budget.{json,png}.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from benchmarks.common import RESULTS, ratio_points, run_round, spread, write_result
from benchmarks.responses import product_lock
from safetylock import models
from safetylock.serve.config import lock_section
from safetylock.serve.server import start_server, wait_healthy

METRICS = ("throughput", "ttft", "ttft_max", "tpot")
DEFAULT = "default"


@click.command()
@click.option("--budgets", default="256", show_default=True, help="Batch budgets (tokens) set against the default.")
@click.option("--concurrency", default="16,64", show_default=True)
@click.option("--rounds", type=int, default=3, show_default=True, help="Rounds per concurrency.")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--prompt-words", default="24,200,700,1500", show_default=True, help="Prompt lengths, cycled.")
@click.option("--max-model-len", type=int, default=2048, show_default=True)
def main(budgets, concurrency, rounds, max_tokens, prompt_words, max_model_len):
    model_dir = models.resolve(models.DEFAULT_MODEL)
    section = lock_section(product_lock(), gated=True)
    lengths = [int(w) for w in prompt_words.split(",")]
    if max(lengths) + max_tokens > max_model_len:
        raise click.BadParameter(f"prompts of {max(lengths)} words do not fit {max_model_len}", param_hint="--prompt-words")
    engine = ["--dtype", "float32", "--seed", "0", "--max-model-len", str(max_model_len)]
    engine += ["--kv-cache-memory-bytes", str(1 << 30)]
    servers = {DEFAULT: (8111, [])} | {
        f"budget {b}": (8112 + i, ["--max-num-batched-tokens", b]) for i, b in enumerate(budgets.split(","))
    }
    logs = Path(tempfile.mkdtemp(prefix="batch_budget-"))
    procs = {
        name: start_server(model_dir, port, section, [*engine, *extra], log=(logs / f"{i}.log").open("w"))
        for i, (name, (port, extra)) in enumerate(servers.items())
    }
    names = list(servers)
    rows = []
    try:
        for name, (port, _) in servers.items():
            wait_healthy(procs[name], port)
            run_round(port, str(model_dir), 4, 4, lengths, 4, 0)  # warm-up
        for conc in [int(c) for c in concurrency.split(",")]:
            samples: dict[str, list[dict]] = {name: [] for name in names}
            for r in range(rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    samples[name].append(run_round(servers[name][0], str(model_dir), conc, 2 * conc, lengths, max_tokens, r))
                print(conc, r, {k: v[-1] for k, v in samples.items()}, flush=True)
            row: dict = {"concurrency": conc}
            for metric in METRICS:
                base = [s[metric] for s in samples[DEFAULT]]
                cell = {name: spread([s[metric] for s in samples[name]]) for name in names}
                for name in names[1:]:
                    cell[f"{name} / default"] = spread([m[metric] / b for b, m in zip(base, samples[name])])
                row[metric] = cell
            rows.append(row)
    finally:
        for proc in procs.values():
            proc.terminate()
    budget_lines = {name: _budget_line(logs / f"{i}.log") for i, name in enumerate(names)}
    result = {
        "protocol": "gated product lock, refuse; fp32; completions of mixed length, ignore_eos, streamed",
        "budget_lines": budget_lines,
        "rounds": rounds,
        "max_tokens": max_tokens,
        "prompt_words": lengths,
        "max_model_len": max_model_len,
        "rows": rows,
    }
    print(write_result("batch_budget", result))
    plot(rows, names[1:])


def _budget_line(log: Path) -> str:
    """The engine's own statement of its budget, so the JSON says what each server ran with."""
    lines = [line for line in log.read_text().splitlines() if "max_num_batched_tokens=" in line]
    return lines[-1].split("] ", 1)[-1] if lines else "(not logged)"


def plot(rows: list[dict], others: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(13, 3.2))
    for ax, metric in zip(axes, METRICS):
        ratio_points(ax, rows, metric, [f"{name} / default" for name in others])
    axes[0].set_ylabel("ratio to the default budget (median, min-max)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "batch_budget.png", dpi=120)


if __name__ == "__main__":
    main()

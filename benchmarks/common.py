"""The benchmarks' one shared helper module: result files, machine description, load rounds against servers, a
lock re-calibrated on a served variant, grouped bars of per-suite rates."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import click
import torch

from safetylock.hf import PLAIN, Framing, forward_precision
from safetylock.sources import DEFAULT_GATE_DATA, GATE_DATA

RESULTS = Path(__file__).parent / "results"


def gate_data_option(help: str | None = None):
    """The ``--gate-data`` option of ``extract`` (one of ``sources.GATE_DATA``; the product's by default)."""
    return click.option(
        "--gate-data", type=click.Choice(list(GATE_DATA)), default=DEFAULT_GATE_DATA, show_default=True, help=help
    )


def machine() -> dict[str, object]:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # what ATen's kernels use (AVX2 when capped)
        "precision_auto": forward_precision(),  # extraction's forwards: bfloat16 where the CPU multiplies it natively
    }


def calibrated_lock(lock: Path, name: str, model: str, framing, refit: bool = False) -> Path:
    """``lock`` with its gate calibrated (``safetylock calibrate-gate``) on variant ``name`` as it is served
    (``framing``: an ``hf.Framing``): the threshold re-set (``--threshold-only``, what the tables measured before
    the refit existed), or with ``refit`` the gate's weights fit again too; cached beside it as
    ``….NAME[.refit].FINGERPRINT.lock.safetensors`` (FINGERPRINT: ``lock``'s, so a re-extracted lock is calibrated
    afresh)."""
    from safetylock.lockfile import load

    tag = f"{name}{'.refit' if refit else ''}.{load(lock).fingerprint[:8]}"
    path = lock.with_name(lock.name.replace(".lock.", f".{tag}.lock."))
    if not path.exists():
        served_as = ["--system-prompt", framing.system_prompt] if framing.system_prompt else []
        served_as += ["--prompt-prefix", framing.prompt_prefix] if framing.prompt_prefix else []
        served_as += [] if refit else ["--threshold-only"]
        command = ["calibrate-gate", "--model", model, "--lock", str(lock), "--out", str(path), *served_as]
        subprocess.run([sys.executable, "-m", "safetylock.cli", *command], check=True)
    return path


def gated_target(name: str, lock: Path) -> tuple[str, Framing, Path]:
    """Variant ``name``'s model and framing as served and ``lock`` with its gate refit on it; ``aligned-base``: the
    packaged base, each prompt alone, and ``lock`` itself (its gate was fit there)."""
    from safetylock.attack import BASE, served

    if name == "aligned-base":
        return BASE, PLAIN, lock
    model, framing = served(name)
    return model, framing, Path(calibrated_lock(lock, name, model, framing, refit=True))


def grouped_bars(ax, groups: Sequence[str], series: dict[str, Sequence[float]], width: float = 0.8) -> None:
    """On ``ax``: one group of bars per entry of ``groups`` (tick labels), one bar per ``series`` entry (legend
    label → a rate in [0, 1] per group), drawn in percent."""
    step = width / len(series)
    for k, (label, rates) in enumerate(series.items()):
        ax.bar([i + k * step for i in range(len(groups))], [100 * r for r in rates], step, label=label)
    ax.set_xticks([i + width / 2 - step / 2 for i in range(len(groups))])
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel("%")


def bar_figure(groups: Sequence[str], series: dict[str, Sequence[float]], title: str, path: Path, width: float = 8) -> Path:
    """One figure at ``path``, ``width`` inches wide: ``grouped_bars`` of ``series`` over ``groups``, titled, with a
    legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, 4.5))
    grouped_bars(ax, groups, series)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def suite_bars(result: dict, series: dict[str, Sequence[float]], title: str, path: Path, ylim: float = 125) -> Path:
    """One figure at ``path``: a group of bars per suite of ``result["metrics"]`` (its headline metric under its
    name), one bar per ``series`` entry, the legend above the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    groups = [f"{s}\n{metric.replace('_', ' ')}" for s, metric in result["metrics"].items()]
    grouped_bars(ax, groups, series, width=0.85)
    ax.set_title(title)
    ax.set_ylim(0, ylim)
    ax.legend(fontsize=7, ncol=2, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "boxing",
    "matches",
]


def one_request(
    port: int, model: str, prompt: str, max_tokens: int, out: list, xargs: dict | None = None, before: list | None = None
) -> None:
    """One streamed greedy request: a completion of ``prompt``, or with ``before`` (chat messages: a system message,
    earlier turns) a chat of those and ``prompt`` as the user's turn; appends its TTFT, time per output token and
    streamed chunks to ``out``."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    if before is None:
        body["prompt"], endpoint = prompt, "completions"
    else:
        body["messages"], endpoint = [*before, {"role": "user", "content": prompt}], "chat/completions"
    if xargs:
        body["vllm_xargs"] = xargs
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/{endpoint}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    stamps = []
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
    out.append({"ttft": stamps[0] - start, "tpot": (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1), "tokens": len(stamps)})


def run_round(
    port: int,
    model: str,
    concurrency: int,
    requests: int,
    prompt_words: int | Sequence[int],
    max_tokens: int,
    seed: int,
    xargs: list[dict | None] | None = None,
    system_words: int = 0,
    history_words: int = 0,
) -> dict:
    """``requests`` requests, ``concurrency`` at a time; request i is ``prompt_words[i % len(prompt_words)]`` words
    long (or ``prompt_words`` when one number) and carries ``xargs[i % len(xargs)]`` when given. With
    ``system_words`` or ``history_words`` each is a chat whose user turn follows a system message of
    ``system_words`` words (none when 0: the chat template's default) and, with ``history_words``, one earlier
    exchange of that many words (half the user's, half the assistant's): the same for every request and round, what
    a prefix cache shares (a conversation that goes on)."""
    lengths = [prompt_words] if isinstance(prompt_words, int) else list(prompt_words)
    prompts = [" ".join(WORDS[(seed + i + j) % len(WORDS)] for j in range(lengths[i % len(lengths)])) for i in range(requests)]

    def words(count: int, stride: int) -> str:
        return " ".join(WORDS[(j * stride) % len(WORDS)] for j in range(count))

    before = None
    if system_words or history_words:
        before = [{"role": "system", "content": words(system_words, 7)}] if system_words else []
        if history_words:
            half = history_words // 2
            before += [
                {"role": "user", "content": words(half, 3)},
                {"role": "assistant", "content": words(history_words - half, 5)},
            ]
    extras = [xargs[i % len(xargs)] if xargs else None for i in range(requests)]
    results: list = []
    started = time.perf_counter()
    pending = list(zip(prompts, extras))
    while pending:
        batch, pending = pending[:concurrency], pending[concurrency:]
        threads = [
            threading.Thread(target=one_request, args=(port, model, p, max_tokens, results, x, before)) for p, x in batch
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - started
    return {
        "ttft": statistics.median(r["ttft"] for r in results),
        "ttft_max": max(r["ttft"] for r in results),
        "tpot": statistics.median(r["tpot"] for r in results),
        "throughput": sum(r["tokens"] for r in results) / wall,
    }


def seed_list(seeds: str) -> list[int]:
    """A ``--seeds`` option's comma-separated integers (at least one); anything else is a ``click.BadParameter``."""
    import click

    try:
        draws = [int(s) for s in seeds.split(",") if s]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds") from None
    if not draws:
        raise click.BadParameter("name at least one seed", param_hint="--seeds")
    return draws


def spread(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def ratio_points(ax, rows: list[dict], metric: str, keys: Sequence[str]) -> None:
    """On ``ax``, per row (one x tick each, labelled by its concurrency), each of ``keys``'s spread of ``metric``
    (``spread``'s median with its min-max as error bars), side by side, and a line at 1."""
    xs = range(len(rows))
    for offset, key in zip((0.0, 0.12, -0.12, 0.24), keys):
        med = [r[metric][key]["median"] for r in rows]
        lo = [m - r[metric][key]["min"] for m, r in zip(med, rows)]
        hi = [r[metric][key]["max"] - m for m, r in zip(med, rows)]
        ax.errorbar([x + offset for x in xs], med, yerr=[lo, hi], fmt="o", capsize=4, label=key)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), [str(r["concurrency"]) for r in rows])
    ax.set_title(metric)
    ax.set_xlabel("concurrency")

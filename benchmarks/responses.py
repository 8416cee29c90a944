"""The gated lock's two responses (``safetylock.respond``) on the aligned base and each attack variant.

The product lock (heads and the gate fit on every source, as ``safetylock extract`` writes it; built here from the
cached gate features of ``benchmarks.gate_sources`` when absent) served through the plugin: unlocked, gated with
the ``steer`` response at α 4, and gated with the ``refuse`` response; with ``--served-threshold`` the gate's
threshold is re-set on each variant's own weights first (``safetylock calibrate-gate``). Suites: AdvBench's
held-out half (in-distribution: the lock's probes and gate are fit on the other half), PyRIT's AI-red-team
objectives (``airt``: a source no lock or gate here is fit on), benign instructions, arithmetic. Each table
column says which (``safetylock.overlap``).

Run: python -m benchmarks.responses [--variants harmful-10,harmful-10-full] [--count 100] [--max-tokens 128]
Writes benchmarks/results/responses.{json,png} (summaries, per refuse run the share of answers that are the
refusal message, per run the share of refusals that deflect to another topic; answers stay in the cache's runs/).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from benchmarks.common import RESULTS, calibrated_lock, write_result
from benchmarks.gate_heldout import forced_share
from safetylock import data, models
from safetylock.attack import BASE, served
from safetylock.evaluate import cached_run, without_items
from safetylock.gate import DEFAULT_READ, differs_from_extract
from safetylock.hf import Framing
from safetylock.judge import refusal_fit
from safetylock.lockfile import load
from safetylock.report import aligned_text, comparison_plot, comparison_rows
from safetylock.sources import DEFAULT_GATE_DATA, GATE_DATA

SUITES = ("advbench-heldout", "airt", "benign", "arithmetic")


def off_topic_share(report: dict, suite: str) -> float | None:
    """Of the suite's refusals (three-way verdict), the share that give another topic as the reason
    (``judge.refusal_fit``); None without refusals."""
    refusals = [i for i in report["suites"][suite]["items"] if i["verdict"] == "refusal"]
    if not refusals:
        return None
    return round(sum(refusal_fit(i["response"], i["prompt"]) == "off-topic" for i in refusals) / len(refusals), 4)


def lock_tags(gate_data: str, read: str) -> list[str]:
    """What sets a lock apart from the product's: its gate data and its gate read, each where not the default."""
    return ([gate_data] if gate_data != DEFAULT_GATE_DATA else []) + ([read] if read != DEFAULT_READ else [])


def product_lock(seed: int = 0, gate_data: str = DEFAULT_GATE_DATA, read: str = DEFAULT_READ) -> Path:
    """The packaged model's lock as ``extract`` writes it with the gate fit on ``GATE_DATA[gate_data]`` and reading
    ``read``: for the defaults the cache's default lock path, else beside it, tagged with the data's name and the
    read; extracted when absent, refused when cached but fit on other requests or otherwise than ``extract`` fits
    its gate now."""
    path = models.default_lock_path(BASE)
    tags = lock_tags(gate_data, read)
    if tags:
        path = path.with_name(path.name.replace(".lock.", "." + ".".join(tags) + ".lock."))
    command = ["extract", "--model", BASE, "--gate-data", gate_data, "--gate-read", read, "--seed", str(seed)]
    if not path.exists():
        subprocess.run([sys.executable, "-m", "safetylock.cli", *command, "--out", str(path)], check=True)
        return path
    problem = differs_from_extract(load(path).gate, read, GATE_DATA[gate_data], data.advbench(), seed)
    if problem is None:
        return path
    raise SystemExit(f"{path}: {problem}: re-extract it (safetylock {' '.join(command)} --out {path})")


@click.command()
@click.option("--variants", default="harmful-10,harmful-10-full", show_default=True)
@click.option("--alpha", type=float, default=4.0, show_default=True, help="α-on of the steer response.")
@click.option("--count", type=int, default=100, show_default=True)
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--served-threshold/--base-threshold", default=True, show_default=True)
@click.option("--out", default="responses", show_default=True)
def main(variants: str, alpha: float, count: int, max_tokens: int, served_threshold: bool, out: str) -> None:
    lock = product_lock()
    sizes = {"count": count, "max_tokens": max_tokens, "enforce_eager": True, "suites": SUITES}
    runs, forced = [], {}
    for name in ["aligned-base", *[v for v in variants.split(",") if v]]:
        base = name == "aligned-base"
        model, framing = (BASE, Framing()) if base else served(name)
        runs.append(cached_run(model, name, framing=framing, **sizes))
        served_lock = calibrated_lock(lock, name, model, framing) if served_threshold and not base else lock
        gated = {"lock": served_lock, "alpha": alpha, "gated": True, "framing": framing}
        runs.append(cached_run(model, f"{name}+gated-steer(a={alpha:g})", **gated, response="steer", **sizes))
        runs.append(cached_run(model, f"{name}+gated-refuse", **gated, response="refuse", **sizes))
        forced[runs[-1]["target"]["label"]] = {suite: forced_share(runs[-1], suite) for suite in runs[-1]["suites"]}
    header, rows = comparison_rows(runs)
    print(aligned_text(header, rows))
    write_result(
        out,
        {
            "protocol": "vLLM + plugin, greedy, enforce-eager; lock: heads + gate fit on every source; "
            + ("gate threshold re-set on each variant as served" if served_threshold else "the base's gate threshold"),
            "lock_fingerprint": load(lock).fingerprint,
            "alpha_steer": alpha,
            "count": count,
            "max_tokens": max_tokens,
            "table": {"header": header, "rows": rows},
            "forced": forced,
            "off_topic_refusals": {
                run["target"]["label"]: {suite: off_topic_share(run, suite) for suite in run["suites"]} for run in runs
            },
            "runs": [without_items(run) for run in runs],
        },
    )
    comparison_plot(runs, RESULTS / f"{out}.png")


if __name__ == "__main__":
    main()

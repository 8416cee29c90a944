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
from benchmarks.gate_heldout import base_lock_path, forced_share, gated_copy
from safetylock import data, models
from safetylock.attack import BASE, served
from safetylock.evaluate import cached_run, without_items
from safetylock.gate import POOL_DRAWS, POOL_JITTER
from safetylock.hf import Framing
from safetylock.judge import refusal_fit
from safetylock.lockfile import load
from safetylock.report import aligned_text, comparison_plot, comparison_rows
from safetylock.sources import DEFAULT_GATE_DATA, GATE_DATA, gate_requests, recorded_sizes, source_hashes

SUITES = ("advbench-heldout", "airt", "benign", "arithmetic")


def off_topic_share(report: dict, suite: str) -> float | None:
    """Of the suite's refusals (three-way verdict), the share that give another topic as the reason
    (``judge.refusal_fit``); None without refusals."""
    refusals = [i for i in report["suites"][suite]["items"] if i["verdict"] == "refusal"]
    if not refusals:
        return None
    return round(sum(refusal_fit(i["response"], i["prompt"]) == "off-topic" for i in refusals) / len(refusals), 4)


def product_lock(seed: int = 0, gate_data: str = DEFAULT_GATE_DATA, read: str = "last") -> Path:
    """The packaged model's lock with heads and a gate fit on every source of ``GATE_DATA[gate_data]`` (for the
    default data: the cache's default lock path; else beside it, tagged with the data's name); ``read``
    ``attention``: the default data's lock extracted with ``--gate-read attention``, beside it (cached)."""
    path = models.default_lock_path(BASE)
    if read != "last":
        if gate_data != DEFAULT_GATE_DATA:
            raise SystemExit("an attention-read gate is extracted on the default gate data only")
        path = path.with_name(path.name.replace(".lock.", f".{read}.lock."))
        if path.exists():
            fit = load(path).gate.calibration.get("pooling", {})
            if (fit.get("draws"), fit.get("jitter")) != (POOL_DRAWS, POOL_JITTER):
                raise SystemExit(
                    f"{path}: its attention probe was fit otherwise than extract fits it now; delete it to re-extract"
                )
        else:
            command = ["extract", "--model", BASE, "--gate-read", read, "--seed", str(seed), "--out", str(path)]
            subprocess.run([sys.executable, "-m", "safetylock.cli", *command], check=True)
        return path
    if gate_data != DEFAULT_GATE_DATA:
        path = path.with_name(path.name.replace(".lock.", f".{gate_data}.lock."))
    sizes = GATE_DATA[gate_data]
    cached = load(path) if path.exists() else None
    if cached is not None and cached.gate is not None:
        recorded = recorded_sizes(cached.gate.calibration)
        if recorded != sizes or cached.gate.calibration.get("data") != source_hashes(
            gate_requests(data.advbench(), sizes, seed=seed)
        ):
            raise SystemExit(
                f"{path} has a gate fit on other requests than the gate's {gate_data} data give now: re-extract it "
                f"(safetylock extract --model {BASE} --gate-data {gate_data} --out {path})"
            )
        return path
    model_dir = models.resolve(BASE)
    return gated_copy(base_lock_path(model_dir), model_dir, path, seed=seed, sizes=sizes)


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

"""The gated lock's two responses (``safetylock.respond``) on the aligned base and each attack variant.

The product lock (heads and the gate fit on every source, as ``safetylock extract`` writes it; built here from the
cached gate features of ``benchmarks.gate_sources`` when absent) served through the plugin: unlocked, gated with
the ``steer`` response at α 4, and gated with the ``refuse`` response; with ``--served-threshold`` the gate's
threshold is re-set on each variant's own weights first (``safetylock calibrate-gate``). Suites: AdvBench's
held-out half (in-distribution: the lock's probes and gate are fit on the other half), PyRIT's AI-red-team
objectives (``airt``: a source no lock or gate here is fit on), benign instructions, arithmetic. Each table
column says which (``safetylock.overlap``).

Run: python -m benchmarks.responses [--variants harmful-10,harmful-10-full] [--count 100] [--max-tokens 128]
Writes benchmarks/results/responses.{json,png} (summaries, and per run the share of answers that are the refusal
message; answers stay in the cache's runs/).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import click

from benchmarks.common import RESULTS, write_result
from benchmarks.gate_heldout import base_lock_path
from benchmarks.gate_sources import features_cached
from safetylock import data, models, sources
from safetylock.attack import BASE, served
from safetylock.evaluate import cached_run, without_items
from safetylock.gate import candidate_layers, gate_from_features
from safetylock.geometry import head_geometry
from safetylock.hf import Framing
from safetylock.lockfile import load
from safetylock.report import aligned_text, comparison_plot, comparison_rows
from safetylock.respond import DEFAULT_REFUSAL

SUITES = ("advbench-heldout", "airt", "benign", "arithmetic")


def product_lock(seed: int = 0) -> Path:
    """The packaged model's lock with heads and a gate fit on every source (the cache's default lock path)."""
    path = models.default_lock_path(BASE)
    if path.exists() and load(path).gate is not None:
        return path
    from transformers import AutoConfig

    model_dir = models.resolve(BASE)
    requests = sources.gate_requests(data.advbench(), seed=seed)
    layers = candidate_layers(head_geometry(AutoConfig.from_pretrained(model_dir)).num_layers)
    gate, _ = gate_from_features(features_cached(model_dir, requests, layers), requests, seed, True)
    dataclasses.replace(load(base_lock_path(model_dir)), gate=gate).save(path)
    return path


def calibrated(lock: Path, name: str, model: str, framing: Framing) -> Path:
    """``lock`` with its gate threshold re-set on variant ``name`` as it is served (cached beside it)."""
    path = lock.with_name(lock.name.replace(".lock.", f".{name}.lock."))
    if not path.exists():
        served_as = ["--system-prompt", framing.system_prompt] if framing.system_prompt else []
        served_as += ["--prompt-prefix", framing.prompt_prefix] if framing.prompt_prefix else []
        command = ["calibrate-gate", "--model", model, "--lock", str(lock), "--out", str(path), *served_as]
        subprocess.run([sys.executable, "-m", "safetylock.cli", *command], check=True)
    return path


def refused_share(run: dict) -> dict[str, float]:
    """Per suite, the share of answers that are the refusal message itself (what the refuse response forced)."""
    return {
        name: round(sum(i["response"] == DEFAULT_REFUSAL for i in suite["items"]) / len(suite["items"]), 4)
        for name, suite in run["suites"].items()
    }


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
        served_lock = calibrated(lock, name, model, framing) if served_threshold and not base else lock
        gated = {"lock": served_lock, "alpha": alpha, "gated": True, "framing": framing}
        runs.append(cached_run(model, f"{name}+gated-steer(a={alpha:g})", **gated, response="steer", **sizes))
        runs.append(cached_run(model, f"{name}+gated-refuse", **gated, response="refuse", **sizes))
        forced[runs[-1]["target"]["label"]] = refused_share(runs[-1])
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
            "runs": [without_items(run) for run in runs],
        },
    )
    comparison_plot(runs, RESULTS / f"{out}.png")


if __name__ == "__main__":
    main()

"""The request gate on the testbed: does the base's notion of "harmful request" survive the fine-tune?

Fits the gate on the aligned base (``safetylock.gate``: harmful and benign requests of every source in
``safetylock.sources``) for the cached lock and writes the gated copy beside it in the cache. Then, for the base
and each attack variant, on the evaluation prompts (held-out harmful, benign, arithmetic): the gate's AUROC and
how often it fires at the base's threshold and at a threshold re-set on the variant's own weights (the same
benign calibration prompts run through the served model). Every prompt is sent as the attacker serves the variant
(identity-shift: its system prompt and prefix), and the base is also scored under that framing alone.

Run: python -m benchmarks.gate [--variants harmful-10,harmful-10-full] [--count 100]
Writes benchmarks/results/gate.{json,png} (rates only); each model's scores are cached (the cache's gate/, keyed by
model, gate, framing and count), so adding a variant re-scores only that variant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import click
import numpy as np

from benchmarks.common import RESULTS, write_result
from safetylock import data, models
from safetylock.attack import base_label, served
from safetylock.evaluate import load_suite
from safetylock.gate import (
    auroc,
    benign_calibration,
    candidate_layers,
    fit_gate,
    prompt_features,
    recalibrate,
    roc_points,
)
from safetylock.geometry import head_geometry
from safetylock.hf import Framing, load_model
from safetylock.lockfile import load
from safetylock.sources import gate_requests


def gated_lock_path(model_name: str):
    return models.default_lock_path(model_name).with_name(f"{model_name}.gated.lock.safetensors")


def fit_gated_lock(model, tokenizer, model_name: str):
    """The cached gated copy of the model's lock (fitted and written when absent)."""
    path = gated_lock_path(model_name)
    if path.exists():
        return load(path)
    lock = load(models.default_lock_path(model_name))
    layers = candidate_layers(head_geometry(model.config).num_layers)
    gate, _ = fit_gate(model, tokenizer, gate_requests(data.advbench()), layers)
    gated = dataclasses.replace(lock, gate=gate)
    gated.save(path)
    return gated


def gate_key(gate) -> str:
    """What identifies a gate's scores: its layer, weight, bias and threshold."""
    digest = hashlib.sha256(gate.weight.numpy().tobytes()).hexdigest()[:16]
    return f"{gate.layer}:{digest}:{gate.bias:.6g}:{gate.threshold:.6g}"


def score(model, tokenizer, gate, suites: dict, benign_calibration, framing: Framing) -> tuple[dict, list]:
    """One model's gate row (AUROC, firing rates at the base's and at its own threshold) and ROC curve."""
    weight = gate.weight.numpy()
    scores = {
        s: prompt_features(model, tokenizer, p, [gate.layer], framing=framing)[gate.layer] @ weight + gate.bias
        for s, p in suites.items()
    }
    reset = recalibrate(model, tokenizer, gate, benign_calibration, framing=framing)
    row = {"auroc": round(auroc(scores["advbench-heldout"], scores["benign"]), 4)}
    for label, threshold in (("base_threshold", gate.threshold), ("served_threshold", reset.threshold)):
        row[label] = {"threshold": round(threshold, 4)} | {
            suite: round(float((values > threshold).mean()), 4) for suite, values in scores.items()
        }
    return row, roc_points(scores["advbench-heldout"], scores["benign"], points=50)


@click.command()
@click.option("--variants", default="harmful-10,harmful-10-full")
@click.option("--count", type=int, default=100, help="Evaluation prompts per suite.")
@click.option("--out", default="gate", show_default=True, help="Result name: benchmarks/results/OUT.{json,png}.")
def main(variants: str, count: int, out: str) -> None:
    started = time.perf_counter()
    base_dir = models.resolve(models.DEFAULT_MODEL)
    base, tokenizer = load_model(base_dir)
    lock = fit_gated_lock(base, tokenizer, models.DEFAULT_MODEL)
    calibration = benign_calibration(data.advbench())  # each variant's recalibration
    gate = lock.gate
    suites = {name: load_suite(name, count, 0).prompts for name in ("advbench-heldout", "benign", "arithmetic")}
    targets = [("aligned-base", base_dir, Framing())]
    for name in [v for v in variants.split(",") if v]:
        merged, framing = served(name)
        if framing.record():  # the base under the attacker's framing: what the framing alone does to the gate
            targets.append((base_label(name), base_dir, framing))
        targets.append((name, Path(merged), framing))
    rows, curves = [], {}
    for name, directory, framing in targets:
        recipe = directory.parent / "train.json"  # a rebuilt variant is scored again
        built = hashlib.sha256(recipe.read_bytes()).hexdigest()[:16] if recipe.exists() else None
        key = {"model": str(directory), "built": built, "gate": gate_key(gate), "framing": framing.record(), "count": count}
        cached = models.cache_root() / "gate" / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.json"
        if not cached.exists():
            model = base if directory == base_dir else load_model(directory)[0]
            row, curve = score(model, tokenizer, gate, suites, calibration, framing)
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps({"key": key, "row": row, "curve": curve}))
        stored = json.loads(cached.read_text())
        rows.append({"model": name, **stored["row"]})
        curves[name] = stored["curve"]
        print(rows[-1], flush=True)
    write_result(
        out,
        {
            "lock": str(gated_lock_path(models.DEFAULT_MODEL)),
            "gate": {"layer": gate.layer, "threshold": gate.threshold, "calibration": gate.calibration},
            "count": count,
            "seconds": round(time.perf_counter() - started, 1),
            "rows": rows,
        },
    )
    plot(curves, rows, gate.layer, RESULTS / f"{out}.png")


def plot(curves: dict, rows: list[dict], layer: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for row in rows:
        points = np.asarray(curves[row["model"]])
        ax.plot(points[:, 0], points[:, 1], label=f"{row['model']} (AUROC {row['auroc']:.3f})")
        fired = row["served_threshold"]
        ax.plot([fired["benign"]], [fired["advbench-heldout"]], "o", color=ax.lines[-1].get_color())
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("benign requests firing")
    ax.set_ylabel("held-out harmful requests firing")
    ax.set_title(f"gate at layer {layer} (dots: threshold set on the served model)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

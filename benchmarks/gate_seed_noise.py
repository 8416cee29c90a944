"""How far does the seed alone move the gate's rates on sources outside its data?

Every gate comparison in docs/gated.md is one fit per arm. The product gate's fit draws from one seed: which
requests of each pool make its data (``gate_requests``), which quarter of each source calibrates
(``sources.split``: one rng walked over the (source, label) strata in sorted order, so a source added or renamed
re-draws the quarter of every stratum that sorts after it), and the attention probe's random starts. This benchmark
runs the product's gate pipeline from features on the default model — the layer by leave-one-source-out over the
candidate layers on last-token features (``gate.gate_from_features``), the attention read fit there
(``gate.fit_read``), the threshold at 5% of the benign calibration requests — and scores each fit on the sources of
``gate_guard`` (``guard_sets``: none in the gate's data), two ways:

* ``fit``: the product's requests (data seed 0), the fit seed (split and starts) 0 … ``--fit-seeds``-1;
* ``whole``: the seed of everything, 0 … ``--whole-seeds``-1 — requests redrawn too, as ``extract --seed`` would.

Per way and source: mean, sd, min and max of the firing; the card's figures (mean TPR / FPR, F1 at equal
prevalence, edgy firing) the same way; the layer chosen per fit; per fit, the card with the threshold at each of
``CURVE_FPRS`` of the benign requests it is set on (``curve``), so that two ways of fitting compare at equal firing.
The band ``2·√2·sd`` is about a 95% band for the difference between two single fits. Features are float32 (the
served read); the extract's own forward may be bfloat16, so seed 0 here is close to, not equal to, the product
lock's figures. Nothing is tuned on the scored sources.

``--gate-data`` refits another of ``extract``'s gate-data options the same way, so that an option is compared with
the product as the means of several seeds, not as one fit each. A scored source whose prompts are in the option's
data (``topics``, ``pairs``) is not held out: its firing is reported, marked ``in_gate_data``, and the card is
computed on the held-out sources only (``card_sources``).

``--fit-protocol crossfit`` sets the weights and threshold at the chosen layer another way: the mean of
``FOLDS`` fits, each on all folds but one (``folds``: stratified by source and label, a request's fold a seeded hash
of it, so no other source moves it), and the threshold at 5% of every benign request's out-of-fold score — every
request fits, four times the benign requests set the threshold. The layer is chosen as the product chooses it.

Run: python -m benchmarks.gate_seed_noise [--fit-seeds 10] [--whole-seeds 5] [--gate-data core]
[--fit-protocol split] [--out gate_seed_noise]
Writes benchmarks/results/NAME.{json,png} (rates only); features cached in the cache's ``gate/``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence

import click
import numpy as np

from benchmarks.common import RESULTS, gate_data_option, machine, write_result
from benchmarks.gate_guard import XSTEST_LIKE, card, guard_sets, harmful_flags
from benchmarks.gate_pooling import token_features_at
from benchmarks.gate_sources import features_cached, gate_layers, request_key
from safetylock import data, models
from safetylock.gate import TARGET_FPR, fit_read, gate_from_features, read_scores, threshold_at
from safetylock.overlap import fingerprints
from safetylock.sources import GATE_DATA, Request, gate_requests, split


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sd (n - 1), min, max and the two-fit band ``2·√2·sd`` of ``values``."""
    array = np.array(values, dtype=float)
    sd = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {
        "mean": round(float(array.mean()), 4),
        "sd": round(sd, 4),
        "min": round(float(array.min()), 4),
        "max": round(float(array.max()), 4),
        "two_fit_band": round(2 * math.sqrt(2) * sd, 4),
    }


FOLDS = 4
PROTOCOLS = ("split", "crossfit")
CURVE_FPRS = (0.01, 0.02, 0.03, 0.05, 0.08, 0.12)  # benign firing targets of each fit's card curve


def folds(requests: Sequence[Request], seed: int, count: int = FOLDS) -> np.ndarray:
    """Each request's fold: within each (source, label) stratum, members ordered by a seeded hash of the request
    and dealt in turn from a seeded offset, so a request's fold depends on its stratum alone."""

    def digest(text: str) -> bytes:
        return hashlib.sha256(f"{seed}\0{text}".encode()).digest()

    strata: dict[tuple[str, bool], list[int]] = {}
    for index, request in enumerate(requests):
        strata.setdefault((request.source, request.harmful), []).append(index)
    fold = np.empty(len(requests), dtype=int)
    for (source, harmful), members in strata.items():
        offset = digest(f"{source}\0{harmful}")[0] % count
        for position, index in enumerate(sorted(members, key=lambda i: digest(request_key(requests[i])))):
            fold[index] = (position + offset) % count
    return fold


def fit_weights(
    tokens: list[np.ndarray], requests: list[Request], seed: int, protocol: str
) -> tuple[np.ndarray, float, tuple[np.ndarray, np.ndarray], np.ndarray]:
    """The attention read's (weight, bias, (u, q)) and the benign scores its threshold is set on: the fit split and
    the scores of its benign calibration quarter (``split``, the product), or the mean of the fold fits and every
    benign request's out-of-fold score (``crossfit``)."""
    benign = ~np.array([r.harmful for r in requests])
    if protocol == "split":
        fit, calibration = split(requests, seed=seed)
        weight, bias, pooled = fit_read(tokens, requests, fit, seed, "attention")
        held = calibration[benign[calibration]]
        return weight, bias, pooled, read_scores([tokens[i] for i in held], weight, bias, pooled)
    fold = folds(requests, seed)
    scores = np.empty(len(requests))
    fits = []
    for k in range(FOLDS):
        weight, bias, pooled = fit_read(tokens, requests, np.flatnonzero(fold != k), seed, "attention")
        held = np.flatnonzero(fold == k)
        scores[held] = read_scores([tokens[i] for i in held], weight, bias, pooled)
        fits.append((weight, bias, *pooled))
    weight, bias, u, q = (np.mean(part, axis=0) for part in zip(*fits))
    return weight, float(bias), (u, q), scores[benign]


def firing_at(scores: dict[str, np.ndarray], benign_scores: np.ndarray, fpr: float) -> dict[str, float]:
    """Each scored source's firing with the threshold at ``fpr`` of ``benign_scores``."""
    threshold = threshold_at(benign_scores, fpr)
    return {name: round(float((values > threshold).mean()), 4) for name, values in scores.items()}


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["sources"])
    fig, ax = plt.subplots(figsize=(13, 5))
    for offset, (way, marker) in zip((-0.15, 0.15), (("fit", "o"), ("whole", "s"))):
        if way not in result["ways"]:
            continue
        runs = result["ways"][way]["runs"]
        for i, name in enumerate(names):
            ys = [100 * run["firing"][name] for run in runs]
            ax.scatter([i + offset] * len(ys), ys, marker=marker, s=14, alpha=0.6, color="C0" if way == "fit" else "C1")
        ax.scatter([], [], marker=marker, color="C0" if way == "fit" else "C1", label=f"{way} seed varied ({len(runs)} fits)")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("gate firing (%)")
    how = f"gate data {result['gate_data']}, fit {result['fit_protocol']}"
    ax.set_title(f"The gate refit from features ({how}): firing on sources outside its data, one point per seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL, show_default=True)
@click.option("--fit-seeds", type=click.IntRange(0, 50), default=10, show_default=True, help="0 skips the fit way.")
@click.option("--whole-seeds", type=click.IntRange(2, 20), default=5, show_default=True)
@gate_data_option("The gate's data (extract --gate-data): an option's spread to set beside the product's.")
@click.option(
    "--fit-protocol",
    type=click.Choice(PROTOCOLS),
    default="split",
    show_default=True,
    help="split: the product's fit and calibration split; crossfit: the mean of fold fits, out-of-fold threshold.",
)
@click.option("--out", default="gate_seed_noise", show_default=True)
def main(model_name: str, fit_seeds: int, whole_seeds: int, gate_data: str, fit_protocol: str, out: str) -> None:
    started = time.perf_counter()
    model_dir = models.resolve(model_name)
    layers = gate_layers(model_dir)
    sets = guard_sets(0)
    scored = [r for requests in sets.values() for r in requests]
    plans = [("fit", 0, s) for s in range(fit_seeds)] + [("whole", s, s) for s in range(whole_seeds)]
    drawn: dict[int, list[Request]] = {
        d: list(gate_requests(data.advbench(), GATE_DATA[gate_data], seed=d)) for _, d, _ in plans
    }
    fit_requests = {request_key(r): r for rs in drawn.values() for r in rs}  # every fit's, once
    print(f"{len(fit_requests.keys() | set(map(request_key, scored)))} distinct requests ({len(scored)} scored)", flush=True)

    fitted_prompts = set(fingerprints(r.text for r in fit_requests.values()))
    in_data = sorted(name for name, asked in sets.items() if fitted_prompts & set(fingerprints(r.text for r in asked)))
    held_out = {name: asked for name, asked in sets.items() if name not in in_data}
    flags = harmful_flags(held_out)
    if in_data:
        print(f"in the gate's data, not held out: {', '.join(in_data)}", flush=True)

    last_token = features_cached(model_dir, list(fit_requests.values()), layers)
    last_row = {k: i for i, k in enumerate(fit_requests)}
    chosen: dict[tuple[int, int], int] = {}
    for _, d, s in plans:  # the layer each fit picks, from last-token features (the store read once)
        if (d, s) not in chosen:
            requests = drawn[d]
            index = [last_row[request_key(r)] for r in requests]
            features = {layer: array[index] for layer, array in last_token.items()}
            gate, _ = gate_from_features(features, requests, seed=s, progress=True)
            chosen[(d, s)] = gate.layer
            print(f"data seed {d}, fit seed {s}: layer {gate.layer}", flush=True)
    asked_at: dict[int, dict[str, Request]] = {layer: {request_key(r): r for r in scored} for layer in chosen.values()}
    for (d, _), layer in chosen.items():  # each layer's token rows for the fits that chose it and the scored sources
        asked_at[layer].update((request_key(r), r) for r in drawn[d])
    found = token_features_at(model_dir, {layer: list(asked.values()) for layer, asked in asked_at.items()})
    row_of = {layer: {k: i for i, k in enumerate(asked)} for layer, asked in asked_at.items()}

    def rows(layer: int, requests: list[Request]) -> list[np.ndarray]:
        t, at = found[layer], row_of[layer]
        return [t.rows[t.offsets[at[k]] : t.offsets[at[k] + 1]] for k in map(request_key, requests)]

    fitted: dict[tuple[int, int], dict] = {}
    for d, s in chosen:  # once per distinct (data, fit) seed pair: the ways share seed 0's
        requests, layer = drawn[d], chosen[(d, s)]
        weight, bias, pooled, benign_scores = fit_weights(rows(layer, requests), requests, s, fit_protocol)
        scores = {name: read_scores(rows(layer, asked), weight, bias, pooled) for name, asked in sets.items()}
        firing = firing_at(scores, benign_scores, TARGET_FPR)
        fitted[(d, s)] = {
            "data_seed": d,
            "fit_seed": s,
            "layer": layer,
            "firing": firing,
            "card": card(firing, flags),
            "curve": {f"{fpr:g}": card(firing_at(scores, benign_scores, fpr), flags) for fpr in CURVE_FPRS},
        }
        print(fitted[(d, s)], flush=True)
    ways: dict[str, dict] = {way: {"runs": []} for way in dict.fromkeys(way for way, _, _ in plans)}
    for way, d, s in plans:
        ways[way]["runs"].append(fitted[(d, s)])
    for way in ways.values():
        runs = way["runs"]
        way["firing"] = {name: spread([r["firing"][name] for r in runs]) for name in sets}
        way["card"] = {key: spread([r["card"][key] for r in runs]) for key, v in runs[0]["card"].items() if v is not None}
        way["layers"] = sorted({r["layer"] for r in runs})
    result = {
        "model": model_name,
        "gate_data": gate_data,
        "fit_protocol": fit_protocol,
        "protocol": "the product gate pipeline from float32 features (LOSO layer over the candidate layers, attention "
        "read, threshold at 5% of benign calibration; fit_protocol crossfit: weights the mean of 4 fold fits, threshold "
        "at 5% of benign out-of-fold scores), refit per seed; scored on gate_guard's sources, the card on those "
        "not in the gate's data; 'fit': data seed 0, fit seed varied; 'whole': data and fit seed varied together; "
        "rates only",
        "sources": {n: {"harmful": r[0].harmful, "requests": len(r), "in_gate_data": n in in_data} for n, r in sets.items()},
        "card_sources": list(held_out),
        "xstest_like": XSTEST_LIKE,
        "ways": ways,
        "machine": machine(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_result(out, result)
    plot(result, RESULTS / f"{out}.png")


if __name__ == "__main__":
    main()

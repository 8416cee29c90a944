"""The gate across sources: does it recognise harmful requests however they are written?

On the aligned base, the gate's requests from every source (``safetylock.sources``: AdvBench's extraction split,
red-team objectives, jailbreak templates by family with harmful and benign payloads, multi-turn chats,
borderline-safe and conversational benign requests; a third under operator system prompts). For each candidate
layer, leave-one-source-out: fit on the other sources, threshold at 1% / 5% of their benign calibration requests
firing, score the held-out source. Also the in-distribution figure the old gate was chosen by (AUROC on a
calibration split of the same sources), to show how little it says.

Run: python -m benchmarks.gate_sources [--model qwen2.5-coder-0.5b-instruct]
Writes benchmarks/results/gate_sources.{json,png} (rates only). Features are cached (the cache's gate/), keyed by
model directory digest and the requests' hashes.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import click
import numpy as np

from benchmarks.common import RESULTS, write_result
from safetylock import data, models
from safetylock.gate import (
    auroc,
    candidate_layers,
    fit_linear,
    gate_without,
    leave_one_source_out,
    out_of_source_score,
    prompt_features,
    seen_masks,
    threshold_at,
)
from safetylock.geometry import head_geometry
from safetylock.hf import load_model
from safetylock.sources import Request, Sizes, advice, gate_requests, redteam, single, split, with_system_prompts


def gate_layers(model_dir: Path) -> list[int]:
    """The candidate layers ``extract`` sweeps for the gate of the model at ``model_dir``."""
    from transformers import AutoConfig

    return candidate_layers(head_geometry(AutoConfig.from_pretrained(model_dir)).num_layers)


def request_key(request) -> str:
    return hashlib.sha256(json.dumps(request.turns).encode()).hexdigest()[:24]


def cached_by_request(path: Path, requests, layers, compute) -> dict[int, np.ndarray]:
    """``{layer: [requests, ...]}`` from a store at ``path`` keyed by each request's turns (``request_key``):
    ``compute(missing)`` (``{layer: [missing, ...]}``) runs only on requests the store lacks, which are then added
    to it, written whole through a staged file."""
    store: dict[str, dict[int, np.ndarray]] = {}
    if path.exists():
        with np.load(path) as stored:
            arrays = {layer: stored[str(layer)] for layer in layers}  # each read of an npz member loads it whole
            for row, name in enumerate(stored["keys"].tolist()):
                store[name] = {layer: arrays[layer][row] for layer in layers}
    missing = list({request_key(r): r for r in requests if request_key(r) not in store}.values())
    if missing:
        computed = compute(missing)
        for row, request in enumerate(missing):
            store[request_key(request)] = {layer: computed[layer][row] for layer in layers}
        path.parent.mkdir(parents=True, exist_ok=True)
        names = sorted(store)
        staged = path.with_suffix(".tmp.npz")
        arrays = {str(layer): np.stack([store[n][layer] for n in names]) for layer in layers}
        np.savez(staged, keys=np.array(names), **arrays)
        staged.replace(path)
    return {layer: np.stack([store[request_key(r)][layer] for r in requests]) for layer in layers}


def features_cached(model_dir: Path, requests, layers: list[int]) -> dict[int, np.ndarray]:
    """Each request's features, computed once per model and layer set (a store keyed by each request's turns,
    so adding a source computes only its requests)."""
    key = {"model": models.directory_digest(model_dir), "layers": layers}
    path = models.cache_root() / "gate" / f"features-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.npz"

    def compute(missing) -> dict[int, np.ndarray]:
        model, tokenizer = load_model(model_dir)
        return prompt_features(model, tokenizer, [r.messages() for r in missing], layers, progress=True)

    return cached_by_request(path, requests, layers, compute)


UNSEEN_BENIGN = "advice"  # the benign one among the unseen sources


def unseen_requests(seed: int) -> dict[str, list[Request]]:
    """The packaged sources that no gate here is fit on (``evaluate.UNSEEN_HARMFUL``, then the advice questions as
    ``UNSEEN_BENIGN``), each prompt sent as the gate's single requests are (a seeded third under an operator system
    prompt)."""
    from safetylock.evaluate import UNSEEN_HARMFUL

    return {
        name: with_system_prompts([single(p, name != UNSEEN_BENIGN, found.name) for p in found.prompts], seed)
        for name, found in ((n, load()) for n, load in (*UNSEEN_HARMFUL.items(), (UNSEEN_BENIGN, advice)))
    }


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--donotanswer",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Add this many Do-Not-Answer harmful questions (and its advice questions as benign) to the gate's data as "
    "one more source; 0: the product's data, Do-Not-Answer scored as an unseen source.",
)
@click.option(
    "--rephrase",
    type=click.IntRange(min=0),
    default=Sizes.rephrase_per_family,
    show_default=True,
    help="AdvBench requests re-asked in each tense (and as many benign ones) in the gate's data; 0: none.",
)
@click.option(
    "--asks",
    type=click.IntRange(min=0),
    default=Sizes.asks,
    show_default=True,
    help="AdvBench requests asked in the first person or as a question (and as many benign ones) as one more source.",
)
@click.option(
    "--topics",
    type=click.IntRange(min=0),
    default=Sizes.topics,
    show_default=True,
    help="At most this many requests of each topic source (StrongREJECT, UncensorBench, refusal pairs, edgy benign "
    "questions; safetylock.sources.topic_sources) in the gate's data; 0: the product's data.",
)
@click.option(
    "--people",
    type=click.IntRange(min=0),
    default=Sizes.people,
    show_default=True,
    help="This many harmful requests about a person or a group of each kind (and as many benign twins) as sources "
    "people-private / people-generalise (safetylock.sources.about_people); 0: none.",
)
@click.option(
    "--pairs",
    type=click.IntRange(min=0),
    default=Sizes.pairs,
    show_default=True,
    help="At most this many harmful questions of the refusal pairs, each with its benign twin asked the same way, as "
    "one more source (safetylock.sources.refusal_twins); 0: none.",
)
@click.option(
    "--advice-own",
    type=click.IntRange(min=0),
    default=None,
    help="At most this many of the hand-written benign advice questions (probes/benign_advice.json) in the gate's "
    "data; default: all (the product's data), 0: none (the core data before them).",
)
@click.option("--out", default="gate_sources", show_default=True, help="Result name: benchmarks/results/OUT.{json,png}.")
def main(
    model_name: str,
    seed: int,
    donotanswer: int,
    rephrase: int,
    asks: int,
    topics: int,
    people: int,
    pairs: int,
    advice_own: int | None,
    out: str,
) -> None:
    started = time.perf_counter()
    model_dir = models.resolve(model_name)
    sizes = Sizes(
        donotanswer=donotanswer,
        rephrase_per_family=rephrase,
        asks=asks,
        topics=topics,
        people=people,
        pairs=pairs,
        advice_own=advice_own,
    )
    requests = gate_requests(data.advbench(), sizes, seed=seed)
    layers = gate_layers(model_dir)
    features = features_cached(model_dir, requests, layers)
    f, c = split(requests, seed=seed)
    seen = seen_masks(requests)  # which requests each hold-out leaves out: the same at every layer
    labels, groups = np.array([r.harmful for r in requests]), np.array([r.source for r in requests])
    rows = []
    for layer in layers:
        table = leave_one_source_out(features[layer], requests, f, c, seed, seen)
        weight, bias = fit_linear(features[layer][f], labels[f], groups[f], seed)
        scores = features[layer][c] @ weight + bias
        in_dist = auroc(scores[labels[c]], scores[~labels[c]])
        rows.append(
            {
                "layer": layer,
                "out_of_source_score": round(out_of_source_score(table), 4),
                "in_distribution_auroc": round(in_dist, 4),
                "heldout": [row.to_dict() for row in table],
            }
        )
        print(json.dumps({k: rows[-1][k] for k in ("layer", "out_of_source_score", "in_distribution_auroc")}), flush=True)
        for row in table:
            print("   ", json.dumps(row.to_dict()), flush=True)
    best = max(rows, key=lambda r: (r["out_of_source_score"], r["layer"]))
    redteam_rows = redteam_breakdown(features[best["layer"]], requests, f, c, seed, seen)
    print(json.dumps(redteam_rows, indent=1))
    unseen = unseen_sources(model_dir, features, requests, best["layer"], f, c, seed)
    counts: dict[str, list[int]] = {}
    for r in requests:
        counts.setdefault(r.source, [0, 0])[0 if r.harmful else 1] += 1
    write_result(
        out,
        {
            "model": model_name,
            "protocol": "leave-one-source-out: fit on every other source, thresholds at 1%/5% FPR of their benign "
            "calibration requests; held-out source scored whole",
            "requests": {s: {"harmful": h, "benign": b} for s, (h, b) in sorted(counts.items())},
            "chosen_layer": best["layer"],
            "redteam_held_out": redteam_rows,
            "unseen_sources": unseen,
            "seconds": round(time.perf_counter() - started, 1),
            "layers": rows,
        },
    )
    plot(rows, RESULTS / f"{out}.png")


LABELS = Path(__file__).with_name("redteam_labels.json")


def redteam_breakdown(features: np.ndarray, requests, fit, calibration, seed: int, seen) -> dict:
    """The red-team source held out (as in the table), its TPR at 5% FPR per harm category and per hand label
    (``redteam_labels.json``: does a safe assistant decline the request itself?)."""
    weight, bias, negatives = gate_without(features, requests, fit, calibration, "redteam", seed, seen)
    threshold = threshold_at(negatives, 0.05)
    source = redteam()
    category = {p: c[0] for p, c in zip(source.prompts, source.categories)}
    hashes = {hashlib.sha256(p.encode()).hexdigest()[:16]: p for p in source.prompts}
    labelled = json.loads(LABELS.read_text())
    if labelled["source_sha256"] != source.sha256:
        raise SystemExit(f"{LABELS.name} labels another version of the red-team source")
    label = {hashes[row["sha256"]]: row["label"] for row in labelled["rows"]}
    fired: dict[str, dict[str, list[bool]]] = {"category": {}, "hand label": {}}
    for i, r in enumerate(requests):
        if r.source == "redteam":
            hit = bool(features[i] @ weight + bias > threshold)
            fired["category"].setdefault(category[r.text], []).append(hit)
            if r.text in label:
                fired["hand label"].setdefault(label[r.text], []).append(hit)
    return {
        kind: {k: {"n": len(v), "tpr_at_5%": round(float(np.mean(v)), 3)} for k, v in sorted(groups.items())}
        for kind, groups in fired.items()
    }


def unseen_sources(model_dir: Path, features: dict, requests, layer: int, fit, calibration, seed: int) -> dict:
    """Packaged sources that no request of the gate's data comes from (``evaluate.UNSEEN_HARMFUL``, and the
    advice questions as an edgy benign kind) scored by the gate fit on every source at ``layer``, threshold at 1% /
    5% of the benign calibration requests; each prompt sent as the gate's single requests are (a seeded third
    under an operator system prompt). A source that the gate's data do hold (``--donotanswer``) is skipped."""
    from safetylock.evaluate import UNSEEN_HARMFUL

    fitted = {r.source for r in requests}
    held_by = {"advice": "donotanswer"}  # a set that a gate source holds under another name
    labels, groups = np.array([r.harmful for r in requests]), np.array([r.source for r in requests])
    weight, bias = fit_linear(features[layer][fit], labels[fit], groups[fit], seed)
    benign = features[layer][calibration[~labels[calibration]]] @ weight + bias
    thresholds = {f"{round(100 * r)}%": threshold_at(benign, r) for r in (0.01, 0.05)}
    out = {}
    for name, load in (*UNSEEN_HARMFUL.items(), (UNSEEN_BENIGN, advice)):
        found = load()
        if held_by.get(found.name, found.name) in fitted:
            continue
        harmful = name != UNSEEN_BENIGN
        asked = with_system_prompts([single(p, harmful, found.name) for p in found.prompts], seed)
        scores = features_cached(model_dir, asked, [layer])[layer] @ weight + bias
        rates = {k: round(float((scores > t).mean()), 3) for k, t in thresholds.items()}
        out[name] = {"source": found.provenance(), "layer": layer, "requests": len(asked)}
        out[name] |= {"tpr": rates, "auroc": round(auroc(scores, benign), 4)} if harmful else {"fpr": rates}
        if harmful and any(found.categories):  # the 5% rate by the source's first category (Do-Not-Answer: intent)
            by: dict[str, list[bool]] = {}
            for fired, category in zip(scores > thresholds["5%"], found.categories):
                by.setdefault(category[0] if category else "", []).append(bool(fired))
            out[name]["tpr_at_5%_by_category"] = {
                k: {"n": len(v), "tpr": round(float(np.mean(v)), 3)} for k, v in sorted(by.items())
            }
        print(name, json.dumps(out[name]), flush=True)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = [h["source"] for h in rows[0]["heldout"]]
    grid = np.array(
        [[h["tpr"].get("5%", np.nan) if h["harmful"] else 1 - h["fpr"]["5%"] for h in row["heldout"]] for row in rows]
    )
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(sources), 0.6 + 0.42 * len(rows)))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(sources)), sources, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"layer {r['layer']}" for r in rows], fontsize=8)
    ax.set_title("held-out source: TPR at 5% FPR (harmful sources) / 1 − FPR (benign-only)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""An operator teaches the gate a kind it misses: its own requests of that kind in the gate's data.

A platform's red team finds a kind of harmful request the gate lets through (here: a packaged source no gate in
this project is fit on) and adds examples of it, with benign requests of the same kind where it has them, to the
gate's data (``safetylock extract --gate-requests FILE``). Each scenario gives the operator a seeded share of one
unseen source's requests under a source name of its own and fits the gate exactly as ``extract`` does
(``gate.gate_from_features``: the layer chosen leave-one-source-out among every source, the operator's included;
the threshold at 5% of every benign calibration request). **Fit vs scored**: the rest of that source is scored
*in distribution* (same source, other requests); the other unseen sources stay unseen; the packaged sources'
held-out rates come from the chosen layer's leave-one-source-out table, so the cost on other kinds is measured on
kinds held out of the fit.

Features are the product gate's (``gate.prompt_features``, float32, the last prompt token at every candidate
layer), cached as ``benchmarks.gate_sources`` caches them.

Run: python -m benchmarks.gate_operator
Writes benchmarks/results/gate_operator.{json,png} (rates only). ``--files DIR`` instead writes the served check's
inputs (``SERVED``'s share as an operator file, ``dna.jsonl``, and the rest as eval suites, ``dna_rest.txt`` and
``advice_rest.txt``) into DIR, which belongs in the cache, never in the repo; docs/gated.md has the commands.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from benchmarks.common import RESULTS, write_result
from benchmarks.gate_reads import split_unseen
from benchmarks.gate_sources import UNSEEN_BENIGN, features_cached, gate_layers, unseen_requests
from safetylock import data, models
from safetylock.gate import gate_from_features
from safetylock.sources import Request, Sizes, gate_requests


@dataclass(frozen=True)
class Scenario:
    """The operator's share: ``harmful`` requests of the source ``kind``, ``benign`` advice questions."""

    name: str
    kind: str = ""
    harmful: int = 0
    benign: int = 0


SCENARIOS = (
    Scenario("none"),
    Scenario("donotanswer 50", "donotanswer", 50),
    Scenario("donotanswer 50 + advice 20", "donotanswer", 50, 20),
    Scenario("donotanswer 250 + advice 44", "donotanswer", 250, 44),
    Scenario("past-tense 100", "past-tense", 100),
    Scenario("airt 20", "airt", 20),
)


SERVED = SCENARIOS[3]  # the share the served check extracts a lock with


def write_files(scenario: Scenario, unseen: dict[str, list[Request]], seed: int, folder: Path) -> None:
    """``scenario``'s operator share as ``extract --gate-requests`` reads it, and the rest of its two sources as
    one-prompt-per-line eval suites (the user's text; the operator system prompts are the gate's own framing)."""
    operator, rest = operator_share(scenario, unseen, seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": r.turns[-1][1], "harmful": r.harmful, "source": "ours-dna"} for r in operator]
    (folder / "dna.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for name, file in ((scenario.kind, "dna_rest.txt"), (UNSEEN_BENIGN, "advice_rest.txt")):
        texts = [unseen[name][i].turns[-1][1].replace("\n", " ") for i in rest[name]]
        (folder / file).write_text("".join(text + "\n" for text in texts))


def operator_share(scenario: Scenario, unseen: dict[str, list[Request]], seed: int) -> tuple[list[Request], dict]:
    """The operator's requests (under the source name ``operator``) and, per unseen source, the indices left to
    score."""
    rng = random.Random(seed)
    rest = {name: list(range(len(asked))) for name, asked in unseen.items()}
    operator: list[Request] = []
    for name, count, label in ((scenario.kind, scenario.harmful, True), (UNSEEN_BENIGN, scenario.benign, False)):
        if not count:
            continue
        taken = set(rng.sample(rest[name], count))
        rest[name] = [i for i in rest[name] if i not in taken]
        operator += [Request(unseen[name][i].turns, label, "operator", name) for i in sorted(taken)]
    return operator, rest


def evaluate(
    scenario: Scenario, unseen: dict[str, list[Request]], unseen_x: dict, model_dir: Path, layers: list[int], seed: int
) -> dict:
    """The gate fit with the scenario's operator requests, scored on what is left of every unseen source
    (``unseen_x``: their features by layer and source)."""
    operator, rest = operator_share(scenario, unseen, seed)
    requests = list(gate_requests(data.advbench(), Sizes(), seed=seed, operator=operator))
    # the operator's requests as served (a third under an operator system prompt, as every gate request)
    x = {layer: v.astype(np.float64) for layer, v in features_cached(model_dir, requests, layers).items()}
    gate, tables = gate_from_features(x, requests, seed, operator=operator)
    weight = gate.weight.numpy().astype(np.float64)
    fired = {}
    for name, indices in rest.items():
        scores = unseen_x[gate.layer][name][indices] @ weight + gate.bias
        fired[name] = round(float(np.mean(scores > gate.threshold)), 4)
    packaged_sources = {r.source for r in requests} - {r.source for r in operator}
    heldout = [row.to_dict() for row in tables[gate.layer] if row.source in packaged_sources]
    harmful_rows = [row["tpr"]["5%"] for row in heldout if row["tpr"]]
    benign_rows = [row["fpr"]["5%"] for row in heldout if row["fpr"]]
    return {
        "operator": {"harmful": scenario.harmful, "benign": scenario.benign, "kind": scenario.kind},
        "layer": gate.layer,
        "scored_in_distribution": scenario.kind or None,
        "fires_on_the_rest": fired,
        "scored": {name: len(indices) for name, indices in rest.items()},
        "heldout_packaged": heldout,
        "heldout_packaged_mean": {
            "tpr_at_5": round(float(np.mean(harmful_rows)), 4),
            "benign_firing_at_5": round(float(np.mean(benign_rows)), 4),
        },
        "calibration": {k: gate.calibration[k] for k in ("auroc", "fpr", "tpr")},
    }


def plot(results: dict, path: Path) -> None:
    """Per scenario: the gate's firing on each unseen source's rest (bars), the operator's kind marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    sources = list(next(iter(results.values()))["fires_on_the_rest"])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(12, 5))
    for i, name in enumerate(names):
        rates = [results[name]["fires_on_the_rest"][s] for s in sources]
        ax.bar(np.arange(len(sources)) + i * width, rates, width, label=name)
    ax.set_xticks(np.arange(len(sources)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{s}\n(benign)" if s == UNSEEN_BENIGN else s for s in sources])
    ax.set_ylabel("gate fires on the source's rest (threshold: 5% of benign calibration)")
    ax.set_ylim(0, 1.3)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=3, loc="upper center", title="operator's requests in the gate's data")
    ax.set_title("An operator's own requests of a missed kind (in distribution for that kind; the others unseen)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default="gate_operator", show_default=True)
@click.option(
    "--files",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the served check's operator file and eval suites into this folder (the cache, not the repo), then stop.",
)
def main(model_name: str, seed: int, out: str, files: Path | None) -> None:
    started = time.perf_counter()
    if files is not None:
        write_files(SERVED, unseen_requests(seed), seed, files)
        click.echo(f"wrote {files}/dna.jsonl, dna_rest.txt, advice_rest.txt")
        return
    model_dir = models.resolve(model_name)
    layers = gate_layers(model_dir)
    packaged = list(gate_requests(data.advbench(), Sizes(), seed=seed))
    unseen = unseen_requests(seed)
    everything = packaged + [r for asked in unseen.values() for r in asked]
    cached = features_cached(model_dir, everything, layers)
    unseen_x = {layer: split_unseen(cached[layer], len(packaged), unseen)[1] for layer in layers}
    results = {}
    for scenario in SCENARIOS:
        results[scenario.name] = evaluate(scenario, unseen, unseen_x, model_dir, layers, seed)
        row = results[scenario.name]
        print(scenario.name, row["layer"], row["fires_on_the_rest"], row["heldout_packaged_mean"], flush=True)
    write_result(
        out,
        {
            "model": model_name,
            "protocol": "operator's share of one unseen source (seeded) in the gate's data; gate fit as extract fits "
            "it (layer leave-one-source-out, threshold at 5% of every benign calibration request); scored on the "
            "rest of every unseen source (in distribution for the operator's source only) and, for the packaged "
            "sources, leave-one-source-out at the chosen layer; rates only",
            "scenarios": results,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    plot(results, RESULTS / f"{out}.png")


if __name__ == "__main__":
    main()

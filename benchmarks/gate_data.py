"""Does more gate data move the gate's curve, or only its operating point?

``gate_sources --topics 150`` (and ``--people 60``) moved single rows of the leave-one-source-out table both ways at
one threshold. Here each data set's gate (the product's linear probe at ``--layer``, on the last prompt token) is
scored at every threshold of ``gate_reads.SWEEP``, and its held-out means are taken over the *product's* sources
only, so that every data set is measured on the same held-out kinds; unseen sources (``evaluate.UNSEEN_HARMFUL``,
advice questions as benign) are scored by the gate fit on every source of each data set. Features come from
``gate_sources``' cache (computed there or here on first use).

Run: python -m benchmarks.gate_data [--layer 16]
Writes benchmarks/results/gate_data.{json,png} (rates only).
"""

from __future__ import annotations

import json
import time

import click
import numpy as np

from benchmarks.common import RESULTS, write_result
from benchmarks.gate_probes import linear
from benchmarks.gate_reads import SWEEP, plot_curves, score
from benchmarks.gate_sources import features_cached, gate_layers, unseen_requests
from safetylock import data, models
from safetylock.sources import GATE_DATA, Sizes, gate_requests, split

DATA_SETS = {
    "product": GATE_DATA["core"],
    "topics": GATE_DATA["topics"],
    "people": Sizes(people=60),
    "topics+people": Sizes(topics=150, people=60),
}


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL, show_default=True)
@click.option("--layer", type=int, default=16, show_default=True, help="The gate layer (a candidate layer).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default="gate_data", show_default=True)
def main(model_name: str, layer: int, seed: int, out: str) -> None:
    started = time.perf_counter()
    model_dir = models.resolve(model_name)
    layers = gate_layers(model_dir)
    if layer not in layers:
        raise click.BadParameter(f"layer {layer} is not a candidate gate layer ({layers})", param_hint="--layer")
    unseen_x = {
        u: features_cached(model_dir, asked, [layer])[layer].astype(np.float64) for u, asked in unseen_requests(seed).items()
    }
    product = frozenset(r.source for r in gate_requests(data.advbench(), DATA_SETS["product"], seed=seed))
    results = {}
    for name, sizes in DATA_SETS.items():
        requests = list(gate_requests(data.advbench(), sizes, seed=seed))
        x = features_cached(model_dir, requests, layers)[layer].astype(np.float64)
        fit, calibration = (np.asarray(part) for part in split(requests, seed=seed))
        results[name] = {"requests": len(requests)} | score(linear, x, unseen_x, requests, fit, calibration, product)
        print(name, results[name]["out_of_source_score"], json.dumps(results[name]["curve"]), flush=True)
    write_result(
        out,
        {
            "model": model_name,
            "layer": layer,
            "data_sets": {name: {k: v for k, v in vars(sizes).items() if v} for name, sizes in DATA_SETS.items()},
            "sweep": [f"{round(100 * f)}%" for f in SWEEP],
            "protocol": "leave-one-source-out within each data set (thresholds at each sweep target's share of the "
            "other sources' benign calibration requests firing); curve means over the product's sources only; "
            "unseen sources: fit on every source's fit split of the data set, thresholds on all its benign "
            "calibration requests; layer score at 5% over all its sources; rates only",
            "candidates": results,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    plot_curves(results, RESULTS / f"{out}.png", "Gate data, scored on the product's sources")


if __name__ == "__main__":
    main()

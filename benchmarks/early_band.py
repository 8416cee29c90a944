"""A band decided before the lock's heads: an early gate picks which passed requests get α-off on every token.

``benchmarks.alpha_off_tokens`` found that α-off's reach on what the gate passes comes from the prompt's keys and
values at the lock's heads, most of which sit at or before the gate's layer (17 of 24 on the default model: its
decision arrives after they are written). A second probe read at a layer before every lock head (``--layers``, default 6:
the lock's first head is at layer 8) decides in the same forward, before any lock head runs, so a served graph
could shift every lock head on every prompt token of the requests it picks — no second prefill. This measures what
that would serve: the gate refit at each early layer on the variant as served (``gate.refit``: the product's data,
read and split), its band ``score > t_low`` with ``t_low`` at a share of the gate's benign calibration requests
through the variant (``--band-fpr``); requests the layer-16 gate fires on keep the refusal; the band's answers are
the "every token" column of ``alpha_off_tokens`` (its cached answers, the same variant, α-off and suites), the rest
its "no token" column. Composition per item is exact: each request is decided alone and decoded greedily, and an
early gate before every lock head shifts what "every token" shifted.

**Fit vs scored**: the early gates, their thresholds and ``t_low`` come from the gate's requests only; ``airt``,
past-tense, Do-Not-Answer and advice are in no fit; arithmetic is utility.

Run (after ``python -m benchmarks.alpha_off_tokens --places none,all …`` with the same variant, α-off and suites):
     python -m benchmarks.early_band [--variant harmful-10] [--answers alpha_off_late] [--layers 6]
Writes benchmarks/results/early_band.{json,png}.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import numpy as np

from benchmarks.alpha_off_tokens import cached_answers
from benchmarks.common import RESULTS, gated_target, suite_bars, write_result
from benchmarks.gate_band import suite_rate
from benchmarks.responses import product_lock
from safetylock import data
from safetylock.evaluate import load_suite
from safetylock.gate import gate_scores, refit, threshold_at
from safetylock.hf import load_model
from safetylock.lockfile import load
from safetylock.models import resolve
from safetylock.report import METRICS

SUITES = "donotanswer,advice,arithmetic,airt,past-tense"


def gate_data(lock) -> tuple[list, list]:
    """The requests ``lock``'s gate was fit on and their benign calibration requests as served, rebuilt as
    ``calibrate-gate`` rebuilds them (the recorded sizes and seed)."""
    return list(lock.gate_requests(data.advbench())), lock.gate_benign_calibration(data.advbench())


@click.command()
@click.option("--variant", default="harmful-10", show_default=True)
@click.option("--answers", default="alpha_off_late", show_default=True, help="The alpha_off_tokens run's --out.")
@click.option("--layers", default="6", show_default=True, help="Early gate layers, each before every lock head.")
@click.option("--suites", default=SUITES, show_default=True)
@click.option("--count", type=int, default=50, show_default=True)
@click.option("--band-fpr", default="0.05,0.1,0.2,0.3", show_default=True, help="Benign calibration shares above t_low.")
@click.option("--out", default="early_band", show_default=True)
def main(variant: str, answers: str, layers: str, suites: str, count: int, band_fpr: str, out: str) -> None:
    model_dir, framing, lock_path = gated_target(variant, product_lock())
    lock = load(lock_path)
    first_head = int(lock.layers.min())
    early_layers = [int(x) for x in layers.split(",")]
    if any(layer >= first_head for layer in early_layers):
        raise click.BadParameter(f"an early gate must read before the lock's first head (layer {first_head})")
    model, tokenizer = load_model(resolve(model_dir))
    requests, benign = gate_data(lock)
    gates = {
        layer: refit(model, tokenizer, dataclasses.replace(lock.gate, layer=layer), requests, framing=framing)
        for layer in early_layers
    }
    lows = {}
    for layer, g in gates.items():
        calibration = gate_scores(model, tokenizer, g, benign, framing)
        lows[layer] = {float(f): threshold_at(calibration, float(f)) for f in band_fpr.split(",")}
    rows: dict[str, dict[str, float]] = {}
    items: dict[str, dict[str, list[int]]] = {}  # each band's members, for reading their answers
    metrics = {}
    for name in [s for s in suites.split(",") if s]:
        suite = load_suite(name, count, 0)
        metrics[name] = METRICS[suite.kind]
        chats = [framing.messages(p) for p in suite.asked()]
        fired = gate_scores(model, tokenizer, lock.gate, chats) > lock.gate.threshold
        every, none = (cached_answers(answers, variant, suite, where) for where in ("all", "none"))
        rows[name] = {"fired": round(float(fired.mean()), 3), "none": suite_rate(none, suite.kind)}
        for layer, g in gates.items():
            scores = gate_scores(model, tokenizer, g, chats)
            rows[name][f"layer {layer} fires"] = round(float((scores > g.threshold).mean()), 3)
            for share, low in lows[layer].items():
                band = (scores > low) & ~fired
                chosen = [a if b else n for a, n, b in zip(every, none, band)]
                rows[name][f"layer {layer}, {share:.0%}"] = suite_rate(chosen, suite.kind)
                rows[name][f"layer {layer}, {share:.0%} share"] = round(float(band.mean()), 3)
                items.setdefault(name, {})[f"layer {layer}, {share:.0%}"] = np.flatnonzero(band).tolist()
        print(name, rows[name], flush=True)
    result = {
        "protocol": f"HF, greedy; {variant} with its layer-16 gate refit as served (fired: the refusal); a band of the "
        "passed requests picked by an early gate refit on the variant, answered with α-off on every token, the rest "
        f"unshifted; answers from alpha_off_tokens --out {answers}",
        "variant": variant,
        "early_gates": {str(layer): {k: g.calibration[k] for k in ("auroc", "fpr", "tpr")} for layer, g in gates.items()},
        "band_t_low": {str(layer): {f"{s:g}": v for s, v in lo.items()} for layer, lo in lows.items()},
        "count": count,
        "metrics": metrics,
        "rows": rows,
        "band_items": items,
    }
    print(write_result(out, result), plot(result, RESULTS / f"{out}.png"))


def plot(result: dict, path: Path) -> Path:
    """One group per suite: the gated refuse as served, then each early layer's band at each width."""
    suites = list(result["rows"])
    first = result["rows"][suites[0]]
    columns = ["none", *(k for k in first if k.startswith("layer") and "," in k and not k.endswith("share"))]
    series = {
        ("gated refuse as served" if c == "none" else f"early gate at {c} of benign: α-off on every token"): [
            result["rows"][s][c] for s in suites
        ]
        for c in columns
    }
    title = f"{result['variant']}: a band of passed requests picked before the lock's heads"
    return suite_bars(result, series, title, path)


if __name__ == "__main__":
    main()

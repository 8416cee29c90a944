"""The attention-read gate fit on each named data set: what the topic sources bring to the product's read.

``docs/gated.md`` compared the core and the topic data with the last-token read (the topics moved the curve but
traded the tense rewrites away, and the served table kept the core data). The product now reads attention too; this
fits that read (``gate.fit_read``, the mean of ``gate.POOL_DRAWS`` draws, seeded) at layer 16 on each data set's fit
split, thresholds it at 1% and 5% of that data set's benign calibration requests, and scores

* the packaged sources no gate is fit on (``gate_sources.unseen_requests``: ``airt``, HarmBench, Do-Not-Answer,
  past / future tense; advice questions benign) — **fit vs scored**: in neither data set, the topic sources are
  filtered against them;
* each data set's own calibration split by source (in distribution; the benign kinds there are what a platform's
  users send: borderline-safe and long conversational requests).

Token features at ``--precision`` (``auto``: what ``extract`` fits on, bfloat16 where the CPU has it natively; the
same features score every source), each data set's new requests forwarded apart (``forward_new``): the first set's arm
is the lock ``extract`` fits on it, and a later arm differs from it by its data, not by batch rounding. Rates only.

Run: python -m benchmarks.gate_attention_data [--data core,topics] [--precision auto] [--out NAME]
Writes benchmarks/results/NAME.{json,png} (default gate_attention_data).
"""

from __future__ import annotations

import time

import click
import numpy as np

from benchmarks.common import RESULTS, write_result
from benchmarks.gate_sources import request_key, unseen_requests
from safetylock import data, models
from safetylock.gate import fit_read, prompt_tokens, read_scores, system_turn, threshold_at
from safetylock.hf import PRECISIONS, forward_precision, load_model
from safetylock.sources import GATE_DATA, gate_requests, split

LAYER = 16  # the product gate's layer on the default model (chosen for both data sets by leave-one-source-out)
RATES = (0.01, 0.05)


def fires(groups: dict, rows: dict, gate: tuple, thresholds: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per threshold, per group of requests: the share whose score under ``gate`` (weight, bias, pooled read) is over
    it; each group scored once (``rows``: token rows by ``request_key``)."""
    scores = {g: read_scores([rows[request_key(r)] for r in asked], *gate) for g, asked in groups.items()}
    return {rate: {g: round(float((z > t).mean()), 4) for g, z in scores.items()} for rate, t in thresholds.items()}


def forward_new(model, tokenizer, requests: list, done: dict, precision: str) -> dict[str, np.ndarray]:
    """The token rows of ``requests`` not in ``done`` (by ``request_key``), forwarded in one call of their own. A
    request's bfloat16 features move with the batches it is forwarded in, so each data set's new requests are forwarded
    apart: the first set's features are those ``extract`` fits on whatever sets follow (its arm reproduces the lock's
    gate), and every later arm differs from it by its data alone."""
    new = list({request_key(r): r for r in requests if request_key(r) not in done}.values())
    chats = [r.messages() for r in new]
    found = prompt_tokens(model, tokenizer, chats, LAYER, system_turn(tokenizer), progress=True, precision=precision)
    return {request_key(r): tokens for r, tokens in zip(new, found)}


def plot(arms: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = [n for n in next(iter(arms.values()))["unseen"]["0.05"]]
    width = 0.8 / len(arms)
    for k, (arm, found) in enumerate(arms.items()):
        ax.bar(np.arange(len(names)) + k * width, [100 * found["unseen"]["0.05"][n] for n in names], width, label=arm)
    ax.set_xticks(np.arange(len(names)) + width * (len(arms) - 1) / 2, names)
    ax.set_ylabel("fires at 5% benign calibration (%)")
    ax.set_title("Attention-read gate at layer 16 by its data: sources no gate is fit on (advice: benign)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data", "names", default="core,topics", show_default=True, help="Comma-separated GATE_DATA names.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True, help="The features' forward.")
@click.option("--out", default="gate_attention_data", show_default=True)
def main(model_name: str, seed: int, names: str, precision: str, out: str) -> None:
    started = time.perf_counter()
    chosen = [n for n in names.split(",") if n]
    unknown = [n for n in chosen if n not in GATE_DATA]
    if unknown:
        raise click.BadParameter(f"unknown data {unknown}; known: {', '.join(GATE_DATA)}", param_hint="--data")
    model_dir = models.resolve(model_name)
    harmful = data.advbench()
    sets = {name: list(gate_requests(harmful, GATE_DATA[name], seed=seed)) for name in chosen}
    unseen = unseen_requests(seed)
    model, tokenizer = load_model(model_dir)
    rows: dict[str, np.ndarray] = {}
    for group in [*sets.values(), [r for asked in unseen.values() for r in asked]]:
        rows |= forward_new(model, tokenizer, group, rows, precision)
    arms = {}
    for name, requests in sets.items():
        tokens = [rows[request_key(r)] for r in requests]
        fit, calibration = split(requests, seed=seed)
        benign_cal = calibration[~np.array([r.harmful for r in requests])[calibration]]
        weight, bias, pooled = fit_read(tokens, requests, fit, seed, "attention")
        benign_scores = read_scores([tokens[i] for i in benign_cal], weight, bias, pooled)
        thresholds = {str(rate): threshold_at(benign_scores, rate) for rate in RATES}

        by_source: dict[str, list] = {}
        for i in sorted(calibration, key=lambda i: (requests[i].source, requests[i].harmful)):
            kind = f"{requests[i].source} ({'harmful' if requests[i].harmful else 'benign'})"
            by_source.setdefault(kind, []).append(requests[i])
        arms[name] = {
            "requests": len(requests),
            "thresholds": {rate: round(t, 4) for rate, t in thresholds.items()},
            "unseen": fires(unseen, rows, (weight, bias, pooled), thresholds),
            "calibration": fires(by_source, rows, (weight, bias, pooled), thresholds),
        }
        print(name, arms[name]["unseen"], flush=True)
    write_result(
        out,
        {
            "model": model_name,
            "layer": LAYER,
            "precision": forward_precision(precision),
            "protocol": "each data set's attention read fit on its fit split (mean of the product's draws), thresholds "
            "at 1% / 5% of its benign calibration requests; unseen sources in neither data set; each set's calibration "
            "split by source in distribution; rates only",
            "arms": arms,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    plot(arms, RESULTS / f"{out}.png")


if __name__ == "__main__":
    main()

"""Does fitting the gate on requests carried into the next turn teach it the form, at what cost on benign questions?

``gate_followup`` found the product's attention read sees a harmful request carried on by a follow-up ("Go on.")
77% of the time after a refusal, and an insisting follow-up ("Ignore your previous answer …") about half the time:
no gate's data has the form. Here the gate's data gains ``Sizes.continuation`` of it (the ``follow-up`` source:
harmful requests of the extraction half and red-team objectives, benign pool instructions, each carried on with the
*fit* phrasings of ``probes/follow_ups.json``), and each arm is fit as ``extract`` fits the product's gate
(``gate.fit_read``, attention read, layer 16, the data's fit split, threshold at 5% of all its benign calibration
requests):

* ``core`` — the product's data; ``core+follow-up`` — with the new source; ``… without <family>`` — with it, less
  one follow-up family (continue / elaborate / insist), which is then new in form as well as in phrasing.

**Fit vs scored**: scored on continuations built with the *scored* phrasings (no text shared with the fit ones) of
AdvBench's held-out half and of benign evaluation instructions (``gate_followup``'s set), on the sources no gate is
fit on (``gate_sources.unseen_requests``: ``airt``, ``harmbench``, ``donotanswer``, past and future tense; the
advice questions, benign), and on the core data's benign calibration requests by source (borderline,
conversational, multi-turn; the same requests in every arm). ``--seeds`` fit draws each.

Run: python -m benchmarks.gate_continuation_data [--count 120] [--seeds 0,1,2] [--out gate_continuation_data]
Writes benchmarks/results/NAME.{json,png} (rates only).
"""

from __future__ import annotations

import dataclasses
import random
import time

import click
import numpy as np

from benchmarks.common import RESULTS, seed_list, write_result
from benchmarks.gate_followup import LAYER
from benchmarks.gate_sources import unseen_requests
from safetylock import data, models
from safetylock.evaluate import load_suite
from safetylock.gate import TARGET_FPR, fit_read, prompt_tokens, read_scores, system_turn, threshold_at
from safetylock.hf import PRECISIONS, forward_precision, load_model
from safetylock.sources import GATE_DATA, continuations, follow_ups, gate_requests, split

CALIBRATION_SOURCES = ("borderline", "conversational", "multiturn")


def rate(fired: np.ndarray, members) -> float | None:
    members = list(members)
    return round(float(fired[members].mean()), 4) if members else None


def plot(found: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(found)
    groups = list(found[arms[0]]["mean"])
    fig, ax = plt.subplots(figsize=(12, 4.2))
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        means = [100 * (found[arm]["mean"][g] or 0.0) for g in groups]
        spread = [100 * (found[arm]["spread"][g] or 0.0) for g in groups]
        ax.bar(np.arange(len(groups)) + k * width, means, width, yerr=spread, capsize=2, label=arm)
    ax.set_xticks(np.arange(len(groups)) + width * (len(arms) - 1) / 2, groups, fontsize=7, rotation=35, ha="right")
    ax.set_ylabel("fires at 5% benign calibration (%)")
    ax.set_title("Gate data with continuations (attention read, layer 16, fit draws); scored phrasings unseen")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL, show_default=True)
@click.option("--count", type=click.IntRange(min=1), default=120, show_default=True, help="Sizes.continuation of the arms.")
@click.option("--scored", type=click.IntRange(min=1), default=130, show_default=True, help="Scored continuations per label.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated fit draws.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True, help="The features' forward.")
@click.option("--out", default="gate_continuation_data", show_default=True)
def main(model_name: str, count: int, scored: int, seeds: str, precision: str, out: str) -> None:
    started = time.perf_counter()
    draws = seed_list(seeds)
    model_dir = models.resolve(model_name)
    data_requests = list(gate_requests(data.advbench(), dataclasses.replace(GATE_DATA["core"], continuation=count), seed=0))
    in_core = sum(r.source != "follow-up" for r in data_requests)  # the follow-up source is appended last
    rng = random.Random("gate-followup")  # gate_followup's scored set
    scored_requests = continuations(rng, list(load_suite("advbench-heldout", scored, 0).prompts), True) + continuations(
        rng, list(load_suite("benign", scored, 0).prompts), False
    )
    unseen = unseen_requests(0)
    unseen_flat = [r for asked in unseen.values() for r in asked]
    model, tokenizer = load_model(model_dir)
    everything = data_requests + scored_requests + unseen_flat
    rows = prompt_tokens(
        model, tokenizer, [r.messages() for r in everything], LAYER, system_turn(tokenizer), progress=True, precision=precision
    )
    own, rest = rows[: len(data_requests)], rows[len(data_requests) :]
    scored_rows, unseen_rows = rest[: len(scored_requests)], rest[len(scored_requests) :]
    groups: dict[str, list[int]] = {
        f"harmful {family}": [i for i, r in enumerate(scored_requests) if r.harmful and r.family == family]
        for family in sorted({r.family for r in scored_requests if r.harmful})
    }
    groups["benign continuation"] = [i for i, r in enumerate(scored_requests) if not r.harmful]
    offsets = np.cumsum([0] + [len(asked) for asked in unseen.values()])
    unseen_groups = {name: range(offsets[k], offsets[k + 1]) for k, name in enumerate(unseen)}
    arms = {"core": list(range(in_core)), f"core+follow-up {count}": list(range(len(data_requests)))}
    for family in sorted(follow_ups("fit")):
        arms[f"… without {family}"] = [
            i for i, r in enumerate(data_requests) if not (r.source == "follow-up" and r.family.endswith(f"-{family}"))
        ]
    found: dict[str, dict] = {}
    for arm, members in arms.items():
        requests, tokens = [data_requests[i] for i in members], [own[i] for i in members]
        fit, calibration = split(requests, seed=0)
        benign_calibration = [i for i in calibration if not requests[i].harmful]
        core_calibration = {  # the core data's requests (the first in_core of every arm), by source
            source: [k for k, i in enumerate(benign_calibration) if members[i] < in_core and requests[i].source == source]
            for source in CALIBRATION_SOURCES
        }
        per_draw = []
        for seed in draws:
            gate = fit_read(tokens, requests, fit, seed, "attention")
            calibration_scores = read_scores([tokens[i] for i in benign_calibration], *gate)
            threshold = threshold_at(calibration_scores, TARGET_FPR)
            fired = read_scores(scored_rows, *gate) > threshold
            rates = {name: rate(fired, idx) for name, idx in groups.items()}
            fired = read_scores(unseen_rows, *gate) > threshold
            rates |= {name: rate(fired, idx) for name, idx in unseen_groups.items()}
            fired = calibration_scores > threshold
            rates |= {f"calibration {source}": rate(fired, idx) for source, idx in core_calibration.items()}
            per_draw.append(rates)
            print(arm, seed, rates, flush=True)
        by_group = {g: [d[g] for d in per_draw] for g in per_draw[0]}
        found[arm] = {
            "requests": len(requests),
            "draws": dict(zip(map(str, draws), per_draw)),
            "mean": {g: round(float(np.mean(v)), 4) for g, v in by_group.items()},
            "spread": {g: round(float(np.max(v) - np.min(v)) / 2, 4) for g, v in by_group.items()},
        }
    write_result(
        out,
        {
            "model": model_name,
            "layer": LAYER,
            "precision": forward_precision(precision),
            "continuation": count,
            "scored": {name: len(idx) for name, idx in {**groups, **unseen_groups}.items()},
            "protocol": "each arm fit as extract fits the product's attention gate (its data's fit split, threshold at 5% "
            "of all its benign calibration requests); scored on continuations in the scored phrasings (none shared "
            "with the fit phrasings) of AdvBench's held-out half and benign evaluation instructions, on the unseen "
            "sources and advice questions, and on the core data's benign calibration requests by source; mean / "
            "spread over the fit draws; rates only",
            "arms": found,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    plot(found, RESULTS / f"{out}.png")


if __name__ == "__main__":
    main()

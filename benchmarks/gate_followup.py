"""Does the gate see a request carried into the next turn ("Go on.")? The product's read against one that pools
the last user turn only, and against the last-token read (``extract --gate-read last``).

The attention read pools every prompt token after the system turn, so an earlier turn of a chat cannot come from
vLLM's prefix cache on a gated server (``plugins/vllm_hook/cache.py``). Pooling only the last user turn would let
the cache serve every earlier turn, and on the gate's own multi-turn source it ranks better (a harmful second turn
after a benign first; a benign follow-up after a refused turn). This measures what it costs where the request sits
*outside* the last turn:

* **continuations** (``sources.continuations``): AdvBench's held-out requests as the first turn, a reply (a refusal
  or an attacker-written compliant opening), then a follow-up from ``probes/follow_ups.json`` — harmful; and
  benign instructions of the evaluation sample carried on by the same replies and follow-ups — benign;
* the gate's ``multiturn`` source held out (fit on every other source of the core data, thresholds on their benign
  calibration requests).

The attention reads are fit as ``extract`` fits the product's (``gate.fit_read``, layer 16, the core data's fit
split, thresholds at 1% / 5% of its benign calibration requests) on the same token rows, the last-turn read on the
rows from the last user turn's opening on; the last-token read on the same rows' last; ``--seeds`` fit draws each.
**Fit vs scored**: the continuations' requests are AdvBench's held-out half and benign evaluation instructions, in
no gate's data, and no gate is fit on the follow-up form; the multi-turn rows are that source held out of the fit.

Run: python -m benchmarks.gate_followup [--seeds 0,1,2] [--count 130] [--precision auto] [--out gate_followup]
Writes benchmarks/results/NAME.{json,png} (rates only).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import click
import numpy as np

from benchmarks.common import RESULTS, seed_list, write_result
from safetylock import data, models
from safetylock.evaluate import load_suite
from safetylock.gate import fit_read, pooled_from, prompt_tokens, read_scores, system_turn, threshold_at
from safetylock.hf import PRECISIONS, chat_ids, common_prefix, forward_precision, load_model
from safetylock.sources import GATE_DATA, Request, continuations, gate_requests, split

LAYER = 16  # the product gate's layer on the default model
RATES = (0.01, 0.05)
READS = ("after-system", "last-user-turn", "last-token")  # attention reads on either rows; the last-token read


def user_turn_head(tokenizer, turn_end: Sequence[int]) -> list[int]:
    """The ids that open a user turn in ``tokenizer``'s chat template: what chats differing only in their last user
    turn share after the earlier exchange's last ``turn_end`` (ChatML: ``<|im_start|>user\\n``)."""
    before = [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "beta"}]
    rendered = [chat_ids(tokenizer, [*before, {"role": "user", "content": text}]) for text in ("7", "gamma delta", "Eps")]
    shared = rendered[0][: min(common_prefix(rendered[0], other) for other in rendered[1:])]
    end = list(turn_end)
    ends = [i + len(end) for i in range(len(shared) - len(end) + 1) if shared[i : i + len(end)] == end]
    if not end or not ends:
        raise click.ClickException("the chat template shows no turn end before the user turn: no last-turn read here")
    return shared[ends[-1] :]


def last_turn_rows(rows: np.ndarray, ids: Sequence[int], start: int, head: Sequence[int]) -> np.ndarray:
    """``rows`` (a chat's pooled rows from position ``start`` on) from the last user turn's opening ``head`` on."""
    n = len(head)
    last = max((i for i in range(start, len(ids) - n + 1) if list(ids[i : i + n]) == list(head)), default=start)
    return rows[last - start :]


def fires(scores: np.ndarray, thresholds: dict[str, float]) -> dict[str, float]:
    return {rate: round(float((scores > t).mean()), 4) for rate, t in thresholds.items()}


def fit_and_thresholds(tokens, requests, fit, benign_calibration, seed: int, read: str) -> tuple[tuple, dict[str, float]]:
    """``read`` (``gate.READS``) fit on ``fit`` (weight, bias, pooled) and its thresholds at ``RATES`` of the benign
    calibration requests' scores."""
    gate = fit_read(tokens, requests, fit, seed, read)
    benign_scores = read_scores([tokens[i] for i in benign_calibration], *gate)
    return gate, {str(rate): threshold_at(benign_scores, rate) for rate in RATES}


def plot(found: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(found[READS[0]]["mean"])
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(READS)
    for k, read in enumerate(READS):
        means = [100 * found[read]["mean"][g] for g in groups]
        spread = [100 * found[read]["spread"][g] for g in groups]
        ax.bar(np.arange(len(groups)) + k * width, means, width, yerr=spread, capsize=3, label=read)
    ax.set_xticks(np.arange(len(groups)) + width * (len(READS) - 1) / 2, [g.replace(": ", ":\n") for g in groups], fontsize=7)
    ax.set_ylabel("fires at 5% benign calibration (%)")
    ax.set_title("Gate read: attention after the system turn (product), over the last user turn, last token (fit draws)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL, show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated fit draws.")
@click.option("--count", type=click.IntRange(min=1), default=130, show_default=True, help="Continuations of each label.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True, help="The features' forward.")
@click.option("--out", default="gate_followup", show_default=True)
def main(model_name: str, seeds: str, count: int, precision: str, out: str) -> None:
    started = time.perf_counter()
    draws = seed_list(seeds)
    model_dir = models.resolve(model_name)
    requests = list(gate_requests(data.advbench(), GATE_DATA["core"], seed=0))
    rng = random.Random("gate-followup")
    harmful = list(load_suite("advbench-heldout", count, 0).prompts)
    benign = list(load_suite("benign", count, 0).prompts)
    scored = continuations(rng, harmful, True) + continuations(rng, benign, False)
    model, tokenizer = load_model(model_dir)
    system = system_turn(tokenizer)
    head = user_turn_head(tokenizer, system[1])
    everything: list[Request] = requests + scored
    chats = [r.messages() for r in everything]
    rows = prompt_tokens(model, tokenizer, chats, LAYER, system, progress=True, precision=precision)
    ids = [chat_ids(tokenizer, chat) for chat in chats]
    by_read = {  # read name: (token rows, gate read)
        "after-system": (rows, "attention"),
        "last-user-turn": ([last_turn_rows(t, i, pooled_from(i, *system), head) for t, i in zip(rows, ids)], "attention"),
        "last-token": (rows, "last"),
    }
    labels = np.array([r.harmful for r in requests])
    sources_of = np.array([r.source for r in requests])
    fit, calibration = split(requests, seed=0)
    groups = {
        f"continuation: harmful after {reply}": [i for i, r in enumerate(scored) if r.harmful and r.family.startswith(reply)]
        for reply in ("refusal", "compliant-start")
    }
    groups["continuation: benign"] = [i for i, r in enumerate(scored) if not r.harmful]
    families = {  # the harmful continuations by reply and follow-up family (the JSON's, not the plot's)
        family: [i for i, r in enumerate(scored) if r.harmful and r.family == family]
        for family in sorted({r.family for r in scored})
    }
    benign_calibration = [i for i in calibration if not labels[i]]
    kept = np.array([i for i in fit if sources_of[i] != "multiturn"])  # the multi-turn source held out
    others = [i for i in benign_calibration if sources_of[i] != "multiturn"]
    held = [i for i in range(len(requests)) if sources_of[i] == "multiturn"]
    found: dict[str, dict] = {}
    for read, (tokens, kind) in by_read.items():
        own, extra = tokens[: len(requests)], tokens[len(requests) :]
        per_draw, family_draws = [], []
        for seed in draws:
            gate, thresholds = fit_and_thresholds(own, requests, fit, benign_calibration, seed, kind)
            scores = read_scores(extra, *gate)
            rates = {name: fires(scores[members], thresholds) for name, members in groups.items()}
            by_family = {name: fires(scores[members], thresholds) for name, members in families.items()}
            gate, thresholds = fit_and_thresholds(own, requests, kept, others, seed, kind)
            scores = read_scores([own[i] for i in held], *gate)
            for harmful_side, name in ((True, "multiturn held out: harmful"), (False, "multiturn held out: benign")):
                rates[name] = fires(scores[labels[held] == harmful_side], thresholds)
            per_draw.append(rates)
            family_draws.append(by_family)
            print(read, seed, {g: r["0.05"] for g, r in rates.items()}, flush=True)
        at5 = {g: [d[g]["0.05"] for d in per_draw] for g in per_draw[0]}
        found[read] = {
            "draws": dict(zip(map(str, draws), per_draw)),
            "harmful continuations by family at 5% (mean)": {
                name: round(float(np.mean([d[name]["0.05"] for d in family_draws])), 4) for name in families
            },
            "mean": {g: round(float(np.mean(v)), 4) for g, v in at5.items()},
            "spread": {g: round(float(np.max(v) - np.min(v)) / 2, 4) for g, v in at5.items()},
        }
    write_result(
        out,
        {
            "model": model_name,
            "layer": LAYER,
            "precision": forward_precision(precision),
            "user_turn_head": head,
            "scored": {name: len(members) for name, members in {**groups, **families}.items()},
            "protocol": "each read fit as extract fits the product's gate (core data's fit split, thresholds at "
            "1% / 5% of its benign calibration requests; the multi-turn rows: that source held out of fit and thresholds); "
            "continuations of AdvBench's held-out half (harmful) and of benign evaluation instructions (benign), in no "
            "gate's data; mean / spread: over the fit draws at 5%; rates only",
            "reads": found,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    plot(found, RESULTS / f"{out}.png")


if __name__ == "__main__":
    main()

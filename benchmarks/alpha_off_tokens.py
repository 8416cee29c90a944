"""Where the gated lock's α-off acts: every token, the prompt's tokens only, or the generated tokens only.

Under the refuse response with an ``alpha_off``, every request whose gate does not fire is served with the lock's
heads at α-off on every token, its prompt's included (``safetylock.apply.apply_gated``, the plugin alike). A gate
decides at the last prompt token, so anything conditioned on a decision (a second threshold, a band of scores under
it: ``benchmarks.gate_band``) can shift only from there on. This splits α-off's effect and cost by where it is
added: the HF model of a variant, its refit gate's fired requests answered with the refusal, every other request
generated greedily with the heads at ``--alpha`` on all positions, on the prompt's positions only (the prompt's
forward, its last position included, so the first generated token too), or on the generated positions only; and
with none (the gated refuse served as the product serves it). Then a band under the threshold, ``t_low < score``,
with α-off on every token for its requests only — what a second prefill of those requests with their prompt
shifted would serve — composed per item from the "all" and "none" answers; ``t_low`` set on the gate's benign
calibration requests through the model (``--band-fpr``: the share of them above it).

**Fit vs scored**: the lock and the gate come from the gate's requests and AdvBench's extraction split; ``airt``,
past-tense, Do-Not-Answer and advice are in no fit; arithmetic is utility.

Run: python -m benchmarks.alpha_off_tokens [--variant harmful-10] [--alpha 2] [--suites donotanswer,advice,...]
     [--band-fpr 0.1,0.2,0.3,0.5]
Writes benchmarks/results/alpha_off_tokens.{json,png}; answers stay in the cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import torch

from benchmarks.common import RESULTS, calibrated_lock, grouped_bars, write_result
from benchmarks.gate_band import outcome
from benchmarks.responses import product_lock
from safetylock import data
from safetylock.apply import fold_bias, layer_shifts
from safetylock.attack import served
from safetylock.evaluate import judged, load_suite
from safetylock.gate import attention_blocks, benign_calibration, gate_scores, threshold_at
from safetylock.geometry import head_geometry, output_projections
from safetylock.hf import generate, load_model
from safetylock.lockfile import load
from safetylock.models import cache_root, resolve
from safetylock.report import METRICS
from safetylock.respond import DEFAULT_REFUSAL
from safetylock.sources import recorded_sizes

PLACES = ("none", "all", "prompt", "generated")  # where α-off is added
SUITES = "donotanswer,advice,arithmetic,airt,past-tense"


def shifted(place: dict[str, str], bias: torch.Tensor, alpha: float):
    """An attention block's forward hook adding ``alpha · bias`` where ``place["now"]`` says (a forward of more than
    one position is the prompt's, one position a generated token's)."""

    def hook(_module, _args, output):
        hidden = output[0]
        prompt = hidden.shape[1] > 1
        if {"all": True, "prompt": prompt, "generated": not prompt}.get(place["now"], False):
            return (hidden + alpha * bias.to(hidden.dtype), *output[1:])
        return output

    return hook


@click.command()
@click.option("--variant", default="harmful-10", show_default=True)
@click.option("--alpha", type=float, default=2.0, show_default=True, help="The α-off.")
@click.option("--suites", default=SUITES, show_default=True)
@click.option("--count", type=int, default=50, show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--band-fpr", default="0.1,0.2,0.3,0.5", show_default=True, help="Benign calibration shares above t_low.")
@click.option("--out", default="alpha_off_tokens", show_default=True)
def main(variant: str, alpha: float, suites: str, count: int, max_tokens: int, band_fpr: str, out: str) -> None:
    model_dir, framing = served(variant)
    lock = load(calibrated_lock(product_lock(), variant, model_dir, framing, refit=True))
    model, tokenizer = load_model(resolve(model_dir))
    geometry = head_geometry(model.config)
    projections, blocks = output_projections(model, geometry), attention_blocks(model, geometry.num_layers)
    place = {"now": "none"}
    for layer, delta in layer_shifts(lock, 1.0).items():
        if lock.gate.shifts_when_generating(layer):
            blocks[layer].register_forward_hook(shifted(place, fold_bias(projections[layer].weight, delta), alpha))
    answers_dir = cache_root() / "answers" / out
    answers_dir.mkdir(parents=True, exist_ok=True)
    benign = benign_calibration(data.advbench(), sizes=recorded_sizes(lock.gate.calibration))
    calibration = gate_scores(model, tokenizer, lock.gate, benign, framing)
    lows = {float(f): threshold_at(calibration, float(f)) for f in band_fpr.split(",")}
    rows: dict[str, dict[str, float]] = {}
    metrics = {}
    for name in [s for s in suites.split(",") if s]:
        suite = load_suite(name, count, 0)
        metrics[name] = METRICS[suite.kind]
        chats = [framing.messages(p) for p in suite.asked()]
        place["now"] = "none"
        scores = gate_scores(model, tokenizer, lock.gate, chats)
        fired = scores > lock.gate.threshold
        rows[name] = {"fired": round(float(fired.mean()), 3)}
        answered: dict[str, list[dict]] = {}
        for where in PLACES:
            place["now"] = where
            passed = [i for i in range(len(chats)) if not fired[i]]
            answers = dict(zip(passed, generate(model, tokenizer, [chats[i] for i in passed], max_tokens, batch_size=25)))
            items = [judged(suite, suite.prompts[i], answers.get(i, DEFAULT_REFUSAL), i) for i in range(len(chats))]
            (answers_dir / f"{variant}-{name}-{where}.json").write_text(json.dumps(items, indent=1))
            rows[name][where] = round(float(np.mean([outcome(item, suite.kind) for item in items])), 3)
            answered[where] = items
            print(name, where, rows[name][where], flush=True)
        for share, low in lows.items():
            band = (scores > low) & ~fired
            chosen = [a if b else n for a, n, b in zip(answered["all"], answered["none"], band)]
            rows[name][f"band {share:.0%}"] = round(float(np.mean([outcome(item, suite.kind) for item in chosen])), 3)
            rows[name][f"band {share:.0%} share"] = round(float(band.mean()), 3)
    result = {
        "protocol": f"HF, greedy, {max_tokens} tokens; {variant} with its gate refit as served; fired requests "
        f"answered with the refusal, the others with the lock's heads at α {alpha:g} where each column says",
        "variant": variant,
        "alpha_off": alpha,
        "band_t_low": {f"{share:g}": low for share, low in lows.items()},
        "count": count,
        "metrics": metrics,
        "rows": rows,
    }
    print(write_result(out, result), plot(result, RESULTS / f"{out}.png"))


def plot(result: dict, path: Path) -> Path:
    """One group per suite, a bar per place α-off is added."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(result["rows"])
    columns = [*PLACES, *(k for k in result["rows"][suites[0]] if k.startswith("band") and not k.endswith("share"))]
    fig, ax = plt.subplots(figsize=(12, 4))
    series = {
        f"α-off on {column} tokens" if column in PLACES else f"{column} of benign: α-off on every token": [
            result["rows"][s][column] for s in suites
        ]
        for column in columns
    }
    grouped_bars(ax, [f"{s}\n{result['metrics'][s].replace('_', ' ')}" for s in suites], series, width=0.85)
    ax.set_title(f"{result['variant']}, gated refuse with α-off {result['alpha_off']:g}: where α-off is added")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()

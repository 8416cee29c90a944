"""Where the gated lock's α-off acts: every token, the prompt's tokens only, the generated tokens only.

Under the refuse response with an ``alpha_off``, every request whose gate does not fire is served with the lock's
heads at α-off on every token, its prompt's included (``safetylock.apply.apply_gated``, the plugin alike). A gate
decides at the last prompt token, so anything conditioned on a decision (a second threshold, a band of scores under
it: ``benchmarks.gate_band``) can shift only from there on. This splits α-off's effect and cost by where it is
added: the HF model of a variant, its refit gate's fired requests answered with the refusal, every other request
generated greedily with the heads at ``--alpha`` on all positions, on the prompt's positions only (the prompt's
forward, its last position included, so the first generated token too), on the generated positions only, or
``late``: the generated positions and, at the heads after the gate's layer, the prompt's (what a decision known
before those layers run could shift in the same forward); and with none (the gated refuse served as the product
serves it). Then a band under the threshold, ``t_low < score``, with α-off on every token for its requests only —
what a second prefill of those requests with their prompt shifted would serve — composed per item from the "all"
and "none" answers (and from the "late" and "none" ones); ``t_low`` set on the gate's benign calibration requests
through the model (``--band-fpr``: the share of them above it). ``--variant aligned-base``: the base with the
lock's own gate.

**Fit vs scored**: the lock and the gate come from the gate's requests and AdvBench's extraction split; ``airt``,
past-tense, Do-Not-Answer and advice are in no fit; arithmetic is utility.

Run: python -m benchmarks.alpha_off_tokens [--variant harmful-10] [--alpha 2] [--suites donotanswer,advice,...]
     [--band-fpr 0.1,0.2,0.3,0.5] [--places none,all,prompt,generated,late] [--out alpha_off_tokens]
Writes benchmarks/results/OUT.{json,png}; answers stay in the cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from benchmarks.common import RESULTS, gated_target, suite_bars, write_result
from benchmarks.gate_band import suite_rate
from benchmarks.responses import product_lock
from safetylock import data
from safetylock.apply import fold_bias, layer_shifts
from safetylock.evaluate import Suite, judged, load_suite
from safetylock.gate import attention_blocks, gate_scores, threshold_at
from safetylock.geometry import head_geometry, output_projections
from safetylock.hf import generate, load_model
from safetylock.lockfile import load
from safetylock.models import cache_root, resolve, write_json
from safetylock.report import METRICS
from safetylock.respond import DEFAULT_REFUSAL

PLACES = ("none", "all", "prompt", "generated", "late")  # where α-off is added
SUITES = "donotanswer,advice,arithmetic,airt,past-tense"


def answers_file(out: str, variant: str, suite: str, where: str) -> Path:
    """Where a run ``out`` keeps the judged answers of ``variant`` to ``suite`` with α-off added at ``where``."""
    return cache_root() / "answers" / out / f"{variant}-{suite}-{where}.json"


def cached_answers(out: str, variant: str, suite: Suite, where: str) -> list[dict]:
    """The judged answers a run ``out`` kept (``answers_file``), refused unless they answer ``suite``'s prompts."""
    items = json.loads(answers_file(out, variant, suite.name, where).read_text())
    if [item["prompt"] for item in items] != list(suite.prompts):
        raise click.ClickException(f"the cached answers of {suite.name} are not this suite's prompts")
    return items


def shifted(place: dict[str, str], bias: torch.Tensor, alpha: float, after_gate: bool):
    """An attention block's forward hook adding ``alpha · bias`` where ``place["now"]`` says (a forward of more than
    one position is the prompt's, one position a generated token's; ``late``: every generated token, and the
    prompt's tokens at blocks after the gate layer, ``after_gate``)."""

    def hook(_module, _args, output):
        hidden = output[0]
        prompt = hidden.shape[1] > 1
        wanted = {"all": True, "prompt": prompt, "generated": not prompt, "late": after_gate or not prompt}
        if wanted.get(place["now"], False):
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
@click.option("--places", default=",".join(PLACES), show_default=True, help="Where α-off is added, a column each.")
@click.option("--out", default="alpha_off_tokens", show_default=True)
def main(variant: str, alpha: float, suites: str, count: int, max_tokens: int, band_fpr: str, places: str, out: str) -> None:
    model_dir, framing, lock_path = gated_target(variant, product_lock())
    lock = load(lock_path)
    model, tokenizer = load_model(resolve(model_dir))
    geometry = head_geometry(model.config)
    projections, blocks = output_projections(model, geometry), attention_blocks(model, geometry.num_layers)
    place = {"now": "none"}
    for layer, delta in layer_shifts(lock, 1.0).items():
        if lock.gate.shifts_when_generating(layer):
            bias = fold_bias(projections[layer].weight, delta)
            blocks[layer].register_forward_hook(shifted(place, bias, alpha, lock.gate.shifts_on_prompt(layer)))
    benign = lock.gate_benign_calibration(data.advbench())
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
        for where in places.split(","):
            place["now"] = where
            passed = [i for i in range(len(chats)) if not fired[i]]
            answers = dict(zip(passed, generate(model, tokenizer, [chats[i] for i in passed], max_tokens, batch_size=25)))
            items = [judged(suite, suite.prompts[i], answers.get(i, DEFAULT_REFUSAL), i) for i in range(len(chats))]
            write_json(answers_file(out, variant, name, where), items, indent=1)
            rows[name][where] = suite_rate(items, suite.kind)
            answered[where] = items
            print(name, where, rows[name][where], flush=True)
        for share, low in lows.items():
            band = (scores > low) & ~fired
            rows[name][f"band {share:.0%} share"] = round(float(band.mean()), 3)
            for where in ("all", "late"):
                if where in answered and "none" in answered:
                    chosen = [a if b else n for a, n, b in zip(answered[where], answered["none"], band)]
                    column = f"band {share:.0%}" + ("" if where == "all" else f" {where}")
                    rows[name][column] = suite_rate(chosen, suite.kind)
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
    suites = list(result["rows"])
    first = result["rows"][suites[0]]
    columns = [c for c in first if c in PLACES or (c.startswith("band") and not c.endswith("share"))]
    labels = {
        "none": "no token",
        "all": "every token",
        "prompt": "the prompt's tokens",
        "generated": "generated tokens",
        "late": "generated tokens and, after the gate layer, the prompt's",
    }

    def label(column: str) -> str:
        if column in PLACES:
            return f"α-off on {labels[column]}"
        how = "as late" if column.endswith("late") else "on every token"
        return f"{column.removesuffix(' late')} of benign: α-off {how}"

    series = {label(column): [result["rows"][s][column] for s in suites] for column in columns}
    title = f"{result['variant']}, gated refuse with α-off {result['alpha_off']:g}: where α-off is added"
    return suite_bars(result, series, title, path, ylim=135)


if __name__ == "__main__":
    main()

"""A band decided token by token before the lock's heads: each token is shifted when an early probe fires on it.

``benchmarks.early_band`` picks a band of passed requests by an early gate's verdict on the whole prompt, which a
served graph only has once the request's last prompt token is forwarded: a prompt split over prefill chunks, or
read partly from the prefix cache, would have its earlier tokens unshifted. This reads the probe causally instead:
every content token's own score at the early layer (the gate refit there on the variant with the last-token read,
``weight · h_t + bias``) decides whether *that* token's lock heads, all after the early layer, are shifted at α-off
— prompt tokens after the system turn and generated tokens alike. A token's shift then depends on its prefix only,
so chunking and the prefix cache serve what one forward serves, and it needs no host step: a per-token mask in
the graph. ``t_low`` at a share of the gate's benign calibration requests (through the variant) having a token
above it (``--band-fpr``); requests the layer-16 gate fires on keep the refusal; a request with no token above
``t_low`` is served as ``alpha_off_tokens``'s "no token" answer (cached), the others generated here.

**Fit vs scored**: the early gate and ``t_low`` come from the gate's requests only; ``airt``, past-tense,
Do-Not-Answer and advice are in no fit; arithmetic is utility.

Run (after ``python -m benchmarks.alpha_off_tokens --places none …`` with the same variant and suites):
     python -m benchmarks.token_band [--variant harmful-10] [--answers alpha_off_late] [--layer 6] [--alpha 2]
Writes benchmarks/results/token_band.{json,png}; answers stay in the cache.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import numpy as np
import torch

from benchmarks.alpha_off_tokens import answers_file, cached_answers
from benchmarks.common import RESULTS, gated_target, suite_bars, write_result
from benchmarks.early_band import gate_data
from benchmarks.gate_band import suite_rate
from benchmarks.responses import product_lock
from safetylock.apply import fold_bias, layer_shifts
from safetylock.evaluate import judged, load_suite
from safetylock.gate import (
    attention_blocks,
    block_input,
    gate_scores,
    pooled_from,
    prompt_tokens,
    refit,
    system_turn,
    threshold_at,
)
from safetylock.geometry import head_geometry, output_projections
from safetylock.hf import PLAIN, chat_ids, generate, load_model
from safetylock.lockfile import load
from safetylock.models import resolve, write_json
from safetylock.report import METRICS

SUITES = "donotanswer,advice,arithmetic,airt,past-tense"


def content(ids: list[int], special: set[int]) -> np.ndarray:
    """Which positions of ``ids`` hold a turn's content: not a special token, nor one of the two after it (a chat
    template's role name and newline), whose activations run far off the probe's scale."""
    keep = np.ones(len(ids), dtype=bool)
    for p, token in enumerate(ids):
        if token in special:
            keep[p : p + 3] = False
    return keep


def token_maxima(model, tokenizer, gate, chats, system, framing=None) -> np.ndarray:
    """Per chat (sent as ``framing`` sends it): the largest score of the early probe ``gate`` (last-token read) over
    its content tokens after the system turn (``content``), float32 features."""
    rows = prompt_tokens(model, tokenizer, chats, gate.layer, system, framing=framing)
    weight, special = gate.weight.numpy(), set(tokenizer.all_special_ids)
    maxima = []
    for chat, r in zip(chats, rows):
        ids = chat_ids(tokenizer, (framing or PLAIN).messages(chat) if isinstance(chat, str) else chat)
        ids = ids[len(ids) - len(r) :]
        scores = (r @ weight + gate.bias)[content(ids, special)]
        maxima.append(float(scores.max()) if scores.size else -np.inf)
    return np.array(maxima)


def install(model, tokenizer, lock, gate, alpha: float, state: dict) -> None:
    """Hooks, active while ``state["on"]``: the early layer marks each forwarded token whose score exceeds
    ``state["low"]`` (prompt tokens only after the system turn), every lock head after it adds ``alpha`` × its bias
    on the marked tokens."""
    head, end = system_turn(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    special = set(tokenizer.all_special_ids)
    geometry = head_geometry(model.config)
    projections, blocks = output_projections(model, geometry), attention_blocks(model, geometry.num_layers)

    def read_starts(_module, args, kwargs):
        ids, mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
        if state["on"] and ids.shape[1] > 1:
            if mask is None:  # left padding: the pad id before a prompt's first token
                mask = torch.cumsum(ids != pad_id, dim=1) > 0
            pads = (mask[:, -ids.shape[1] :] == 0).sum(1).tolist()
            eligible = torch.zeros(ids.shape, dtype=torch.bool)
            for row, pad in enumerate(pads):
                tokens = ids[row, pad:].tolist()
                start = pooled_from(tokens, head, end)
                eligible[row, pad + start :] = torch.from_numpy(content(tokens, special)[start:])
            state["eligible"] = eligible

    def mark(_module, args, kwargs):
        if not state["on"]:
            return
        hidden = block_input(args, kwargs).float()
        scores = hidden @ gate.weight + gate.bias
        marked = scores > state["low"]
        if hidden.shape[1] > 1:
            marked &= state["eligible"]
        state["marked"] = marked

    def shift(bias: torch.Tensor):
        def hook(_module, _args, output):
            if not state["on"]:
                return output
            hidden = output[0]
            return (hidden + alpha * state["marked"][:, :, None].to(hidden.dtype) * bias.to(hidden.dtype), *output[1:])

        return hook

    model.register_forward_pre_hook(read_starts, with_kwargs=True)
    blocks[gate.layer].register_forward_pre_hook(mark, with_kwargs=True)
    for layer, delta in layer_shifts(lock, 1.0).items():
        if layer <= gate.layer:
            raise click.ClickException(f"the lock has a head at layer {layer}, not after the early layer {gate.layer}")
        blocks[layer].register_forward_hook(shift(fold_bias(projections[layer].weight, delta)))


@click.command()
@click.option("--variant", default="harmful-10", show_default=True)
@click.option("--answers", default="alpha_off_late", show_default=True, help="The alpha_off_tokens run's --out.")
@click.option("--layer", type=int, default=6, show_default=True, help="The early probe's layer, before every lock head.")
@click.option("--alpha", type=float, default=2.0, show_default=True, help="The α-off on marked tokens.")
@click.option("--suites", default=SUITES, show_default=True)
@click.option("--count", type=int, default=50, show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option(
    "--band-fpr", default="0.1,0.2,0.3", show_default=True, help="Benign calibration shares with a token above t_low."
)
@click.option("--out", default="token_band", show_default=True)
def main(
    variant: str, answers: str, layer: int, alpha: float, suites: str, count: int, max_tokens: int, band_fpr: str, out: str
) -> None:
    model_dir, framing, lock_path = gated_target(variant, product_lock())
    lock = load(lock_path)
    model, tokenizer = load_model(resolve(model_dir))
    requests, benign = gate_data(lock)
    early = refit(model, tokenizer, dataclasses.replace(lock.gate, layer=layer, pooling=None), requests, framing=framing)
    system = system_turn(tokenizer)
    calibration = token_maxima(model, tokenizer, early, benign, system, framing)
    lows = {float(f): threshold_at(calibration, float(f)) for f in band_fpr.split(",")}
    state: dict = {"on": False}
    install(model, tokenizer, lock, early, alpha, state)
    rows: dict[str, dict[str, float]] = {}
    metrics = {}
    for name in [s for s in suites.split(",") if s]:
        suite = load_suite(name, count, 0)
        metrics[name] = METRICS[suite.kind]
        chats = [framing.messages(p) for p in suite.asked()]
        fired = gate_scores(model, tokenizer, lock.gate, chats) > lock.gate.threshold
        maxima = token_maxima(model, tokenizer, early, chats, system)
        none = cached_answers(answers, variant, suite, "none")
        rows[name] = {"fired": round(float(fired.mean()), 3), "none": suite_rate(none, suite.kind)}
        for share, low in lows.items():
            band = [i for i in range(len(chats)) if maxima[i] > low and not fired[i]]
            state.update(on=True, low=low)
            replies = dict(zip(band, generate(model, tokenizer, [chats[i] for i in band], max_tokens, batch_size=25)))
            state["on"] = False
            items = [judged(suite, suite.prompts[i], replies[i], i) if i in replies else none[i] for i in range(len(chats))]
            write_json(answers_file(out, variant, name, f"band{share:g}"), items, indent=1)
            rows[name][f"{share:.0%}"] = suite_rate(items, suite.kind)
            rows[name][f"{share:.0%} share"] = round(len(band) / len(chats), 3)
        print(name, rows[name], flush=True)
    result = {
        "protocol": f"HF, greedy, {max_tokens} tokens; {variant} with its layer-16 gate refit as served (fired: the "
        f"refusal); every other request's tokens shifted at α {alpha:g} on every lock head where a probe refit at "
        f"layer {layer} on the variant scores them above t_low, token by token",
        "variant": variant,
        "early_gate": {"layer": layer, **{k: early.calibration[k] for k in ("auroc", "fpr", "tpr")}},
        "band_t_low": {f"{s:g}": v for s, v in lows.items()},
        "benign_token_max_median": float(np.median(calibration)),  # the probe off the last token, against:
        "last_token_threshold": early.threshold,
        "alpha_off": alpha,
        "count": count,
        "metrics": metrics,
        "rows": rows,
    }
    print(write_result(out, result), plot(result, RESULTS / f"{out}.png"))


def plot(result: dict, path: Path) -> Path:
    """One group per suite: the gated refuse as served, then the token band at each width."""
    suites = list(result["rows"])
    columns = ["none", *(k for k in result["rows"][suites[0]] if k.endswith("%"))]
    series = {
        ("gated refuse as served" if c == "none" else f"tokens above t_low at {c} of benign: α-off"): [
            result["rows"][s][c] for s in suites
        ]
        for c in columns
    }
    title = f"{result['variant']}: tokens shifted where an early probe fires on them"
    return suite_bars(result, series, title, path, ylim=110)


if __name__ == "__main__":
    main()

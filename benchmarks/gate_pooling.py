"""Pooling the gate's read over the request's tokens: does a probe that looks at every token recognise more kinds?

The product gate reads one position (the chat's last prompt token at layer 16 of Qwen2.5-Coder-0.5B-Instruct's 24);
``benchmarks.gate_reads`` found no other single position, mean or layer set above its curve, and a mean over the
user's turn below it. A mean dilutes a request's one harmful phrase ("… my classmate's Social Security number?")
with everything around it; probes that *select* tokens do not (McKenzie et al. 2025, "Detecting High-Stakes
Interactions with Activation Probes": max and attention pooling over token-level scores beat last-token and mean
probes off their training distribution). Candidates, each one linear token score ``s_t = w·h_t`` over the tokens
after the system turn (the user's turns, earlier assistant turns and the closing template), fit end to end on the
request's label (Adam, 300 full-batch steps, standardised features, L2 ``L2``, every (source, label) alike as
``gate.balanced_weights`` weighs them):

* ``product``: the product gate itself (``gate.fit_linear`` on the last prompt token's features): the reference;
* ``last``: ``s`` at the last prompt token — the product's read, fit end to end as the others are (what the
  fitting alone changes);
* ``mean``: the mean of ``s`` over the tokens;
* ``max``: the largest ``s`` (multiple-instance learning: the request is harmful if one of its tokens is);
* ``rolling-max``: the largest mean of ``s`` over ``WINDOW`` consecutive tokens (one phrase, not one token);
* ``attention``: ``Σ softmax(q·h)_t s_t`` with a learnt query ``q`` (an attention probe);
* ``last+attention`` / ``last+max``: ``s`` at the last token plus a second direction's score pooled by attention /
  its largest;
* ``product|attention``: the product's and the attention probe's scores, each standardised on the fit data,
  averaged (two reads that catch different requests at the same rate); ``product|last``, the same with the
  end-to-end fit of the last token instead: the control (two fits of one read).

Scored as ``benchmarks.gate_reads`` scores its reads (leave-one-source-out, thresholds at 1–12% of the other
sources' benign calibration requests; unseen sources by the probe fit on every source's fit split), so each is a
curve of reach against benign firing. Features: every token's attention-block input at ``--layers`` in float16,
computed once per model (float32 forward) and cached in the cache's ``gate/``.

Run: python -m benchmarks.gate_pooling [--layers 16] [--candidates 'product,attention,product|attention'] [--out NAME]
Writes benchmarks/results/NAME.{json,png} (rates only; default NAME gate_pooling).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch

from benchmarks.common import RESULTS, write_result
from benchmarks.gate_probes import linear
from benchmarks.gate_reads import SWEEP_PROTOCOL, parse_layers, plot_curves, recorded_forward, score, split_unseen
from benchmarks.gate_sources import request_key, unseen_requests
from safetylock import data, models
from safetylock.gate import attended, balanced_weights
from safetylock.hf import chat_ids, load_model
from safetylock.sources import Request, Sizes, gate_requests, split

WINDOW = 8  # tokens per window of ``rolling-max``
STEPS = 300  # full-batch Adam steps per fit
L2 = 0.01  # on the standardised token-score weights (sklearn's C 0.05 at this data's size is about 0.011)


@dataclass(frozen=True)
class Tokens:
    """Every request's token features at one layer, concatenated: request ``i`` owns rows
    ``offsets[i]:offsets[i + 1]`` of ``rows`` (float16); its last row is the last prompt token."""

    rows: np.ndarray
    offsets: np.ndarray

    def take(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens of ``indices`` (float32) and, per token, its position in ``indices``."""
        spans = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in indices]
        rows = torch.from_numpy(self.rows[np.concatenate(spans)].astype(np.float32))
        owner = torch.repeat_interleave(torch.arange(len(spans)), torch.tensor([len(s) for s in spans]))
        return rows, owner


def first_after_system(ids: list[int], end_of_turn: int) -> int:
    """Index of the first token after the system turn (ChatML: after the first ``<|im_end|>`` and its newline)."""
    return ids.index(end_of_turn) + 2 if end_of_turn in ids else 0


def token_features(model_dir: Path, requests: list[Request], layers: tuple[int, ...]) -> dict[int, Tokens]:
    """``{layer: Tokens}`` for ``requests`` at every one of ``layers`` (``token_features_at``)."""
    return token_features_at(model_dir, {layer: requests for layer in layers})


def token_features_at(model_dir: Path, asked: dict[int, list[Request]]) -> dict[int, Tokens]:
    """``{layer: Tokens}`` for the requests asked at each layer, from one store per model and layer: every request
    some layer's store lacks is forwarded once, at every layer that lacks it (``token_forward``), and appended there,
    each store written whole through a staged file — a new layer costs a forward of the requests asked there only."""
    digest = models.directory_digest(model_dir)
    stores = {layer: _TokenStore.load(digest, layer) for layer in asked}
    keys = {layer: [request_key(r) for r in requests] for layer, requests in asked.items()}
    unique = {k: r for layer, requests in asked.items() for k, r in zip(keys[layer], requests)}
    missing = {layer: [k for k in dict.fromkeys(keys[layer]) if k not in stores[layer].row] for layer in asked}
    needed = list(dict.fromkeys(k for lacking in missing.values() for k in lacking))
    if needed:
        read_at = tuple(sorted(layer for layer, lacking in missing.items() if lacking))
        computed = token_forward(model_dir, [unique[k] for k in needed], read_at)
        at = {k: i for i, k in enumerate(needed)}
        for layer in read_at:
            stores[layer].append(missing[layer], computed[layer], at)
            stores[layer].save()
    return {layer: stores[layer].take(keys[layer]) for layer in asked}


@dataclass
class _TokenStore:
    """One model layer's token rows, by request key (``token_features``' cache)."""

    path: Path
    keys: list[str]
    offsets: np.ndarray
    rows: np.ndarray | None
    row: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.row = {k: i for i, k in enumerate(self.keys)}

    @classmethod
    def load(cls, digest: str, layer: int) -> _TokenStore:
        ident = {"model": digest, "read": "after-system", "layer": layer}
        name = f"tokens-{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]}.npz"
        path = models.cache_root() / "gate" / name
        if not path.exists():
            return cls(path, [], np.zeros(1, dtype=np.int64), None)
        with np.load(path) as stored:
            return cls(path, stored["keys"].tolist(), stored["offsets"], stored["rows"])

    def append(self, keys: list[str], computed: Tokens, at: dict[str, int]) -> None:
        """Add ``keys``' rows from ``computed`` (a forward of requests indexed by ``at``)."""
        spans = [np.arange(computed.offsets[at[k]], computed.offsets[at[k] + 1]) for k in keys]
        added = computed.rows[np.concatenate(spans)]
        self.rows = added if self.rows is None else np.concatenate([self.rows, added])
        self.offsets = np.concatenate([self.offsets, self.offsets[-1] + np.cumsum([len(span) for span in spans])])
        self.row.update((k, len(self.keys) + i) for i, k in enumerate(keys))
        self.keys += keys

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staged = self.path.with_suffix(".tmp.npz")
        np.savez(staged, keys=np.array(self.keys), offsets=self.offsets, rows=self.rows)
        staged.replace(self.path)

    def take(self, keys: list[str]) -> Tokens:
        """``keys``' rows, in that order."""
        order = [self.row[k] for k in keys]
        lengths = [self.offsets[i + 1] - self.offsets[i] for i in order]
        spans = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in order])
        return Tokens(self.rows[spans], np.concatenate([[0], np.cumsum(lengths)]))


def token_forward(model_dir: Path, requests: list[Request], layers: tuple[int, ...]) -> dict[int, Tokens]:
    """``token_features`` computed by ``gate_reads.recorded_forward`` (float32), keeping every token after the
    system turn."""
    model, tokenizer = load_model(model_dir)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [chat_ids(tokenizer, r.messages()) for r in requests]
    kept_lengths = [len(i) - first_after_system(i, end_of_turn) for i in ids]
    kept: dict[int, list[np.ndarray]] = {layer: [np.empty(0)] * len(ids) for layer in layers}

    def keep(layer: int, hidden: torch.Tensor, members: list[int]) -> None:
        for row, index in enumerate(members):
            kept[layer][index] = hidden[row, -kept_lengths[index] :].to(torch.float16).numpy()

    recorded_forward(model, tokenizer, ids, layers, keep, "token features")
    offsets = np.concatenate([[0], np.cumsum(kept_lengths)])
    return {layer: Tokens(np.concatenate(kept[layer]), offsets) for layer in layers}


def averaged(scorers: list, x: np.ndarray):
    """One scorer: the mean of ``scorers``' scores, each standardised on the fit requests ``x``."""
    fitted = [(s, scores.mean(), scores.std() + 1e-9) for s in scorers for scores in [s(x)[:, 0]]]
    return lambda z: np.mean([(s(z)[:, 0] - m) / sd for s, m, sd in fitted], axis=0)[:, None]


def product_scorer(tokens: Tokens, x: np.ndarray, harmful: np.ndarray, sources: np.ndarray, seed: int):
    """The product gate's probe (``gate.fit_linear``) on the last prompt token of the requests ``x[:, 0]``."""
    last = tokens.offsets[1:] - 1

    def features(z: np.ndarray) -> np.ndarray:
        return tokens.rows[last[z[:, 0].astype(int)]].astype(np.float64)

    scorer = linear(features(x), harmful, np.zeros(len(x), bool), sources, seed)
    return lambda z: scorer(features(z))


def segment_max(values: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    return torch.full((n,), -torch.inf).scatter_reduce(0, owner, values, "amax", include_self=True)


def segment_mean(values: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.bincount(owner, minlength=n).float()
    return torch.zeros(n).index_add(0, owner, values) / counts


def last_of(owner: torch.Tensor, n: int) -> torch.Tensor:
    """Row of each request's last token."""
    return torch.zeros(n, dtype=torch.long).scatter_reduce(0, owner, torch.arange(len(owner)), "amax", include_self=False)


def rolling_means(values: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Each token's mean with the ``WINDOW - 1`` tokens before it, within its request."""
    total = torch.cat([torch.zeros(1), values.cumsum(0)])
    index = torch.arange(len(values))
    first = torch.zeros(n, dtype=torch.long).scatter_reduce(0, owner, index, "amin", include_self=False)
    begin = torch.maximum(index - WINDOW + 1, first[owner])
    return (total[index + 1] - total[begin]) / (index - begin + 1).float()


def pooled(kind: str, scores: torch.Tensor, gates: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """The request logits of pooling ``kind`` (bias excluded) from token scores ``[t, 2]`` and attention logits."""
    first = scores[:, 0]
    if kind == "last":
        return first[last_of(owner, n)]
    if kind == "mean":
        return segment_mean(first, owner, n)
    if kind == "max":
        return segment_max(first, owner, n)
    if kind == "rolling-max":
        return segment_max(rolling_means(first, owner, n), owner, n)
    if kind == "attention":
        return attended(first, gates, owner, n)
    if kind == "last+max":
        return first[last_of(owner, n)] + segment_max(scores[:, 1], owner, n)
    if kind == "last+attention":
        return first[last_of(owner, n)] + attended(scores[:, 1], gates, owner, n)
    raise ValueError(f"unknown pooling {kind!r}")


POOLINGS = (
    "product",
    "last",
    "mean",
    "max",
    "rolling-max",
    "attention",
    "last+attention",
    "last+max",
    "product|attention",
    "product|last",
)


def pooling_fitter(kind: str, tokens: Tokens, seed: int = 0):
    """A ``gate_probes.Fitter`` over request indices (``x[:, 0]``) that fits pooling ``kind`` on their tokens."""
    if kind == "product":
        return lambda x, harmful, refused, sources: product_scorer(tokens, x, harmful, sources, seed)
    if "|" in kind:
        return lambda x, harmful, refused, sources: averaged(
            [pooling_fitter(k, tokens, seed)(x, harmful, refused, sources) for k in kind.split("|")], x
        )

    def fit(x: np.ndarray, harmful: np.ndarray, refused: np.ndarray, sources: np.ndarray):
        torch.manual_seed(seed)
        rows, owner = tokens.take(x[:, 0].astype(int))
        n = len(x)
        mean, scale = rows.mean(0), rows.std(0) + 1e-3
        inputs = (rows - mean) / scale
        weight = torch.zeros(rows.shape[1], 2, requires_grad=True)
        query = torch.zeros(rows.shape[1], requires_grad=True)
        bias = torch.zeros(1, requires_grad=True)
        targets = torch.tensor(harmful, dtype=torch.float32)
        sample = torch.tensor(balanced_weights(harmful, sources), dtype=torch.float32)
        optimizer = torch.optim.Adam([weight, query, bias], lr=0.01)
        for _ in range(STEPS):
            optimizer.zero_grad()
            logits = pooled(kind, inputs @ weight, inputs @ query, owner, n) + bias
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
            ((loss * sample).mean() + L2 * ((weight * weight).sum() + (query * query).sum())).backward()
            optimizer.step()

        def scorer(z: np.ndarray) -> np.ndarray:
            found, owners = tokens.take(z[:, 0].astype(int))
            with torch.no_grad():
                normed = (found - mean) / scale
                return (pooled(kind, normed @ weight, normed @ query, owners, len(z)) + bias).numpy()[:, None]

        return scorer

    return fit


@click.command()
@click.option("--model", "model_name", default=models.DEFAULT_MODEL, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layers", default="16", show_default=True, help="Comma-separated layers to read the tokens at.")
@click.option("--candidates", default=",".join(POOLINGS), show_default=True, help="Comma-separated poolings.")
@click.option("--out", default="gate_pooling", show_default=True)
def main(model_name: str, seed: int, layers: str, candidates: str, out: str) -> None:
    started = time.perf_counter()
    kinds = [c for c in candidates.split(",") if c]
    unknown = sorted(set(kinds) - set(POOLINGS))
    if unknown:
        raise click.BadParameter(f"unknown pooling(s) {', '.join(unknown)}; choose from {', '.join(POOLINGS)}")
    model_dir = models.resolve(model_name)
    requests = list(gate_requests(data.advbench(), Sizes(), seed=seed))
    product = frozenset(r.source for r in requests)
    unseen = unseen_requests(seed)
    everything = requests + [r for asked in unseen.values() for r in asked]
    read_at = parse_layers(layers)
    tokens = token_features(model_dir, everything, read_at)
    index = np.arange(len(everything), dtype=np.float64)[:, None]
    product_x, unseen_x = split_unseen(index, len(requests), unseen)
    fit, calibration = (np.asarray(part) for part in split(requests, seed=seed))
    results = {}
    for layer in read_at:
        for kind in kinds:
            name = f"{kind}@{layer}"
            fitter = pooling_fitter(kind, tokens[layer], seed)
            results[name] = score(fitter, product_x, unseen_x, requests, fit, calibration, product)
            print(name, results[name]["out_of_source_score"], json.dumps(results[name]["curve"]), flush=True)
    write_result(
        out,
        {
            "model": model_name,
            "layers": list(read_at),
            "read": "every token after the system turn",
            "window": WINDOW,
            "steps": STEPS,
            "l2": L2,
            "protocol": SWEEP_PROTOCOL,
            "candidates": results,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    plot_curves(results, RESULTS / f"{out}.png", title="Pooling the gate's read over the request's tokens")


if __name__ == "__main__":
    main()

"""The gate of a gated lock: a linear probe that tells a harmful request from a benign one, read once per request.

Feature: the input of layer ``c``'s attention block (the normalized residual stream) at the request's last prompt
token — the end of the generation prompt, where the model has read the whole chat as served (system prompt,
earlier turns). Fit on the aligned base over requests from several sources (``safetylock.sources``: imperative,
red-team, jailbreak-wrapped, multi-turn, borderline-safe, ...); ``c`` is the candidate layer whose gate
generalises best to a *held-out source* (leave-one-source-out), never the best in-distribution AUROC; the
threshold lets at most ``TARGET_FPR`` of the benign calibration requests (every benign kind) fire.

Semantics (the HF path and vLLM alike): a request whose score ``w·h + b`` exceeds the threshold is served at
``alpha_on``, every other request at ``alpha_off`` (default 0). Prompt tokens before the last one are never
shifted (their KV cache blocks are the plain model's, shareable by every request). The decision is made at
layer ``c`` of the last prompt token's forward, so there lock heads at layers after ``c`` are shifted and heads
at layers up to ``c`` are not (the decision never depends on the shift it controls); from the first generated
token on every lock head is shifted (``early_heads="generated"``). Locks written before that field existed
(``early_heads="never"``) shift only the heads after ``c``, on every token from the last prompt token on.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from safetylock.errors import ExtractError, LockError
from safetylock.overlap import containing, fingerprints
from safetylock.sources import Request, Sizes, gate_requests, operator_record, sizes_record, source_hashes, split
from safetylock.threads import one_thread_fits

if TYPE_CHECKING:
    from safetylock.data import PromptSet
    from safetylock.hf import Framing

TARGET_FPR = 0.05  # benign requests allowed to fire, on the calibration split
PRECISIONS = ("auto", "float32", "bfloat16")  # of the forward that computes gate features
REPORT_FPRS = (0.01, 0.05)  # leave-one-source-out TPR is reported at these false-positive rates
EARLY_HEADS = ("generated", "never")  # lock heads at or before the gate layer: shifted on generated tokens, or not

Chat = str | list[dict[str, str]]


@dataclass(frozen=True)
class Gate:
    """A fitted gate: fires when ``weight · h + bias > threshold`` for ``h`` the layer's attention-block input."""

    layer: int
    weight: torch.Tensor  # [hidden] float32
    bias: float
    threshold: float
    calibration: dict[str, Any] = field(default_factory=dict)
    early_heads: str = "generated"  # see the module docstring; "never" for locks written before this field

    def __post_init__(self) -> None:
        if self.early_heads not in EARLY_HEADS:
            raise LockError(f"gate early_heads must be one of {', '.join(EARLY_HEADS)}, got {self.early_heads!r}")

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of rows ``hidden[..., hidden_size]`` (float32)."""
        return hidden.float() @ self.weight.to(hidden.device) + self.bias

    def fires(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden) > self.threshold

    def shifts_on_prompt(self, layer: int) -> bool:
        """Whether lock heads at ``layer`` are shifted on the last prompt token (after the decision only)."""
        return layer > self.layer

    def shifts_when_generating(self, layer: int) -> bool:
        """Whether lock heads at ``layer`` are shifted on generated tokens."""
        return layer > self.layer or self.early_heads == "generated"

    def to_metadata(self) -> dict[str, Any]:
        meta = {"layer": self.layer, "bias": self.bias, "threshold": self.threshold, "calibration": self.calibration}
        return meta | ({"early_heads": self.early_heads} if self.early_heads != "never" else {})  # old bytes kept


def continues_assistant_turn(ids: Sequence[int], header: Sequence[int]) -> bool:
    """Whether a prompt holds the chat's generation prompt ``header`` (``hf.generation_header``) but does not end
    with it: it pre-fills an assistant turn (``continue_final_message``, or a raw prompt written that way), so its
    last token is not the one the gate was fit to read."""
    width = len(header)
    if not width or len(ids) < width or list(ids[-width:]) == list(header):
        return False
    tokens = np.asarray(ids)
    starts = np.flatnonzero(tokens[: len(tokens) - width] == header[0])
    return any(list(ids[i : i + width]) == list(header) for i in starts)


def attention_blocks(model: torch.nn.Module, num_layers: int) -> list[torch.nn.Module]:
    """Each decoder layer's attention block (the parent of its ``o_proj``), in layer order."""
    from safetylock.geometry import output_projection_layer

    found: dict[int, torch.nn.Module] = {}
    modules = dict(model.named_modules())
    for name in modules:
        layer = output_projection_layer(name)
        if layer is not None:
            found.setdefault(layer, modules[name.rpartition(".")[0]])
    return [found[i] for i in range(num_layers)]


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states an attention block is called with (HF passes them by keyword, vLLM by either)."""
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return max((a for a in args if isinstance(a, torch.Tensor)), key=lambda a: a.dim())  # vLLM: (positions, hidden)


def feature_precision(requested: str = "auto") -> str:
    """The precision gate features are computed in: ``auto`` is bfloat16 where the CPU multiplies it natively (AMX
    or AVX-512 BF16; three times faster than float32 on an AMX host, decisions equal to float32 features' on 99% of
    the gate's requests) and float32 elsewhere, where bfloat16 is emulated and slower."""
    if requested not in PRECISIONS:
        raise ExtractError(f"gate precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        return requested
    native = [getattr(torch.cpu, name, lambda: False) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return "bfloat16" if any(check() for check in native) else "float32"


class _Enough(Exception):
    """Raised by the deepest recording hook: the rest of the forward is not needed."""


def length_batches(order: Sequence[int], lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """``order`` (indices by increasing length) cut into batches of at most ``batch_tokens`` padded tokens (a
    longer chat is a batch of its own)."""
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[index] <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@torch.no_grad()
def prompt_features(
    model,
    tokenizer,
    prompts: Sequence[Chat],
    layers: Sequence[int],
    batch_tokens: int = 1024,
    progress: bool = False,
    framing: Framing | None = None,
    precision: str = "float32",
    share_prefixes: bool = True,
) -> dict[int, np.ndarray]:
    """``{layer: [prompts, hidden]}``: each layer's attention-block input at each chat's last token (a prompt is
    one user turn, sent as ``framing`` sends it when given, or a list of chat messages). With ``share_prefixes``,
    chats that share a prefix (a system prompt, a jailbreak template's opening, an earlier turn) are forwarded after
    that prefix, forwarded once (``safetylock.hf.prefix_runs``; the same features to float rounding; on the gate's
    requests 66% of the tokens, 20-30% less time on an AVX2 CPU); the others in batches of similar length. Batches
    hold up to ``batch_tokens`` padded tokens. The forward stops after the deepest layer asked for; ``precision``
    as ``feature_precision`` resolves it (features are float32 either way)."""
    from transformers import DynamicCache

    from safetylock.geometry import head_geometry
    from safetylock.hf import PrefixRun, chat_ids, pad_batch, prefix_runs

    blocks = attention_blocks(model, head_geometry(model.config).num_layers)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chats = [framing.messages(p) if framing and isinstance(p, str) else p for p in prompts]
    ids = [chat_ids(tokenizer, chat) for chat in chats]
    rows: dict[int, np.ndarray] = {layer: np.zeros((len(ids), model.config.hidden_size), np.float32) for layer in layers}
    reading: dict[str, Any] = {"members": [], "last": None}  # the batch in the forward: rows, last real positions
    deepest = max(layers)

    def recorder(layer: int):
        def hook(_module, args, kwargs):
            if reading["members"]:
                hidden = block_input(args, kwargs)
                last = reading["last"]
                picked = hidden[:, -1] if last is None else hidden[torch.arange(len(last)), last]
                rows[layer][reading["members"]] = picked.float().cpu().numpy()
            if layer == deepest:
                raise _Enough

        return hook

    runs = prefix_runs(ids) if share_prefixes else [PrefixRun(0, list(range(len(ids))))]
    pooled = sorted((i for run in runs if not run.prefix for i in run.members), key=lambda i: len(ids[i]))
    work: list[tuple[int, list[int]]] = [(0, batch) for batch in length_batches(pooled, [len(i) for i in ids], batch_tokens)]
    for run in (run for run in runs if run.prefix):
        members = sorted(run.members, key=lambda i: len(ids[i]))
        rest = [len(ids[i]) - run.prefix for i in members]
        work += [(run.prefix, [members[j] for j in batch]) for batch in length_batches(range(len(members)), rest, batch_tokens)]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    precision = feature_precision(precision)
    device = next(model.parameters()).device.type
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    handles = [blocks[layer].register_forward_pre_hook(recorder(layer), with_kwargs=True) for layer in set(layers)]
    held: tuple[tuple[int, ...], Any] = ((), None)  # the last shared prefix and its key/values
    try:
        with autocast:  # entered once: autocast casts each weight once per entry, not once per batch
            for prefix, members in tqdm(work, desc="gate features", disable=not progress):
                if not prefix:
                    batch, mask = pad_batch([ids[i] for i in members], pad_id, "left")
                    reading.update(members=members, last=None)
                    positions = (mask.cumsum(1) - 1).clamp(min=0)
                    with contextlib.suppress(_Enough):
                        decoder(input_ids=batch, attention_mask=mask, position_ids=positions, use_cache=False)
                    continue
                shared = tuple(ids[members[0]][:prefix])
                if held[0] != shared:  # its key/values up to the deepest layer read, once (a run's batches follow)
                    held = (shared, DynamicCache(config=model.config))
                    reading.update(members=[], last=None)
                    with contextlib.suppress(_Enough):
                        decoder(input_ids=torch.tensor([shared]), past_key_values=held[1], use_cache=True)
                cache = copy.deepcopy(held[1])
                cache.batch_repeat_interleave(len(members))
                batch, mask = pad_batch([ids[i][prefix:] for i in members], pad_id, "right")
                reading.update(members=members, last=mask.sum(1) - 1)
                mask = torch.cat([torch.ones(len(members), prefix, dtype=mask.dtype), mask], 1)
                positions = prefix + torch.arange(batch.shape[1]).expand_as(batch)
                with contextlib.suppress(_Enough):
                    decoder(input_ids=batch, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    return float(roc_auc_score(labels, np.r_[positive, negative]))


def roc_points(positive: np.ndarray, negative: np.ndarray, points: int = 25) -> list[list[float]]:
    """[[fpr, tpr], ...] of the ROC curve, at most ``points`` of them (for the lock file and its plot)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.r_[np.ones(len(positive)), np.zeros(len(negative))], np.r_[positive, negative])
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(points, len(fpr))).round().astype(int))
    return [[round(float(fpr[i]), 4), round(float(tpr[i]), 4)] for i in keep]


def balanced_weights(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Sample weights that give every (source, label) stratum the same total weight (mean weight 1): a source with
    300 requests counts no more than one with 24, so the gate learns what the sources share."""
    weights = np.ones(len(labels))
    for group in np.unique(groups):
        for label in (True, False):
            members = (groups == group) & (labels == label)
            if members.any():
                weights[members] = 1.0 / members.sum()
    return weights * len(labels) / weights.sum()


def fit_linear(x: np.ndarray, labels: np.ndarray, groups: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """Logistic regression on standardized features, each source weighted alike (``balanced_weights``), folded
    back to raw features: (weight, bias)."""
    from sklearn.linear_model import LogisticRegression

    x = x.astype(np.float64)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=0.05, max_iter=5000, random_state=seed)
    with one_thread_fits():
        clf.fit((x - mean) / scale, labels, sample_weight=balanced_weights(labels, groups))
    weight = clf.coef_[0] / scale
    return weight, float(clf.intercept_[0] - weight @ mean)


def threshold_at(benign_scores: np.ndarray, fpr: float) -> float:
    """The score above which at most ``fpr`` of ``benign_scores`` lie."""
    return float(np.quantile(benign_scores, 1 - fpr))


def candidate_layers(num_layers: int, count: int = 10) -> list[int]:
    """About ``count`` layers spread from a sixth of the depth to the second-to-last (every layer of a small model)."""
    first, last = num_layers // 6, num_layers - 2
    if last < first:
        raise ExtractError(f"a {num_layers}-layer model has no layer for a gate")
    step = max(1, round((last - first) / max(1, count - 1)))
    return sorted({*range(first, last + 1, step), last})


@dataclass(frozen=True)
class Heldout:
    """One source scored by a gate fit without it: TPR on its harmful and FPR on its benign requests at thresholds
    set on the *other* sources' benign calibration requests, and AUROC against those."""

    source: str
    harmful: int
    benign: int
    tpr: dict[str, float]  # "1%", "5%" -> rate (harmful requests only)
    fpr: dict[str, float]  # same thresholds, benign requests
    auroc: float | None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def _rate(values: np.ndarray, threshold: float) -> float:
    return round(float((values > threshold).mean()), 4) if len(values) else float("nan")


def seen_masks(requests: Sequence[Request]) -> dict[str, np.ndarray]:
    """Per source: which requests hold it out — its own, and those of other sources that contain one of its texts."""
    sources = np.array([r.source for r in requests])
    texts = [r.text for r in requests]
    return {
        held: (sources == held) | np.array(containing(texts, [t for t, s in zip(texts, sources) if s == held]))
        for held in sorted(set(sources.tolist()))
    }


def gate_without(
    features: np.ndarray,
    requests: Sequence[Request],
    fit: Sequence[int],
    calibration: Sequence[int],
    held: str,
    seed: int,
    seen: dict[str, np.ndarray],
) -> tuple[np.ndarray, float, np.ndarray]:
    """A gate fit without source ``held`` (nor any request holding one of its texts): (weight, bias, the scores of
    the other sources' benign calibration requests, where its thresholds are set)."""
    labels = np.array([r.harmful for r in requests])
    sources = np.array([r.source for r in requests])
    fit, calibration = np.asarray(fit), np.asarray(calibration)
    unseen = ~seen[held]
    train = fit[unseen[fit]]
    if len(set(labels[train].tolist())) < 2:
        raise ExtractError(
            f"without source {held!r} and the requests that contain its texts, no harmful and benign requests "
            "are left to fit a gate on: give each source its own requests"
        )
    weight, bias = fit_linear(features[train], labels[train], sources[train], seed)
    others = calibration[unseen[calibration] & ~labels[calibration]]
    return weight, bias, features[others] @ weight + bias


def leave_one_source_out(
    features: np.ndarray,
    requests: Sequence[Request],
    fit: Sequence[int],
    calibration: Sequence[int],
    seed: int = 0,
    seen: dict[str, np.ndarray] | None = None,
) -> list[Heldout]:
    """For each source: fit on the fit split of every other source, threshold on their benign calibration
    requests, score every request of the held-out source (fit and calibration alike). Requests of other sources
    that contain a held-out request's text (a multi-turn chat ending in it, a wrapper around it) are left out of
    the fit and the threshold too: the held-out source is never seen, not even wrapped (``seen_masks``; pass them
    when calling once per layer: they do not depend on the features)."""
    labels = np.array([r.harmful for r in requests])
    sources = np.array([r.source for r in requests])
    seen = seen_masks(requests) if seen is None else seen
    out = []
    for held in sorted(set(sources.tolist())):
        weight, bias, negatives = gate_without(features, requests, fit, calibration, held, seed, seen)
        thresholds = {f"{round(100 * f)}%": threshold_at(negatives, f) for f in REPORT_FPRS}
        scores = features[sources == held] @ weight + bias
        positive, negative = scores[labels[sources == held]], scores[~labels[sources == held]]
        out.append(
            Heldout(
                held,
                len(positive),
                len(negative),
                {k: _rate(positive, t) for k, t in thresholds.items()} if len(positive) else {},
                {k: _rate(negative, t) for k, t in thresholds.items()} if len(negative) else {},
                round(auroc(positive, negatives), 4) if len(positive) else None,
            )
        )
    return out


def out_of_source_score(rows: Sequence[Heldout]) -> float:
    """What picks the gate layer: mean held-out TPR at 5% FPR over sources with harmful requests, minus mean
    held-out FPR at that threshold over sources with benign ones."""
    tpr = [r.tpr["5%"] for r in rows if r.harmful]
    fpr = [r.fpr["5%"] for r in rows if r.benign]
    return float(np.mean(tpr) - (np.mean(fpr) if fpr else 0.0))


def fit_gate(
    model,
    tokenizer,
    requests: Sequence[Request],
    layers: Sequence[int],
    seed: int = 0,
    progress: bool = True,
    precision: str = "auto",
    data_sizes: Sizes | None = None,
    operator: Sequence[Request] = (),
) -> tuple[Gate, dict[int, list[Heldout]]]:
    """The gate at the layer of ``layers`` that generalises best to held-out sources (``out_of_source_score``),
    refit on every source's fit split, threshold at ``TARGET_FPR`` of all benign calibration requests; also
    every layer's leave-one-source-out table. Features in ``precision`` (``feature_precision``); ``data_sizes``
    and ``operator``: the ``Sizes`` and operator requests that ``requests`` were built with (``gate_requests``),
    recorded for re-calibration."""
    if len({r.source for r in requests}) < 2 or len({r.harmful for r in requests}) < 2:
        raise ExtractError("the gate needs harmful and benign requests from at least two sources")
    precision = feature_precision(precision)
    chats = [r.messages() for r in requests]
    features = prompt_features(model, tokenizer, chats, layers, progress=progress, precision=precision)
    gate, tables = gate_from_features(features, requests, seed, progress, data_sizes, operator)
    return replace(gate, calibration={**gate.calibration, "precision": precision}), tables


def gate_from_features(
    features: dict[int, np.ndarray],
    requests: Sequence[Request],
    seed: int = 0,
    progress: bool = False,
    data_sizes: Sizes | None = None,
    operator: Sequence[Request] = (),
) -> tuple[Gate, dict[int, list[Heldout]]]:
    """``fit_gate`` on features already computed (``{layer: [requests, hidden]}``, rows in request order)."""
    layers = sorted(features)
    fit_arr, cal_arr = split(requests, seed=seed)
    seen = seen_masks(requests)
    tables = {
        layer: leave_one_source_out(features[layer], requests, fit_arr, cal_arr, seed, seen)
        for layer in tqdm(layers, desc="gate layers (leave one source out)", disable=not progress)
    }
    best = max(layers, key=lambda layer: (round(out_of_source_score(tables[layer]), 6), layer))
    x = features[best]
    labels, groups = np.array([r.harmful for r in requests]), np.array([r.source for r in requests])
    weight, bias = fit_linear(x[fit_arr], labels[fit_arr], groups[fit_arr], seed)
    scores = x @ weight + bias
    benign_cal, harmful_cal = scores[cal_arr[~labels[cal_arr]]], scores[cal_arr[labels[cal_arr]]]
    threshold = threshold_at(benign_cal, TARGET_FPR)
    by_source = {}
    for source in sorted({r.source for r in requests}):
        chosen = cal_arr[np.array([requests[i].source == source for i in cal_arr])]
        by_source[source] = {"harmful": _rate(scores[chosen[labels[chosen]]], threshold) if labels[chosen].any() else None}
        by_source[source]["benign"] = _rate(scores[chosen[~labels[chosen]]], threshold) if (~labels[chosen]).any() else None
    calibration = {
        "auroc": round(auroc(harmful_cal, benign_cal), 4),
        "target_fpr": TARGET_FPR,
        "fpr": _rate(benign_cal, threshold),
        "tpr": _rate(harmful_cal, threshold),
        "sizes": {"fit": len(fit_arr), "calibration": len(cal_arr), "requests": len(requests)},
        "data": source_hashes(requests),
        **({"data_sizes": sizes_record(data_sizes)} if data_sizes is not None else {}),
        **({"operator_requests": operator_record(operator)} if operator else {}),
        "fit_prompts": fingerprints(r.text for r in requests),  # fit and calibration alike (safetylock.overlap)
        "firing_by_source": by_source,
        "layer_selection": "leave-one-source-out: mean held-out TPR at 5% FPR minus mean held-out FPR",
        "layer_score": {str(layer): round(out_of_source_score(t), 4) for layer, t in tables.items()},
        "heldout_sources": [row.to_dict() for row in tables[best]],
        "roc": roc_points(harmful_cal, benign_cal),
        "set_on": "calibration split of every source through the base model",
    }
    gate = Gate(best, torch.from_numpy(weight.astype(np.float32)), bias, threshold, calibration)
    return gate, tables


def recalibrate(
    model,
    tokenizer,
    gate: Gate,
    benign: Sequence[Chat],
    fpr: float = TARGET_FPR,
    served: str = "served model",
    framing: Framing | None = None,
) -> Gate:
    """The same gate with its threshold set on ``benign`` requests run through ``model`` (the served weights), sent
    as ``framing`` sends them (the served system prompt and prefix) when given."""
    features = prompt_features(model, tokenizer, benign, [gate.layer], framing=framing)[gate.layer]
    threshold = threshold_at(features @ gate.weight.numpy() + gate.bias, fpr)
    calibration = served_record(gate, served, len(benign), fpr, framing)
    return Gate(gate.layer, gate.weight, gate.bias, threshold, calibration, gate.early_heads)


def served_record(
    gate: Gate, served: str, benign: int, target_fpr: float, framing: Framing | None, **figures: Any
) -> dict[str, Any]:
    """``gate``'s calibration record with where its threshold was set on a served model (``recalibrate``,
    ``refit``): the model, how many benign requests, the target rate, the framing when there was one."""
    record = {**gate.calibration, "set_on": served, "served_benign": benign, "target_fpr": target_fpr, **figures}
    return record | ({"framing": framing.record()} if framing and framing.record() else {})


def as_served(request: Request) -> Chat:
    """A gate request as a served deployment receives it: a single turn as its text alone (the served framing adds
    its own system prompt), a multi-turn chat as its turns; the request's own system prompt is dropped."""
    turns = [m for m in request.messages() if m["role"] != "system"]
    return turns[0]["content"] if len(turns) == 1 else turns


def benign_calibration(
    harmful: PromptSet, seed: int = 0, sizes: Sizes | None = None, operator: Sequence[Request] = ()
) -> list[Chat]:
    """The benign calibration requests of the gate's data (every benign kind; ``sizes`` and ``operator``: the data
    the gate was fit on), as served (``as_served``): what ``recalibrate`` runs through a served fine-tune."""
    requests = gate_requests(harmful, sizes or Sizes(), seed=seed, operator=operator)
    _, calibration = split(requests, seed=seed)
    return [as_served(requests[i]) for i in calibration if not requests[i].harmful]


def refit(
    model,
    tokenizer,
    gate: Gate,
    requests: Sequence[Request],
    fpr: float = TARGET_FPR,
    served: str = "served model",
    framing: Framing | None = None,
    seed: int = 0,
    precision: str = "auto",
) -> Gate:
    """The gate refit on the served weights: at the gate's layer, its weights fit again (as the base's were, each
    source weighted alike) on the gate's ``requests`` (``gate_requests``, as extract builds them) run through
    ``model`` as served (``as_served``, sent as ``framing`` sends them), threshold at ``fpr`` of their benign
    calibration split. A fine-tune can move edgy benign requests up with harmful ones along the base's gate
    direction while the two stay linearly apart: a threshold alone cannot follow that, a refit probe can. The
    layer, the data and the split stay the base's; features in ``precision`` (``feature_precision``)."""
    fit, calibration = split(requests, seed=seed)
    chats = [as_served(r) for r in requests]
    precision = feature_precision(precision)
    x = prompt_features(model, tokenizer, chats, [gate.layer], framing=framing, precision=precision)[gate.layer]
    labels, groups = np.array([r.harmful for r in requests]), np.array([r.source for r in requests])
    weight, bias = fit_linear(x[fit], labels[fit], groups[fit], seed)
    scores = x @ weight + bias
    benign_cal, harmful_cal = scores[calibration[~labels[calibration]]], scores[calibration[labels[calibration]]]
    threshold = threshold_at(benign_cal, fpr)
    record = served_record(
        gate,
        served,
        len(benign_cal),
        fpr,
        framing,
        refit_on=served,
        precision=precision,
        auroc=round(auroc(harmful_cal, benign_cal), 4),
        fpr=_rate(benign_cal, threshold),
        tpr=_rate(harmful_cal, threshold),
        roc=roc_points(harmful_cal, benign_cal),
    )
    weights = torch.from_numpy(weight.astype(np.float32))
    return Gate(gate.layer, weights, bias, threshold, record, gate.early_heads)

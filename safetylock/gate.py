"""The gate of a gated lock: a linear probe that tells a harmful request from a benign one, read once per request.

Feature: the input of layer ``c``'s attention block (the normalized residual stream) at the request's last prompt
token — the end of the generation prompt, where the model has read the whole chat as served (system prompt,
earlier turns). Fit on the aligned base over requests from several sources (``safetylock.sources``: imperative,
red-team, jailbreak-wrapped, multi-turn, borderline-safe, ...); ``c`` is the candidate layer whose gate
generalises best to a *held-out source* (leave-one-source-out), never the best in-distribution AUROC; the
threshold lets at most ``TARGET_FPR`` of the benign calibration requests (every benign kind) fire.

A gate may also *pool* its read over the request's tokens (``read="attention"``, ``Pooling``): its score is then
``w·h_last + b + Σ_t softmax(q·h)_t u·h_t`` over the prompt tokens after the system turn (the user's turns, earlier
assistant turns and the closing template), the sum of the last-token probe and an attention probe (each fit on
the gate's requests, standardised on them and averaged, folded into ``w``, ``u``, ``q`` and ``b``): an attention
probe catches a harmful phrase anywhere in the request, the last token what the model concluded from the whole.

Semantics (the HF path and vLLM alike): a request whose score exceeds the threshold is served at
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from safetylock.errors import ExtractError, LockError
from safetylock.hf import (
    Framing,
    PrefixRun,
    autocast,
    chat_ids,
    common_prefix,
    forward_precision,
    pad_batch,
    prefix_runs,
)
from safetylock.overlap import containing, fingerprints
from safetylock.sources import (
    Request,
    Sizes,
    gate_requests,
    operator_record,
    recorded_sizes,
    sizes_record,
    source_hashes,
    split,
)
from safetylock.threads import one_thread_fits

if TYPE_CHECKING:
    from safetylock.data import PromptSet

TARGET_FPR = 0.05  # benign requests allowed to fire, on the calibration split
REPORT_FPRS = (0.01, 0.05)  # leave-one-source-out TPR is reported at these false-positive rates
EARLY_HEADS = ("generated", "never")  # lock heads at or before the gate layer: shifted on generated tokens, or not
READS = ("last", "attention")  # the last prompt token alone; or with an attention probe over the request's tokens
DEFAULT_READ = "attention"  # reaches more unseen phrasings at an over-refusal within bounds (docs/gated.md)
POOL_STEPS = 300  # full-batch Adam steps of the attention probe's fit
POOL_L2 = 0.01  # on its standardised weights (logistic regression's C 0.05 at the gate's data size is about 0.011)
# One such fit is unstable: on the default model's gate data, its token rows jittered by 1% (bfloat16's rounding is
# about that), or a random start instead of zero, move its vectors to cosine 0.42-0.92 of the plain fit's, and its
# firing on unseen past-tense requests over 63-80%, on advice questions over 18-34%. The attention probe is the mean
# of POOL_DRAWS fits from seeded random starts (Gaussian, POOL_START on standardised weights), run side by side in one
# product with the token rows (read once a step for all of them: 16 draws cost about what one does); two such means
# agree at cosine 0.94-0.96 (benchmarks/results/gate_attention_stability.json).
POOL_DRAWS = 16
POOL_START = 0.01
# Padded tokens per batch of the gate's feature forwards: on 2 cores, 512 runs 10-13% faster than 1,024 (bfloat16 and
# float32 alike) and as fast as 256 or 384 (benchmarks/README.md, "Extraction").
BATCH_TOKENS = 512

Chat = str | list[dict[str, str]]


def system_turn(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The token ids that open and close a system turn in ``tokenizer``'s chat template (ChatML:
    ``<|im_start|>system\n`` and ``<|im_end|>\n``); ((), ()) where the template renders no system turn alone."""
    try:
        rendered = [
            list(tokenizer.apply_chat_template([{"role": "system", "content": text}], return_dict=True)["input_ids"])
            for text in ("alpha", "beta gamma", "7")
        ]
    except Exception:  # a template without a system role
        return (), ()
    first = rendered[0]
    head = min(common_prefix(first, other) for other in rendered[1:])
    tail = min(common_prefix(first[::-1], other[::-1]) for other in rendered[1:])
    return tuple(first[:head]), tuple(first[len(first) - tail :])


def pooled_from(ids: Sequence[int], head: Sequence[int], end: Sequence[int]) -> int:
    """The first position an attention-pooled gate reads in prompt ``ids``: after the system turn (opened by
    ``head``, closed by the first ``end`` after it) when the prompt opens with one, else 0; never past the last."""
    head, end = list(head), list(end)
    if not head or not end or list(ids[: len(head)]) != head:
        return 0
    for i in range(len(head), len(ids) - len(end) + 1):
        if list(ids[i : i + len(end)]) == end:
            return min(i + len(end), len(ids) - 1)
    return 0


@dataclass(frozen=True)
class Pooling:
    """A gate's attention-pooled read: ``Σ_t softmax(query·h)_t weight·h_t`` over the prompt tokens after the
    system turn (``start``), ``h`` the gate layer's attention-block input."""

    weight: torch.Tensor  # [hidden] float32: each token's score
    query: torch.Tensor  # [hidden] float32: each token's attention logit
    system_head: tuple[int, ...] = ()  # the ids that open a system turn (``system_turn``)
    system_end: tuple[int, ...] = ()  # and close it

    def start(self, ids: Sequence[int]) -> int:
        """The first pooled position of a prompt (``pooled_from``)."""
        return pooled_from(ids, self.system_head, self.system_end)

    def pooled(self, hidden: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Per row of ``hidden[rows, tokens, hidden_size]``: the pooled score over positions ``>= start[row]``."""
        hidden = hidden.float()
        logits = hidden @ self.query.to(hidden.device)
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] >= start.to(hidden.device)[:, None]
        weights = torch.softmax(logits.masked_fill(~keep, -torch.inf), dim=1)
        return (weights * (hidden @ self.weight.to(hidden.device))).sum(1)

    def to_metadata(self) -> dict[str, Any]:
        return {"system_head": list(self.system_head), "system_end": list(self.system_end)}


@dataclass(frozen=True)
class Gate:
    """A fitted gate: fires when ``weight · h + bias (+ the pooled read) > threshold`` for ``h`` the layer's
    attention-block input at the last prompt token."""

    layer: int
    weight: torch.Tensor  # [hidden] float32
    bias: float
    threshold: float
    calibration: dict[str, Any] = field(default_factory=dict)
    early_heads: str = "generated"  # see the module docstring; "never" for locks written before this field
    pooling: Pooling | None = None  # read "attention": the pooled read added to the last token's score

    def __post_init__(self) -> None:
        if self.early_heads not in EARLY_HEADS:
            raise LockError(f"gate early_heads must be one of {', '.join(EARLY_HEADS)}, got {self.early_heads!r}")

    @property
    def read(self) -> str:
        return "last" if self.pooling is None else "attention"

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last-token part of the score of rows ``hidden[..., hidden_size]`` (float32): the whole score of a
        ``last`` gate."""
        return hidden.float() @ self.weight.to(hidden.device) + self.bias

    def request_scores(self, hidden: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of prompts ``hidden[rows, tokens, hidden_size]`` whose last position is the last prompt token;
        ``start[row]``: the first pooled position (``Pooling.start`` in these coordinates, left padding counted)."""
        score = self.score(hidden[:, -1])
        if self.pooling is None:
            return score
        if start is None:
            raise LockError("an attention-pooled gate needs each prompt's first pooled position")
        return score + self.pooling.pooled(hidden, start)

    def fires(self, hidden: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """Decisions of prompts ``hidden[rows, tokens, hidden_size]`` (``request_scores``)."""
        return self.request_scores(hidden, start) > self.threshold

    def shifts_on_prompt(self, layer: int) -> bool:
        """Whether lock heads at ``layer`` are shifted on the last prompt token (after the decision only)."""
        return layer > self.layer

    def shifts_when_generating(self, layer: int) -> bool:
        """Whether lock heads at ``layer`` are shifted on generated tokens."""
        return layer > self.layer or self.early_heads == "generated"

    def to_metadata(self) -> dict[str, Any]:
        meta = {"layer": self.layer, "bias": self.bias, "threshold": self.threshold, "calibration": self.calibration}
        meta |= {"early_heads": self.early_heads} if self.early_heads != "never" else {}  # old bytes kept
        return meta | ({"read": "attention", "pooling": self.pooling.to_metadata()} if self.pooling is not None else {})


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


def check_read(read: str) -> None:
    """ExtractError unless ``read`` is one of ``READS``."""
    if read not in READS:
        raise ExtractError(f"gate read must be one of {', '.join(READS)}, got {read!r}")


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


def prompt_features(
    model,
    tokenizer,
    prompts: Sequence[Chat],
    layers: Sequence[int],
    batch_tokens: int = BATCH_TOKENS,
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
    as ``forward_precision`` resolves it (features are float32 either way)."""
    args = (model, tokenizer, prompts, layers, None, batch_tokens, progress, framing, precision, share_prefixes)
    return prompt_reads(*args)[0]


def prompt_tokens(
    model,
    tokenizer,
    prompts: Sequence[Chat],
    layer: int,
    system: tuple[Sequence[int], Sequence[int]],
    progress: bool = False,
    framing: Framing | None = None,
    precision: str = "float32",
) -> list[np.ndarray]:
    """Per chat: ``layer``'s attention-block input at every position an attention-pooled gate reads
    (``pooled_from`` with ``system``'s head and end ids), ``[positions, hidden]``, the last row the last prompt
    token (``prompt_reads``)."""
    reads = prompt_reads(model, tokenizer, prompts, [layer], system, progress=progress, framing=framing, precision=precision)
    return reads[1][layer]


@torch.no_grad()
def prompt_reads(
    model,
    tokenizer,
    prompts: Sequence[Chat],
    layers: Sequence[int],
    system: tuple[Sequence[int], Sequence[int]] | None = None,
    batch_tokens: int = BATCH_TOKENS,
    progress: bool = False,
    framing: Framing | None = None,
    precision: str = "float32",
    share_prefixes: bool = True,
) -> tuple[dict[int, np.ndarray], dict[int, list[np.ndarray]]]:
    """``prompt_features``, and with ``system`` (a system turn's head and end ids) in the same forward each chat's
    rows at every position an attention-pooled gate reads (``pooled_from``; float16, the last row the last prompt
    token): ``{layer: [positions, hidden] per chat}``, {} without ``system``."""
    from transformers import DynamicCache

    from safetylock.geometry import head_geometry

    blocks = attention_blocks(model, head_geometry(model.config).num_layers)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chats = [framing.messages(p) if framing and isinstance(p, str) else p for p in prompts]
    ids = [chat_ids(tokenizer, chat) for chat in chats]
    rows: dict[int, np.ndarray] = {layer: np.zeros((len(ids), model.config.hidden_size), np.float32) for layer in layers}
    starts = [pooled_from(i, *system) for i in ids] if system is not None else None
    tokens: dict[int, list[np.ndarray]] = {layer: [np.empty(0)] * len(ids) for layer in layers} if starts else {}
    # the batch in the forward: its requests, their last real positions (right padding), the shared prefix's length
    reading: dict[str, Any] = {"members": [], "last": None, "prefix": 0, "prefix_rows": {}}
    deepest = max(layers)

    def keep_tokens(layer: int, hidden: torch.Tensor) -> None:
        members, prefix = reading["members"], reading["prefix"]
        if not members and prefix:  # the shared prefix's own forward: its rows, for the members that follow
            reading["prefix_rows"][layer] = hidden[0].to(torch.float16).cpu()
        for row, index in enumerate(members):
            first = starts[index]
            if not prefix:  # left padding
                kept = hidden[row, hidden.shape[1] - len(ids[index]) + first :]
            else:
                own = hidden[row, max(0, first - prefix) : len(ids[index]) - prefix]
                kept = torch.cat([reading["prefix_rows"][layer][first:prefix].to(own.device, own.dtype), own])
            tokens[layer][index] = kept.to(torch.float16).cpu().numpy()

    def recorder(layer: int):
        def hook(_module, args, kwargs):
            hidden = block_input(args, kwargs)
            if reading["members"]:
                last = reading["last"]
                picked = hidden[:, -1] if last is None else hidden[torch.arange(len(last)), last]
                rows[layer][reading["members"]] = picked.float().cpu().numpy()
            if tokens:
                keep_tokens(layer, hidden)
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
    handles = [blocks[layer].register_forward_pre_hook(recorder(layer), with_kwargs=True) for layer in set(layers)]
    held: tuple[tuple[int, ...], Any] = ((), None)  # the last shared prefix and its key/values
    try:
        with autocast(model, precision):
            for prefix, members in tqdm(work, desc="gate features", disable=not progress):
                if not prefix:
                    batch, mask = pad_batch([ids[i] for i in members], pad_id, "left")
                    reading.update(members=members, last=None, prefix=0)
                    positions = (mask.cumsum(1) - 1).clamp(min=0)
                    with contextlib.suppress(_Enough):
                        decoder(input_ids=batch, attention_mask=mask, position_ids=positions, use_cache=False)
                    continue
                shared = tuple(ids[members[0]][:prefix])
                if held[0] != shared:  # its key/values up to the deepest layer read, once (a run's batches follow)
                    held = (shared, DynamicCache(config=model.config))
                    reading.update(members=[], last=None, prefix=prefix)
                    with contextlib.suppress(_Enough):
                        decoder(input_ids=torch.tensor([shared]), past_key_values=held[1], use_cache=True)
                cache = copy.deepcopy(held[1])
                cache.batch_repeat_interleave(len(members))
                batch, mask = pad_batch([ids[i][prefix:] for i in members], pad_id, "right")
                reading.update(members=members, last=mask.sum(1) - 1, prefix=prefix)
                mask = torch.cat([torch.ones(len(members), prefix, dtype=mask.dtype), mask], 1)
                positions = prefix + torch.arange(batch.shape[1]).expand_as(batch)
                with contextlib.suppress(_Enough):
                    decoder(input_ids=batch, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    return rows, tokens


def _segments(tokens: Sequence[np.ndarray], members: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The token rows of requests ``members`` stacked (float32) and, per row, its request's place in ``members``."""
    stacked = torch.from_numpy(np.concatenate([tokens[i] for i in members]).astype(np.float32))
    owner = torch.repeat_interleave(torch.arange(len(members)), torch.tensor([len(tokens[i]) for i in members]))
    return stacked, owner


def attended(values: torch.Tensor, logits: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Per request: the mean of ``values`` over its tokens, weighted by the softmax of their ``logits`` (rows are
    tokens; further columns, if any, are pooled side by side)."""
    shape = (n, *values.shape[1:])
    index = owner.view(-1, *(1,) * (values.dim() - 1)).expand_as(logits)
    top = torch.full(shape, -torch.inf).scatter_reduce(0, index, logits.detach(), "amax", include_self=True)
    weights = torch.exp(logits - top[owner])
    return torch.zeros(shape).index_add(0, owner, weights * values) / torch.zeros(shape).index_add(0, owner, weights)


def fit_attention(
    tokens: Sequence[np.ndarray],
    labels: np.ndarray,
    groups: np.ndarray,
    members: np.ndarray,
    seed: int = 0,
    draws: int = POOL_DRAWS,
    start: float = POOL_START,
) -> tuple[np.ndarray, np.ndarray, float]:
    """An attention probe on requests ``members``: token scores ``u·h`` pooled by ``softmax(q·h)``, fit end to end
    on the requests' labels, the mean of ``draws`` fits (``fit_attention_draws``) from Gaussian starts of scale
    ``start`` (seeded by ``seed``; one draw from zero is the plain fit): (u, q, bias) on raw features."""
    rows, owner = _segments(tokens, members)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randn(rows.shape[1], 2, draws, generator=generator).mul_(start)
    u, q, bias = fit_attention_draws(rows, owner, labels[members], groups[members], starts)
    return u.mean(1), q.mean(1), float(bias.mean())


def fit_attention_draws(
    rows: torch.Tensor, owner: torch.Tensor, labels: np.ndarray, groups: np.ndarray, starts: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attention probes on token ``rows`` owned by requests (``owner``: each row's request; ``labels``, ``groups``
    per request), one per draw of ``starts`` (standardised ``[feature, (u, q), draw]``), each fit as if alone:
    logistic loss, each source weighted alike, ``POOL_STEPS`` full-batch Adam steps, L2 ``POOL_L2`` on standardised
    features, folded back to raw features: (u, q, bias), a column per draw. The draws share one product with the
    rows a step (the fit is memory-bound on reading them)."""
    mean, scale = rows.mean(0), rows.std(0) + 1e-3
    inputs = (rows - mean) / scale
    n, draws = len(labels), starts.shape[2]
    vectors = starts.reshape(len(mean), 2 * draws).clone().requires_grad_(True)  # columns: (u, q) of each draw
    bias = torch.zeros(draws, requires_grad=True)
    targets = torch.tensor(labels, dtype=torch.float32)[:, None].expand(n, draws)
    sample = torch.tensor(balanced_weights(labels, groups), dtype=torch.float32)[:, None]
    optimizer = torch.optim.Adam([vectors, bias], lr=0.01)  # per-element steps: each draw's as if fit alone
    with torch.enable_grad():
        for _ in range(POOL_STEPS):
            optimizer.zero_grad()
            values, logits = (inputs @ vectors).view(-1, 2, draws).unbind(1)
            pooled = attended(values, logits, owner, n) + bias
            loss = torch.nn.functional.binary_cross_entropy_with_logits(pooled, targets, reduction="none")
            ((loss * sample).mean(0).sum() + POOL_L2 * vectors.square().sum()).backward()
            optimizer.step()
    weight, query = vectors.detach().view(-1, 2, draws).unbind(1)
    u, q = weight / scale[:, None], query / scale[:, None]
    offset = bias.detach() - (weight * (mean / scale)[:, None]).sum(0)  # q's offset cancels in the softmax
    return u.numpy(), q.numpy(), offset.numpy()


def pooled_scores(tokens: Sequence[np.ndarray], u: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per request: ``Σ softmax(q·h)_t u·h_t`` over its token rows."""
    rows, owner = _segments(tokens, np.arange(len(tokens)))
    return attended(rows @ torch.from_numpy(u).float(), rows @ torch.from_numpy(q).float(), owner, len(tokens)).numpy()


def fit_read(
    tokens: Sequence[np.ndarray],
    requests: Sequence[Request],
    fit: np.ndarray,
    seed: int,
    read: str,
    draws: int = POOL_DRAWS,
    start: float = POOL_START,
) -> tuple[np.ndarray, float, tuple[np.ndarray, np.ndarray] | None]:
    """A gate's weights on per-request token rows (``prompt_tokens``; the last row the last prompt token), fit on
    requests ``fit``: ``last``, the logistic probe on the last token (``fit_linear``); ``attention``, that probe
    and an attention probe (``fit_attention``), each standardised on the fit requests and averaged, folded into
    one score ``w·h_last + b + Σ softmax(q·h) u·h``. (w, b, (u, q) or None)."""
    labels, groups = np.array([r.harmful for r in requests]), np.array([r.source for r in requests])
    last = np.stack([t[-1] for t in tokens])
    weight, bias = fit_linear(last[fit], labels[fit], groups[fit], seed)
    if read == "last":
        return weight, bias, None
    u, q, pool_bias = fit_attention(tokens, labels, groups, fit, seed, draws, start)
    first = last[fit] @ weight + bias
    second = pooled_scores([tokens[i] for i in fit], u, q) + pool_bias
    a, b = 0.5 / (first.std() + 1e-9), 0.5 / (second.std() + 1e-9)
    folded_bias = a * (bias - first.mean()) + b * (pool_bias - second.mean())
    return weight * a, float(folded_bias), (u * b, q)


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
    read: str = "last",
) -> tuple[Gate, dict[int, list[Heldout]]]:
    """The gate at the layer of ``layers`` that generalises best to held-out sources (``out_of_source_score``),
    refit on every source's fit split, threshold at ``TARGET_FPR`` of all benign calibration requests; also
    every layer's leave-one-source-out table. Features in ``precision`` (``forward_precision``); ``data_sizes``
    and ``operator``: the ``Sizes`` and operator requests that ``requests`` were built with (``gate_requests``),
    recorded for re-calibration. ``read`` ``attention``: the layer chosen so, the gate then fit with an attention
    probe at it (``with_read``) on every token it reads, recorded in the same forward (float16, every candidate
    layer: about 1.3 GB on the default model's gate data)."""
    if len({r.source for r in requests}) < 2 or len({r.harmful for r in requests}) < 2:
        raise ExtractError("the gate needs harmful and benign requests from at least two sources")
    check_read(read)
    precision = forward_precision(precision)
    chats = [r.messages() for r in requests]
    system = system_turn(tokenizer) if read == "attention" else None
    features, tokens = prompt_reads(model, tokenizer, chats, layers, system, progress=progress, precision=precision)
    gate, tables = gate_from_features(features, requests, seed, progress, data_sizes, operator)
    gate = replace(gate, calibration={**gate.calibration, "precision": precision})
    if system is not None:
        gate = with_read(gate, tokens[gate.layer], requests, seed, read, system)
    return gate, tables


def with_read(
    gate: Gate,
    tokens: Sequence[np.ndarray],
    requests: Sequence[Request],
    seed: int,
    read: str,
    system: tuple[Sequence[int], Sequence[int]],
    fpr: float = TARGET_FPR,
) -> Gate:
    """``gate`` with its weights fit again by ``fit_read`` on its layer's token rows of ``requests``
    (``prompt_tokens``) on their fit split, threshold at ``fpr`` of their benign calibration requests, calibration
    figures and firing per source redone."""
    fit, calibration = split(requests, seed=seed)
    weight, bias, pooled = fit_read(tokens, requests, fit, seed, read)
    scores = read_scores(tokens, weight, bias, pooled)
    labels = np.array([r.harmful for r in requests])
    benign_cal, harmful_cal = scores[calibration[~labels[calibration]]], scores[calibration[labels[calibration]]]
    threshold = threshold_at(benign_cal, fpr)
    figures = {
        "read": read,
        "target_fpr": fpr,
        "auroc": round(auroc(harmful_cal, benign_cal), 4),
        "fpr": _rate(benign_cal, threshold),
        "tpr": _rate(harmful_cal, threshold),
        "roc": roc_points(harmful_cal, benign_cal),
        "firing_by_source": firing_by_source(scores, requests, calibration, threshold),
    }
    if pooled is not None:
        figures["pooling"] = {
            "steps": POOL_STEPS,
            "l2": POOL_L2,
            "draws": POOL_DRAWS,
            "start": POOL_START,
            "combined": "last-token and attention probes averaged",
        }
        figures["heldout_read"] = "last"  # the leave-one-source-out tables that chose the layer read the last token
    vectors = [torch.from_numpy(v.astype(np.float32)) for v in pooled or ()]
    pooling = Pooling(*vectors, *map(tuple, system)) if vectors else None
    weights = torch.from_numpy(weight.astype(np.float32))
    return Gate(gate.layer, weights, bias, threshold, {**gate.calibration, **figures}, gate.early_heads, pooling)


def firing_by_source(
    scores: np.ndarray, requests: Sequence[Request], calibration: np.ndarray, threshold: float
) -> dict[str, dict[str, float | None]]:
    """Per source: the share of its harmful and of its benign calibration requests scoring above ``threshold``."""
    labels = np.array([r.harmful for r in requests])
    out = {}
    for source in sorted({r.source for r in requests}):
        chosen = calibration[np.array([requests[i].source == source for i in calibration])]
        harmful, benign = scores[chosen[labels[chosen]]], scores[chosen[~labels[chosen]]]
        out[source] = {
            "harmful": _rate(harmful, threshold) if len(harmful) else None,
            "benign": _rate(benign, threshold) if len(benign) else None,
        }
    return out


def read_scores(
    tokens: Sequence[np.ndarray], weight: np.ndarray, bias: float, pooled: tuple[np.ndarray, np.ndarray] | None
) -> np.ndarray:
    """Per request: ``weight · h_last + bias`` on its token rows' last, plus the pooled read of ``pooled`` (u, q)."""
    scores = np.stack([t[-1] for t in tokens]) @ weight + bias
    return scores if pooled is None else scores + pooled_scores(tokens, *pooled)


def gate_rows(
    model, tokenizer, gate: Gate, chats: Sequence[Chat], framing: Framing | None = None, precision: str = "float32"
) -> list[np.ndarray]:
    """Per chat run through ``model`` (sent as ``framing`` sends them): the rows ``gate`` reads at its layer — the
    last prompt token alone for a ``last`` gate, every pooled token (``prompt_tokens``) for an attention read."""
    if gate.pooling is None:
        features = prompt_features(model, tokenizer, chats, [gate.layer], framing=framing, precision=precision)[gate.layer]
        return [row[None] for row in features]
    system = (gate.pooling.system_head, gate.pooling.system_end)
    return prompt_tokens(model, tokenizer, chats, gate.layer, system, framing=framing, precision=precision)


def gate_scores(
    model, tokenizer, gate: Gate, chats: Sequence[Chat], framing: Framing | None = None, precision: str = "float32"
) -> np.ndarray:
    """``gate``'s scores of ``chats`` run through ``model`` (sent as ``framing`` sends them), its read whatever it is."""
    tokens = gate_rows(model, tokenizer, gate, chats, framing, precision)
    pooled = None if gate.pooling is None else (gate.pooling.weight.numpy(), gate.pooling.query.numpy())
    return read_scores(tokens, gate.weight.numpy(), gate.bias, pooled)


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
    # the layers side by side, a thread per core: each fit single-threaded, as alone (the same tables, twice as fast on
    # 2 cores); scikit-learn imported first, here: imported by the threads at once, it made the first pool slower than one
    import sklearn.linear_model  # noqa: F401

    workers = max(1, torch.get_num_threads())  # read before one_thread_fits, which sets torch's to 1 too
    with one_thread_fits(), ThreadPoolExecutor(workers) as pool:
        args = (requests, fit_arr, cal_arr, seed, seen)
        jobs = {layer: pool.submit(leave_one_source_out, features[layer], *args) for layer in layers}
        tables = {
            layer: job.result()
            for layer, job in tqdm(jobs.items(), desc="gate layers (leave one source out)", disable=not progress)
        }
    best = max(layers, key=lambda layer: (round(out_of_source_score(tables[layer]), 6), layer))
    x = features[best]
    labels, groups = np.array([r.harmful for r in requests]), np.array([r.source for r in requests])
    weight, bias = fit_linear(x[fit_arr], labels[fit_arr], groups[fit_arr], seed)
    scores = x @ weight + bias
    benign_cal, harmful_cal = scores[cal_arr[~labels[cal_arr]]], scores[cal_arr[labels[cal_arr]]]
    threshold = threshold_at(benign_cal, TARGET_FPR)
    by_source = firing_by_source(scores, requests, cal_arr, threshold)
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
    threshold = threshold_at(gate_scores(model, tokenizer, gate, benign, framing), fpr)
    return replace(gate, threshold=threshold, calibration=served_record(gate, served, len(benign), fpr, framing))


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


def differs_from_extract(gate: Gate | None, read: str, sizes: Sizes, harmful: PromptSet, seed: int = 0) -> str | None:
    """Why ``gate`` (a cached lock's) is not the gate ``extract`` fits now reading ``read`` on ``sizes`` of the
    gate's sources built from ``harmful`` with ``seed`` — another read, other requests, another attention fit —
    or None when it is that gate."""
    if gate is None or gate.read != read:
        return f"its gate does not read '{read}'"
    if recorded_sizes(gate.calibration) != sizes or gate.calibration.get("data") != source_hashes(
        gate_requests(harmful, sizes, seed=seed)
    ):
        return "its gate was fit on other requests than the gate's data give now"
    pooling = gate.calibration.get("pooling", {})
    if read == "attention" and (pooling.get("draws"), pooling.get("start")) != (POOL_DRAWS, POOL_START):
        return "its attention probe was fit otherwise than extract fits it now"
    return None


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
    layer, the read, the data and the split stay the base's; features in ``precision`` (``forward_precision``)."""
    chats = [as_served(r) for r in requests]
    precision = forward_precision(precision)
    tokens = gate_rows(model, tokenizer, gate, chats, framing, precision)
    system = ((), ()) if gate.pooling is None else (gate.pooling.system_head, gate.pooling.system_end)
    fitted = with_read(gate, tokens, requests, seed, gate.read, system, fpr)
    figures = {k: fitted.calibration[k] for k in ("auroc", "fpr", "tpr", "roc")}
    benign = sum(not requests[i].harmful for i in split(requests, seed=seed)[1])
    record = served_record(gate, served, benign, fpr, framing, refit_on=served, precision=precision, **figures)
    return replace(fitted, calibration=record)

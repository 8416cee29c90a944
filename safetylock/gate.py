"""The gate of a gated lock: a linear probe that tells a harmful request from a benign one, read once per request.

Feature: the input of layer ``c``'s attention block (the normalized residual stream) at the request's last prompt
token — the end of the generation prompt, where the model has read the whole request. Fit on the aligned base
(harmful: AdvBench extraction split; benign: instructions outside every evaluation sample), its threshold set on
a calibration split that the probe never saw, for at most ``TARGET_FPR`` benign requests firing.

Semantics (the HF path and vLLM alike): a request whose score ``w·h + b`` exceeds the threshold is served at
``alpha_on`` from its last prompt token through every generated token; every other token — the prompt before
it, and all tokens of a request whose gate does not fire — at ``alpha_off`` (default 0). Only lock heads at
layers after ``c`` are shifted, so the decision never depends on the shift it controls, and prompt tokens before
the last one are never shifted (their KV cache blocks are the plain model's, shareable by every request).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from safetylock import data
from safetylock.errors import ExtractError

if TYPE_CHECKING:
    from safetylock.evaluate import Framing

TARGET_FPR = 0.05  # benign requests allowed to fire, on the calibration split
MIN_HEAD_SHARE = 0.75  # the automatic layer keeps at least this share of the lock's heads after it


@dataclass(frozen=True)
class Gate:
    """A fitted gate: fires when ``weight · h + bias > threshold`` for ``h`` the layer's attention-block input."""

    layer: int
    weight: torch.Tensor  # [hidden] float32
    bias: float
    threshold: float
    calibration: dict[str, Any] = field(default_factory=dict)

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of rows ``hidden[..., hidden_size]`` (float32)."""
        return hidden.float() @ self.weight.to(hidden.device) + self.bias

    def fires(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden) > self.threshold

    def to_metadata(self) -> dict[str, Any]:
        return {"layer": self.layer, "bias": self.bias, "threshold": self.threshold, "calibration": self.calibration}


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


@torch.no_grad()
def prompt_features(
    model,
    tokenizer,
    prompts: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 16,
    progress: bool = False,
    framing: Framing | None = None,
) -> dict[int, np.ndarray]:
    """``{layer: [prompts, hidden]}``: each layer's attention-block input at each prompt's last chat token (each
    prompt sent alone, or as ``framing`` sends it: a system prompt, a prefix)."""
    from safetylock.capture import pad_batch
    from safetylock.geometry import head_geometry
    from safetylock.pipeline import chat_ids

    blocks = attention_blocks(model, head_geometry(model.config).num_layers)
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def recorder(layer: int):
        def hook(_module, args, kwargs):
            out[layer].append(block_input(args, kwargs)[:, -1].float().cpu().numpy())

        return hook

    handles = [blocks[layer].register_forward_pre_hook(recorder(layer), with_kwargs=True) for layer in layers]
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="gate features", disable=not progress):
            chats = [framing.messages(p) if framing else p for p in prompts[start : start + batch_size]]
            ids, mask = pad_batch([chat_ids(tokenizer, chat) for chat in chats], pad_id, "left")
            model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: np.concatenate(rows) for layer, rows in out.items()}


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


def _fit_linear(harmful: np.ndarray, benign: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """Logistic regression on standardized features, folded back to raw features: (weight, bias)."""
    from sklearn.linear_model import LogisticRegression

    x = np.r_[harmful, benign].astype(np.float64)
    y = np.r_[np.ones(len(harmful)), np.zeros(len(benign))]
    mean, scale = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=0.05, max_iter=5000, class_weight="balanced", random_state=seed)
    clf.fit((x - mean) / scale, y)
    weight = clf.coef_[0] / scale
    return weight, float(clf.intercept_[0] - weight @ mean)


@dataclass(frozen=True)
class GateData:
    """The gate's prompt splits (disjoint from every evaluation sample) and their hashes."""

    harmful_train: tuple[str, ...]
    harmful_calibration: tuple[str, ...]
    benign_train: tuple[str, ...]
    benign_calibration: tuple[str, ...]

    def hashes(self) -> dict[str, str]:
        return {
            name: hashlib.sha256(json.dumps(list(getattr(self, name))).encode()).hexdigest()[:16]
            for name in ("harmful_train", "harmful_calibration", "benign_train", "benign_calibration")
        }


def gate_data(harmful: data.PromptSet, benign_count: int = 400, seed: int = 0) -> GateData:
    """Harmful: the extraction split, 3/4 to fit and 1/4 to calibrate; benign: ``benign_count`` of each, drawn
    from the benign list outside every benign evaluation sample (``data.benign_outside_evaluation``)."""
    extraction = list(data.split_harmful(harmful, seed=seed).extraction)
    random.Random(seed).shuffle(extraction)
    cut = (3 * len(extraction)) // 4
    picked = random.Random(seed + 1).sample(data.benign_outside_evaluation(), 2 * benign_count)
    return GateData(
        tuple(extraction[:cut]), tuple(extraction[cut:]), tuple(picked[:benign_count]), tuple(picked[benign_count:])
    )


def candidate_layers(lock_layers: Sequence[int], num_layers: int) -> list[int]:
    """Layers ``c`` that keep at least ``MIN_HEAD_SHARE`` of the lock's heads after them."""
    keep = [c for c in range(1, num_layers) if sum(layer > c for layer in lock_layers) >= MIN_HEAD_SHARE * len(lock_layers)]
    if not keep:
        raise ExtractError("no gate layer keeps enough of the lock's heads after it")
    return keep


def fit_gate(
    model, tokenizer, splits: GateData, layers: Sequence[int], seed: int = 0, progress: bool = True
) -> tuple[Gate, dict[int, float]]:
    """The gate at the layer of ``layers`` with the best calibration AUROC; also every layer's AUROC."""
    prompts = {
        name: getattr(splits, name) for name in ("harmful_train", "benign_train", "harmful_calibration", "benign_calibration")
    }
    features = {name: prompt_features(model, tokenizer, p, layers, progress=progress) for name, p in prompts.items()}
    fitted, aurocs = {}, {}
    for layer in layers:
        weight, bias = _fit_linear(features["harmful_train"][layer], features["benign_train"][layer], seed)
        fitted[layer] = (weight, bias)
        aurocs[layer] = auroc(features["harmful_calibration"][layer] @ weight, features["benign_calibration"][layer] @ weight)
    best = max(layers, key=lambda layer: (aurocs[layer], -layer))
    weight, bias = fitted[best]
    benign_scores = features["benign_calibration"][best] @ weight + bias
    harmful_scores = features["harmful_calibration"][best] @ weight + bias
    threshold = float(np.quantile(benign_scores, 1 - TARGET_FPR))
    calibration = {
        "auroc": round(aurocs[best], 4),
        "target_fpr": TARGET_FPR,
        "fpr": round(float((benign_scores > threshold).mean()), 4),
        "tpr": round(float((harmful_scores > threshold).mean()), 4),
        "sizes": {name: len(p) for name, p in prompts.items()},
        "data": splits.hashes(),
        "layer_auroc": {str(layer): round(value, 4) for layer, value in aurocs.items()},
        "roc": roc_points(harmful_scores, benign_scores),
        "set_on": "calibration split through the base model",
    }
    gate = Gate(best, torch.from_numpy(weight.astype(np.float32)), bias, threshold, calibration)
    return gate, aurocs


def recalibrate(
    model,
    tokenizer,
    gate: Gate,
    benign: Sequence[str],
    fpr: float = TARGET_FPR,
    served: str = "served model",
    framing: Framing | None = None,
) -> Gate:
    """The same gate with its threshold set on ``benign`` requests run through ``model`` (the served weights), sent
    as ``framing`` sends them (the served system prompt and prefix) when given."""
    features = prompt_features(model, tokenizer, benign, [gate.layer], framing=framing)[gate.layer]
    threshold = float(np.quantile(features @ gate.weight.numpy() + gate.bias, 1 - fpr))
    calibration = {**gate.calibration, "set_on": served, "served_benign": len(benign), "target_fpr": fpr}
    calibration |= {"framing": framing.record()} if framing and framing.record() else {}
    return Gate(gate.layer, gate.weight, gate.bias, threshold, calibration)

"""Test helpers: extraction on a tiny model and an explicit reference for the o_proj input shift."""

from __future__ import annotations

import torch

from safetylock.data import PromptSet
from safetylock.geometry import output_projections
from safetylock.lockfile import SafetyLock
from safetylock.pipeline import ExtractConfig, extract_lock

from conftest import QUESTIONS


def tiny_lock(model, tokenizer, seed: int = 0, top_k: int = 3) -> SafetyLock:
    harmful = PromptSet("tiny", tuple(QUESTIONS), "tests", "0" * 64)
    config = ExtractConfig(top_k=top_k, tokens=3, questions=None, seed=seed, batch_size=8)
    return extract_lock(model, tokenizer, harmful, config, progress=False)


def reference_hooks(model, lock: SafetyLock, alpha: float) -> list:
    """Add α·σ·direction to each locked head's slice of the o_proj input, at every position."""
    geo = lock.geometry
    projections = output_projections(model)
    handles = []
    for layer, head, direction, sigma in zip(lock.layers.tolist(), lock.heads.tolist(), lock.directions, lock.sigmas):
        shift = alpha * sigma * direction
        span = slice(head * geo.head_dim, (head + 1) * geo.head_dim)

        def hook(_module, args, shift=shift, span=span):
            hidden = args[0].clone()
            hidden[..., span] += shift.to(hidden.dtype)
            return (hidden, *args[1:])

        handles.append(projections[layer].register_forward_pre_hook(hook))
    return handles


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits

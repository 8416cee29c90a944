"""Stage 4 — apply: fold α·σ·direction into one ``o_proj`` bias per layer, ``b_l = W_o · δ_l``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from safetylock.geometry import HeadGeometry, head_geometry, output_projections
from safetylock.lockfile import SafetyLock, check_alpha
from safetylock.provenance import Verdict, check, hf_multiply


def layer_shifts(lock: SafetyLock, alpha: float) -> dict[int, torch.Tensor]:
    """δ_l for each locked layer: the ``o_proj`` input shift, α·σ·direction placed in each head's slice."""
    geo = lock.geometry
    shifts: dict[int, torch.Tensor] = {}
    for layer, head, direction, sigma in zip(lock.layers.tolist(), lock.heads.tolist(), lock.directions, lock.sigmas):
        delta = shifts.setdefault(layer, torch.zeros(geo.o_proj_in_features, dtype=torch.float32))
        delta[head * geo.head_dim : (head + 1) * geo.head_dim] += alpha * float(sigma) * direction
    return shifts


def fold_bias(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W_o · δ`` in fp32: the constant that ``o_proj`` adds to its output when its input moves by δ."""
    return weight.detach().to(torch.float32) @ delta.to(weight.device, torch.float32)


@dataclass
class LockHandle:
    """Undo record of an applied lock: ``remove()`` (or leaving the ``with`` block) restores the model."""

    lock: SafetyLock
    alpha: float
    projections: dict[int, torch.nn.Linear]
    original_bias: dict[int, torch.Tensor | None] = field(default_factory=dict)
    provenance: Verdict | None = None
    active: bool = True

    def remove(self) -> None:
        if not self.active:
            return
        for layer, proj in self.projections.items():
            original = self.original_bias[layer]
            if original is None:
                proj.bias = None
            else:
                with torch.no_grad():
                    proj.bias.copy_(original)
        self.active = False

    def __enter__(self) -> LockHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def check_model(lock: SafetyLock, model: torch.nn.Module) -> HeadGeometry:
    """The model's head geometry, after checking that the lock fits it."""
    geometry = head_geometry(model.config)
    lock.check_geometry(geometry)
    return geometry


def apply(model: torch.nn.Module, lock: SafetyLock, alpha: float | None = None, allow_foreign_base: bool = False) -> LockHandle:
    """Lock an HF transformers model in place; use as ``with apply(model, lock, 6): ...``.

    The bias is computed from *this* model's ``o_proj`` weights, so one Meta-SafetyLock serves every
    fine-tuned variant of its base; a model that does not descend from that base (by the lock's weight
    sketch, see ``safetylock.provenance``) raises LockError unless ``allow_foreign_base``.
    """
    alpha = check_alpha(lock.default_alpha if alpha is None else alpha)
    geometry = check_model(lock, model)
    projections = output_projections(model, geometry)
    verdict = check(lock, hf_multiply(projections), allow_foreign_base)
    handle = LockHandle(lock, alpha, {}, provenance=verdict)
    with torch.no_grad():
        for layer, delta in layer_shifts(lock, alpha).items():
            proj = projections[layer]
            bias = fold_bias(proj.weight, delta).to(proj.weight.dtype)
            handle.projections[layer] = proj
            if proj.bias is None:
                handle.original_bias[layer] = None
                proj.bias = torch.nn.Parameter(bias, requires_grad=False)
            else:
                handle.original_bias[layer] = proj.bias.detach().clone()
                proj.bias.add_(bias)
    return handle

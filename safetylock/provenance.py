"""Provenance: does a served model descend from the base a lock was extracted on?

A lock's head directions mean something only in its base and that base's fine-tunes. The lock carries a
*weight sketch* of the base: for every layer, ``PROBES`` fixed random bilinear forms ``u_i^T W_o v_i`` of its
``o_proj`` weight (``u``, ``v`` Gaussian, drawn from a recorded seed). At load the same forms are computed on the
served weights — through the layer's own kernel in vLLM, so quantized copies are read as they compute — and the
two sketches are compared by correlation (each layer scaled to unit RMS first, so every layer counts the same).
A fine-tune moves ``W_o`` a little and keeps the correlation near 1; weights of another origin are independent
of the base's, so their forms are uncorrelated (≈ 0 ± 1/√(layers·PROBES)).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from safetylock.geometry import HeadGeometry
from safetylock.lockfile import LockError, SafetyLock

SKETCH_SEED = 20250613
PROBES = 32  # bilinear forms per layer: 24 layers -> 768 float32 values, 3 KB in the lock
MIN_CORRELATION = 0.5  # below it the served model is taken for another base (measured margins: README)


@dataclass(frozen=True)
class Verdict:
    """The outcome of a provenance check, for the start-up line."""

    correlation: float | None  # None: the lock has no sketch
    allowed_foreign: bool = False

    def describe(self) -> str:
        if self.correlation is None:
            return "provenance unchecked (lock has no weight sketch)"
        relation = ">=" if self.correlation >= MIN_CORRELATION else "<"
        text = f"weight sketch correlation {self.correlation:.3f} {relation} {MIN_CORRELATION}"
        return text + (", served anyway: allow_foreign_base" if self.allowed_foreign else "")


def sketch_vectors(geometry: HeadGeometry, seed: int, probes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, u)``: ``[probes, o_proj inputs]`` and ``[probes, hidden]`` float32 Gaussians drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(probes, geometry.o_proj_in_features, generator=generator)
    u = torch.randn(probes, geometry.hidden_size, generator=generator)
    return v, u


def weight_sketch(
    geometry: HeadGeometry,
    multiply: Callable[[int, torch.Tensor], torch.Tensor],
    seed: int = SKETCH_SEED,
    probes: int = PROBES,
) -> torch.Tensor:
    """``[layers, probes]`` float32: ``u_i^T W_o v_i`` per layer, where ``multiply(layer, v)`` returns ``v W_o^T``."""
    v, u = sketch_vectors(geometry, seed, probes)
    rows = [(multiply(layer, v).float().cpu() * u).sum(dim=1) for layer in range(geometry.num_layers)]
    return torch.stack(rows)


def hf_multiply(projections: list[torch.nn.Module]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``multiply(layer, v) = v W_o^T`` on an HF model's ``o_proj`` weights (``projections`` in layer order)."""

    @torch.no_grad()
    def multiply(layer: int, v: torch.Tensor) -> torch.Tensor:
        weight = projections[layer].weight.detach().float()
        return v.to(weight.device) @ weight.t()

    return multiply


def hf_weight_sketch(projections: list[torch.nn.Module], geometry: HeadGeometry, seed: int = SKETCH_SEED) -> torch.Tensor:
    """The sketch of an HF model's ``o_proj`` weights: what a lock extracted from it records."""
    return weight_sketch(geometry, hf_multiply(projections), seed)


def correlation(base: torch.Tensor, served: torch.Tensor) -> float:
    """Pearson correlation of two sketches after scaling each layer of each to unit RMS."""

    def unit_rms(sketch: torch.Tensor) -> torch.Tensor:
        sketch = sketch.double()
        return (sketch / sketch.pow(2).mean(dim=1, keepdim=True).sqrt().clamp(min=1e-30)).flatten()

    a, b = unit_rms(base), unit_rms(served)
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1].nan_to_num(0.0))


def check(lock: SafetyLock, multiply: Callable[[int, torch.Tensor], torch.Tensor], allow_foreign_base: bool = False) -> Verdict:
    """Compare the lock's base sketch with the served model's; raise LockError below ``MIN_CORRELATION``.

    ``multiply(layer, v)`` returns ``v W_o^T`` of the served model (called only when the lock has a sketch).
    ``allow_foreign_base`` (the operator's explicit override) serves anyway and says so in the verdict.
    """
    if lock.base_sketch is None:
        warnings.warn("lock has no weight sketch (an older lock file): provenance is unchecked", stacklevel=2)
        return Verdict(None)
    served = weight_sketch(lock.geometry, multiply, lock.sketch_seed, lock.base_sketch.shape[1])
    value = correlation(lock.base_sketch, served)
    if value < MIN_CORRELATION and not allow_foreign_base:
        raise LockError(
            f"the served model does not descend from the lock's base: weight sketch correlation {value:.3f} "
            f"< {MIN_CORRELATION} (set allow_foreign_base to serve it anyway)"
        )
    return Verdict(value, allowed_foreign=value < MIN_CORRELATION)


@torch.no_grad()
def simulated_fine_tune(model: torch.nn.Module, relative: float, rank: int = 8, seed: int = 1) -> None:
    """Move every decoder linear weight by a seeded random rank-``rank`` update of ``relative`` times its norm
    (a merged LoRA of known size): the yardstick the threshold is calibrated against (tests, benchmark)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 2 and "embed" not in name and "lm_head" not in name:
            update = torch.randn(param.shape[0], rank, generator=gen) @ torch.randn(rank, param.shape[1], generator=gen)
            param += relative * param.norm() * update / update.norm()

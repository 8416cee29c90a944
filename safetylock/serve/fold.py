"""``b_l = W_o · δ_l`` over tensor-parallel ranks, through whatever kernel holds each rank's weights."""

from __future__ import annotations

from collections.abc import Callable

import torch

from safetylock import provenance
from safetylock.apply import layer_shifts
from safetylock.errors import LockError
from safetylock.lockfile import SafetyLock
from safetylock.provenance import Verdict
from safetylock.serve.config import PreparedLock


def rank_slice(width: int, tp_rank: int, tp_size: int) -> slice:
    """The columns of a row-parallel ``o_proj`` input held by one tensor-parallel rank."""
    if width % tp_size:
        raise LockError(f"o_proj input width {width} does not split over {tp_size} tensor-parallel ranks")
    part = width // tp_size
    return slice(tp_rank * part, (tp_rank + 1) * part)


def sharded_biases(
    lock: SafetyLock,
    alpha: float,
    tp_rank: int,
    tp_size: int,
    local_matmul: Callable[[int, torch.Tensor], torch.Tensor],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> dict[int, torch.Tensor]:
    """``b_l = W_o · δ_l`` for every locked layer, from per-rank slices.

    ``local_matmul(layer, delta_slice)`` multiplies this rank's ``W_o`` columns by its slice of δ_l (through
    whatever kernel holds the weights); ``all_reduce`` sums the partial products over the ranks. Every rank
    returns the full bias; the engine adds it once (on rank 0, before its reduction).
    """
    columns = rank_slice(lock.geometry.o_proj_in_features, tp_rank, tp_size)
    biases = {}
    for layer, delta in sorted(layer_shifts(lock, alpha).items()):
        partial = local_matmul(layer, delta[columns])
        biases[layer] = all_reduce(partial)
    return biases


def sharded_multiply(
    width: int,
    tp_rank: int,
    tp_size: int,
    local_matmul: Callable[[int, torch.Tensor], torch.Tensor],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``multiply(layer, v) = v W_o^T`` for rows ``v`` of full ``o_proj`` input width, from this rank's columns:
    what the provenance sketch reads from a served (possibly sharded, possibly quantized) model."""
    columns = rank_slice(width, tp_rank, tp_size)
    return lambda layer, v: all_reduce(local_matmul(layer, v[:, columns]))


def check_provenance(prepared: PreparedLock, multiply: Callable[[int, torch.Tensor], torch.Tensor]) -> Verdict:
    """The served weights against the lock's base sketch; LockError unless they descend from it or the operator
    set ``allow_foreign_base``."""
    return provenance.check(prepared.lock, multiply, prepared.config.allow_foreign_base)


def checked_bias(layer: int, bias: torch.Tensor, width: int) -> torch.Tensor:
    """``bias`` if it has one finite value per ``o_proj`` output, else LockError (never serve a broken lock)."""
    if bias.numel() != width or not torch.isfinite(bias).all():
        raise LockError(f"layer {layer}: folded bias has {bias.numel()} values (o_proj outputs {width}) or is not finite")
    return bias


def unit_bias_table(
    lock: SafetyLock,
    tp_rank: int,
    tp_size: int,
    local_matmul: Callable[[int, torch.Tensor], torch.Tensor],
    all_reduce: Callable[[torch.Tensor], torch.Tensor],
    width: int,
) -> torch.Tensor:
    """``W_o · δ_l`` at α = 1 for every layer (zero rows where no head is locked): ``[num_layers, width]``.

    A served token with scale α gets ``α · table[l]`` added after layer l's ``o_proj``, which is what the
    fold adds at that α; the table has a row for every layer so that a new lock can replace it in place.
    """
    table = torch.zeros(lock.geometry.num_layers, width, dtype=torch.float32)
    for layer, bias in sharded_biases(lock, 1.0, tp_rank, tp_size, local_matmul, all_reduce).items():
        table[layer] = checked_bias(layer, bias, width).float().cpu()
    return table

"""Serving-side lock configuration and the tensor-parallel bias fold (engine-agnostic; used by the vLLM plugin)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safetylock.apply import layer_shifts
from safetylock.geometry import HeadGeometry
from safetylock.lockfile import LockError, SafetyLock, check_alpha, load

CONFIG_KEY = "safetylock"
ENV_LOCK = "SAFETYLOCK_LOCK"
ENV_ALPHA = "SAFETYLOCK_ALPHA"


@dataclass(frozen=True)
class ServeConfig:
    """Which lock a server applies, and with which α (None: the lock's default)."""

    lock: Path
    alpha: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"lock": str(self.lock), **({} if self.alpha is None else {"alpha": self.alpha})}


def serve_config(additional_config: Mapping[str, Any] | None, environ: Mapping[str, str] = os.environ) -> ServeConfig | None:
    """The safetylock section of vLLM's ``additional_config``, else the environment; None when neither asks for a lock.

    A section that is present but malformed raises LockError: a server asked for a lock never runs without one.
    """
    section = (additional_config or {}).get(CONFIG_KEY)
    if section is None:
        if not environ.get(ENV_LOCK):
            if environ.get(ENV_ALPHA):
                raise LockError(f"{ENV_ALPHA} is set but {ENV_LOCK} is not: name the lock file to apply")
            return None
        section = {"lock": environ[ENV_LOCK]}
        if environ.get(ENV_ALPHA):
            try:
                section["alpha"] = float(environ[ENV_ALPHA])
            except ValueError:
                raise LockError(f"{ENV_ALPHA}={environ[ENV_ALPHA]!r} is not a number") from None
    if not isinstance(section, Mapping):
        raise LockError(f"additional_config.{CONFIG_KEY} must be an object with 'lock' (and optional 'alpha')")
    unknown = set(section) - {"lock", "alpha", "fingerprint"}
    if unknown:
        raise LockError(f"unknown safetylock config keys: {sorted(unknown)} (allowed: lock, alpha)")
    if not isinstance(section.get("lock"), str) or not section["lock"]:
        raise LockError(f"additional_config.{CONFIG_KEY}.lock must be the path of a lock file")
    alpha = section.get("alpha")
    return ServeConfig(Path(section["lock"]), None if alpha is None else check_alpha(alpha))


@dataclass(frozen=True)
class PreparedLock:
    """A validated lock ready to fold into one served model."""

    lock: SafetyLock
    alpha: float
    config: ServeConfig

    @property
    def cache_key(self) -> dict[str, Any]:
        """What must enter the engine's compile-cache key: a different lock or α is a different graph."""
        return {**self.config.to_dict(), "alpha": self.alpha, "fingerprint": self.lock.fingerprint}


def prepare(config: ServeConfig, model_geometry: HeadGeometry) -> PreparedLock:
    """Load the lock, check it against the served model's geometry, resolve α."""
    lock = load(config.lock)
    lock.check_geometry(model_geometry)
    alpha = check_alpha(lock.default_alpha if config.alpha is None else config.alpha)
    return PreparedLock(lock, alpha, config)


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

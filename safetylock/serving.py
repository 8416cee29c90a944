"""Serving-side lock configuration and the tensor-parallel bias fold (engine-agnostic; used by the vLLM plugin)."""

from __future__ import annotations

import hmac
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safetylock import provenance
from safetylock.apply import layer_shifts
from safetylock.geometry import HeadGeometry
from safetylock.lockfile import MAX_ABS_ALPHA, LockError, SafetyLock, check_alpha, load
from safetylock.provenance import Verdict

CONFIG_KEY = "safetylock"
ENV_LOCK = "SAFETYLOCK_LOCK"
ENV_ALPHA = "SAFETYLOCK_ALPHA"
ENV_ADMIN_TOKEN = "SAFETYLOCK_ADMIN_TOKEN"
REQUEST_ALPHA_KEY = "safetylock_alpha"  # the key of a request's ``vllm_xargs``
POLICY_KEYS = ("allow_request_alpha", "min_alpha", "max_alpha", "adapter_alpha")
OPERATOR_KEYS = ("allow_foreign_base",)  # serve a lock on a model whose weights do not descend from its base
DERIVED_KEYS = ("fingerprint", "dynamic")  # written by the plugin into the compile-cache key; ignored on input


class RequestAlphaError(ValueError):
    """A request's α that the operator's policy does not allow (an HTTP 400 for the client)."""


@dataclass(frozen=True)
class AlphaPolicy:
    """What α a request may carry. Default: none — no client can weaken, strengthen or disable the lock."""

    allow_request_alpha: bool = False
    min_alpha: float | None = None  # None: the server's default α, so clients can only strengthen the lock
    max_alpha: float | None = None  # None: the largest α a lock accepts
    adapter_alpha: Mapping[str, float] = field(default_factory=dict)  # LoRA adapter name -> its α

    def bounds(self, default_alpha: float) -> tuple[float, float]:
        low = default_alpha if self.min_alpha is None else self.min_alpha
        return low, MAX_ABS_ALPHA if self.max_alpha is None else self.max_alpha

    def resolve(self, default_alpha: float, requested: object = None, adapter: str | None = None) -> float:
        """The α one request is served with; raises RequestAlphaError for a value the policy refuses."""
        if requested is None:
            return float(self.adapter_alpha.get(adapter, default_alpha)) if adapter else default_alpha
        if not self.allow_request_alpha:
            raise RequestAlphaError(
                f"{REQUEST_ALPHA_KEY} is not allowed on this server (the operator has not enabled allow_request_alpha)"
            )
        if isinstance(requested, bool) or not isinstance(requested, (int, float)) or not math.isfinite(requested):
            raise RequestAlphaError(f"{REQUEST_ALPHA_KEY} must be a finite number, got {requested!r}")
        low, high = self.bounds(default_alpha)
        if not low <= requested <= high:
            raise RequestAlphaError(f"{REQUEST_ALPHA_KEY} {requested} is outside the allowed range [{low:g}, {high:g}]")
        return float(requested)

    def to_dict(self) -> dict[str, Any]:
        return {
            "allow_request_alpha": self.allow_request_alpha,
            **({} if self.min_alpha is None else {"min_alpha": self.min_alpha}),
            **({} if self.max_alpha is None else {"max_alpha": self.max_alpha}),
            **({"adapter_alpha": dict(self.adapter_alpha)} if self.adapter_alpha else {}),
        }


@dataclass(frozen=True)
class ServeConfig:
    """Which lock a server applies, with which default α (None: the lock's), under which request policy."""

    lock: Path
    alpha: float | None = None
    policy: AlphaPolicy = field(default_factory=AlphaPolicy)
    hot_swap: bool = False  # an admin token is set: the lock and α may be replaced while serving
    allow_foreign_base: bool = False  # the operator overrides the provenance check (logged at start-up)

    @property
    def dynamic(self) -> bool:
        """Whether α can differ between requests or over time (per-token scale instead of a folded bias)."""
        return self.policy.allow_request_alpha or bool(self.policy.adapter_alpha) or self.hot_swap

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lock": str(self.lock), **({} if self.alpha is None else {"alpha": self.alpha})}
        if self.policy != AlphaPolicy():
            out.update(self.policy.to_dict())
        if self.allow_foreign_base:
            out["allow_foreign_base"] = True
        return out


def _policy(section: Mapping[str, Any]) -> AlphaPolicy:
    allow = section.get("allow_request_alpha", False)
    if not isinstance(allow, bool):
        raise LockError(f"{CONFIG_KEY}.allow_request_alpha must be true or false, got {allow!r}")
    low, high = (None if section.get(k) is None else check_alpha(section[k]) for k in ("min_alpha", "max_alpha"))
    if low is not None and high is not None and low > high:
        raise LockError(f"{CONFIG_KEY}.min_alpha {low} is above max_alpha {high}")
    adapters = section.get("adapter_alpha") or {}
    if not isinstance(adapters, Mapping) or not all(isinstance(k, str) and k for k in adapters):
        raise LockError(f"{CONFIG_KEY}.adapter_alpha must map LoRA adapter names to alpha values")
    return AlphaPolicy(allow, low, high, {name: check_alpha(value) for name, value in adapters.items()})


def admin_token(environ: Mapping[str, str] = os.environ) -> str | None:
    """The operator's admin token (hot swap), or None when hot swap is off."""
    return environ.get(ENV_ADMIN_TOKEN) or None


def token_matches(given: str | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Constant-time check of a presented admin token; always False when no token is configured."""
    expected = admin_token(environ)
    return bool(expected and given) and hmac.compare_digest(expected.encode(), given.encode())


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
    unknown = set(section) - {"lock", "alpha", *POLICY_KEYS, *OPERATOR_KEYS, *DERIVED_KEYS}
    if unknown:
        allowed = ", ".join(("lock", "alpha", *POLICY_KEYS, *OPERATOR_KEYS))
        raise LockError(f"unknown safetylock config keys: {sorted(unknown)} (allowed: {allowed})")
    if not isinstance(section.get("lock"), str) or not section["lock"]:
        raise LockError(f"additional_config.{CONFIG_KEY}.lock must be the path of a lock file")
    alpha = section.get("alpha")
    foreign = section.get("allow_foreign_base", False)
    if not isinstance(foreign, bool):
        raise LockError(f"{CONFIG_KEY}.allow_foreign_base must be true or false, got {foreign!r}")
    return ServeConfig(
        Path(section["lock"]),
        None if alpha is None else check_alpha(alpha),
        _policy(section),
        hot_swap=admin_token(environ) is not None,
        allow_foreign_base=foreign,
    )


@dataclass(frozen=True)
class PreparedLock:
    """A validated lock ready to fold into one served model."""

    lock: SafetyLock
    alpha: float
    config: ServeConfig

    @property
    def cache_key(self) -> dict[str, Any]:
        """What must enter the engine's compile-cache key: a different lock or α is a different graph."""
        key = {**self.config.to_dict(), "alpha": self.alpha, "fingerprint": self.lock.fingerprint}
        return {**key, "dynamic": True} if self.config.dynamic else key


def prepare(config: ServeConfig, model_geometry: HeadGeometry) -> PreparedLock:
    """Load the lock, check it against the served model's geometry, resolve α."""
    lock = load(config.lock)
    lock.check_geometry(model_geometry)
    alpha = check_alpha(lock.default_alpha if config.alpha is None else config.alpha)
    low, high = config.policy.bounds(alpha)
    if low > high:
        raise LockError(f"{CONFIG_KEY}.max_alpha {high} is below the server's alpha {alpha}")
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

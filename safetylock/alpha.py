"""The steering strength α: its bounds, and which α a request may carry under the operator's policy.

Used by the lock file (its default α), the HF apply path, the serving configuration and the vLLM plugin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from safetylock.errors import LockError

DEFAULT_ALPHA = 0.5  # calibrated on the packaged aligned model: see benchmarks/results/alpha_sweep.json
MAX_ABS_ALPHA = 64.0
REQUEST_ALPHA_KEY = "safetylock_alpha"  # the key of a request's ``vllm_xargs``


def finite_number(value: object, what: str = "alpha") -> float:
    """``value`` as a float if it is a finite number (not a bool, not a string), else LockError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LockError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def check_alpha(alpha: object, what: str = "alpha") -> float:
    """``alpha`` as a float if it is a finite number within ±MAX_ABS_ALPHA, else LockError naming ``what``."""
    alpha = finite_number(alpha, what)
    if abs(alpha) > MAX_ABS_ALPHA:
        raise LockError(f"{what} {alpha} is outside the allowed range [-{MAX_ABS_ALPHA}, {MAX_ABS_ALPHA}]")
    return alpha


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
        try:
            value = finite_number(requested, REQUEST_ALPHA_KEY)
        except LockError as exc:
            raise RequestAlphaError(str(exc)) from None
        low, high = self.bounds(default_alpha)  # within ±MAX_ABS_ALPHA: the policy's bounds are checked alphas
        if not low <= value <= high:
            raise RequestAlphaError(f"{REQUEST_ALPHA_KEY} {value:g} is outside the allowed range [{low:g}, {high:g}]")
        return value

    def summary(self) -> dict[str, Any]:
        """The policy for logs, the admin status route and the compile-cache key."""
        return {
            "allow_request_alpha": self.allow_request_alpha,
            **({} if self.min_alpha is None else {"min_alpha": self.min_alpha}),
            **({} if self.max_alpha is None else {"max_alpha": self.max_alpha}),
            **({"adapter_alpha": dict(self.adapter_alpha)} if self.adapter_alpha else {}),
        }

"""The operator's configuration of a locked server, read once into one typed object.

The user's section (``additional_config.safetylock``, or ``SAFETYLOCK_LOCK``/``SAFETYLOCK_ALPHA``) is parsed by
``serve_config`` and never written to; what the plugin derives from it goes under ``CACHE_KEY``.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetylock.alpha import AlphaPolicy, check_alpha
from safetylock.errors import LockError
from safetylock.geometry import HeadGeometry
from safetylock.lockfile import SafetyLock, load
from safetylock.respond import DEFAULT_REFUSAL, DEFAULT_RESPONSE, ResponsePolicy

CONFIG_KEY = "safetylock"  # the user's section of vLLM's additional_config
CACHE_KEY = "safetylock_cache_key"  # written by the plugin only: what enters vLLM's compile-cache hash
PINNED_KEY = "safetylock_pinned_fingerprint"  # written by the plugin's API side: the lock its workers must load
ENV_LOCK = "SAFETYLOCK_LOCK"
ENV_ALPHA = "SAFETYLOCK_ALPHA"
ENV_ADMIN_TOKEN = "SAFETYLOCK_ADMIN_TOKEN"
POLICY_KEYS = ("allow_request_alpha", "min_alpha", "max_alpha", "adapter_alpha")
RESPONSE_KEYS = ("response", "refusal_message")  # gated mode: how a request whose gate fires is answered
GATED_KEYS = ("alpha_off", "allow_prefill", *RESPONSE_KEYS)  # meaningful for gated serving only
SECTION_KEYS = ("lock", "alpha", *POLICY_KEYS, "allow_foreign_base", "gated", *GATED_KEYS)


@dataclass(frozen=True)
class ServeConfig:
    """Which lock a server applies, with which default α (None: the lock's), under which request policy."""

    lock: Path
    alpha: float | None = None
    policy: AlphaPolicy = field(default_factory=AlphaPolicy)
    hot_swap: bool = False  # an admin token is set: the lock and α may be replaced while serving
    allow_foreign_base: bool = False  # the operator overrides the provenance check (logged at start-up)
    gated: bool = False  # the lock's gate decides per request: α on a harmful request, alpha_off otherwise
    alpha_off: float = 0.0  # gated mode: α of requests whose gate does not fire
    response: ResponsePolicy = field(default_factory=ResponsePolicy)  # gated mode: see safetylock.respond
    allow_prefill: bool = False  # gated mode: serve prompts that pre-fill an assistant turn (gate.continues_assistant_turn)

    @property
    def dynamic(self) -> bool:
        """Whether α can differ between requests or over time (per-token scale instead of a folded bias)."""
        return self.policy.allow_request_alpha or bool(self.policy.adapter_alpha) or self.hot_swap or self.gated

    @property
    def mode(self) -> str:
        return "gated" if self.gated else "dynamic" if self.dynamic else "static"


def _check_keys(keys: Mapping[str, Any]) -> None:
    unknown = set(keys) - set(SECTION_KEYS)
    if unknown:
        raise LockError(f"unknown safetylock config keys: {sorted(unknown)} (allowed: {', '.join(SECTION_KEYS)})")


def lock_section(lock: str | Path, alpha: float | None = None, **options: Any) -> dict[str, Any]:
    """A ``safetylock`` section as a user writes it: the lock's absolute path, α and policy options that are set."""
    _check_keys(options)
    unset = [k for k, v in {"alpha": alpha, **options}.items() if v is None or v is False or v == {}]
    values = {"lock": str(Path(lock).resolve()), "alpha": alpha, **options}
    return {k: v for k, v in values.items() if k not in unset}


def _flag(section: Mapping[str, Any], key: str) -> bool:
    value = section.get(key, False)
    if not isinstance(value, bool):
        raise LockError(f"{CONFIG_KEY}.{key} must be true or false, got {value!r}")
    return value


def _policy(section: Mapping[str, Any]) -> AlphaPolicy:
    low, high = (None if section.get(k) is None else check_alpha(section[k], f"{CONFIG_KEY}.{k}") for k in POLICY_KEYS[1:3])
    if low is not None and high is not None and low > high:
        raise LockError(f"{CONFIG_KEY}.min_alpha {low} is above max_alpha {high}")
    adapters = section.get("adapter_alpha") or {}
    if not isinstance(adapters, Mapping) or not all(isinstance(k, str) and k for k in adapters):
        raise LockError(f"{CONFIG_KEY}.adapter_alpha must map LoRA adapter names to alpha values")
    alphas = {name: check_alpha(value, f"{CONFIG_KEY}.adapter_alpha.{name}") for name, value in adapters.items()}
    return AlphaPolicy(_flag(section, "allow_request_alpha"), low, high, alphas)


def _environment_section(environ: Mapping[str, str]) -> dict[str, Any] | None:
    if not environ.get(ENV_LOCK):
        if environ.get(ENV_ALPHA):
            raise LockError(f"{ENV_ALPHA} is set but {ENV_LOCK} is not: name the lock file to apply")
        return None
    section: dict[str, Any] = {"lock": environ[ENV_LOCK]}
    if environ.get(ENV_ALPHA):
        try:
            section["alpha"] = float(environ[ENV_ALPHA])
        except ValueError:
            raise LockError(f"{ENV_ALPHA}={environ[ENV_ALPHA]!r} is not a number") from None
    return section


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
        section = _environment_section(environ)
        if section is None:
            return None
    if not isinstance(section, Mapping):
        raise LockError(f"additional_config.{CONFIG_KEY} must be an object with 'lock' (and optional 'alpha')")
    _check_keys(section)
    if not isinstance(section.get("lock"), str) or not section["lock"]:
        raise LockError(f"additional_config.{CONFIG_KEY}.lock must be the path of a lock file")
    alpha = section.get("alpha")
    for key in GATED_KEYS:
        if key in section and not section.get("gated"):
            raise LockError(f"{CONFIG_KEY}.{key} applies to gated serving only: set {CONFIG_KEY}.gated too")
    if "refusal_message" in section and section.get("response", DEFAULT_RESPONSE) != "refuse":
        raise LockError(f"{CONFIG_KEY}.refusal_message is used by the refuse response only, not by {section['response']!r}")
    return ServeConfig(
        Path(section["lock"]),
        None if alpha is None else check_alpha(alpha),
        _policy(section),
        hot_swap=admin_token(environ) is not None,
        allow_foreign_base=_flag(section, "allow_foreign_base"),
        gated=_flag(section, "gated"),
        alpha_off=check_alpha(section.get("alpha_off", 0.0), f"{CONFIG_KEY}.alpha_off"),
        response=_response(section),
        allow_prefill=_flag(section, "allow_prefill"),
    )


def _response(section: Mapping[str, Any]) -> ResponsePolicy:
    kind = section.get("response", DEFAULT_RESPONSE)
    if not isinstance(kind, str):
        raise LockError(f"{CONFIG_KEY}.response must be a string, got {kind!r}")
    try:
        return ResponsePolicy(kind, section.get("refusal_message", DEFAULT_REFUSAL))
    except LockError as exc:
        raise LockError(f"{CONFIG_KEY}.{exc}") from None


@dataclass(frozen=True)
class PreparedLock:
    """A validated lock ready to fold into one served model."""

    lock: SafetyLock
    alpha: float
    config: ServeConfig

    @property
    def cache_key(self) -> dict[str, Any]:
        """What must enter the engine's compile-cache key: another lock, α, mode or policy is another graph."""
        return {
            "fingerprint": self.lock.fingerprint,
            "alpha": self.alpha,
            "mode": self.config.mode,
            "policy": self.config.policy.summary(),
            "allow_foreign_base": self.config.allow_foreign_base,
            **({"alpha_off": self.config.alpha_off, "response": self.config.response.kind} if self.config.gated else {}),
        }

    def cache_salt(self, alpha: float) -> str:
        """The prefix-cache salt of a request served at ``alpha``: KV blocks of one α never serve another."""
        return f"safetylock:{self.lock.fingerprint}:{alpha!r}"


def check_pinned(prepared: PreparedLock, additional_config: Mapping[str, Any] | None) -> None:
    """Refuse a lock other than the one the API side loaded (``PINNED_KEY``): the file changed while the server
    was starting, and the API side's salts and metrics would name another lock than the workers serve."""
    pinned = (additional_config or {}).get(PINNED_KEY)
    if pinned is not None and pinned != prepared.lock.fingerprint:
        raise LockError(
            f"lock file {prepared.config.lock} changed while the server was starting: the API server loaded "
            f"{pinned}, this worker {prepared.lock.fingerprint}; restart it"
        )


def prepare(config: ServeConfig, model_geometry: HeadGeometry, lock: SafetyLock | None = None) -> PreparedLock:
    """Load the lock (or take ``lock``, already read from ``config.lock``), check it against the served model's
    geometry, resolve α."""
    lock = load(config.lock) if lock is None else lock
    lock.check_geometry(model_geometry)
    if config.gated and lock.gate is None:
        raise LockError(f"{CONFIG_KEY}.gated is set but lock {config.lock} has no gate (extract it without --no-gate)")
    alpha = check_alpha(lock.default_alpha if config.alpha is None else config.alpha)
    low, high = config.policy.bounds(alpha)
    if low > high:
        raise LockError(f"{CONFIG_KEY}.max_alpha {high} is below the server's alpha {alpha}")
    return PreparedLock(lock, alpha, config)

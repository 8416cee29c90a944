"""The ``safetylock_admin`` endpoint plugin: hot swap of the lock or default α of a running server.

vLLM loads endpoint plugins only when they are named in ``VLLM_PLUGINS`` (``safetylock serve`` does that when
``SAFETYLOCK_ADMIN_TOKEN`` is set). Every route needs ``Authorization: Bearer <SAFETYLOCK_ADMIN_TOKEN>``; with no
token configured the routes answer 403. A swap is checked here first, then applied by every worker between
engine steps (``collective_rpc``); a refused swap leaves the old lock serving. The prefix cache is reset after.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from safetylock.alpha import check_alpha
from safetylock.errors import LockError
from safetylock.geometry import head_geometry
from safetylock.lockfile import SafetyLock, from_bytes
from safetylock.serve.config import PreparedLock, ServeConfig, prepare, token_matches
from safetylock_vllm.frontend import FrontendLock
from safetylock_vllm.state import STATE


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)


def _status(state: FrontendLock) -> dict[str, Any]:
    prepared = state.prepared
    return {
        "lock": str(prepared.config.lock),
        "fingerprint": prepared.lock.fingerprint,
        "alpha": prepared.alpha,
        "heads": prepared.lock.num_heads_locked,
        "mode": prepared.config.mode,
        "hot_swap": prepared.config.hot_swap,
        "policy": prepared.config.policy.summary(),
    }


def _requested(body: dict[str, Any], current: PreparedLock) -> tuple[ServeConfig, SafetyLock, bytes | None]:
    """The configuration a swap asks for, its lock, and the lock file's bytes (None: the served lock stays).

    The file is read once, here; an α-only swap keeps the lock that is served (never re-read from disk, where
    the file may have changed since it was loaded)."""
    path = body.get("lock")
    alpha = current.config.alpha if body.get("alpha") is None else check_alpha(body["alpha"])
    if path is None:
        return dataclasses.replace(current.config, alpha=alpha), current.lock, None
    if not isinstance(path, str) or not path:
        raise LockError("'lock' must be the path of a lock file")
    resolved = Path(path).resolve()
    try:
        data = resolved.read_bytes()
    except OSError as exc:
        raise LockError(f"cannot read lock file {resolved}: {exc.strerror or exc}") from None
    return dataclasses.replace(current.config, lock=resolved, alpha=alpha), from_bytes(data, str(resolved)), data


class AdminPlugin:
    """Routes ``GET /safetylock/status`` and ``POST /safetylock/swap`` (body: ``{"lock": PATH, "alpha": A}``)."""

    name = "safetylock_admin"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.engine_client = None
        self.swapping = asyncio.Lock()

    def attach_router(self, app: FastAPI) -> None:
        app.add_api_route("/safetylock/status", self.status, methods=["GET"])
        app.add_api_route("/safetylock/swap", self.swap, methods=["POST"])

    async def init_state(self, engine_client, state, args) -> None:
        self.engine_client = engine_client

    @staticmethod
    def _refusal(request: Request) -> JSONResponse | None:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else None
        if not token_matches(token):
            return _error(403, "safetylock admin: missing or wrong admin token (or SAFETYLOCK_ADMIN_TOKEN is not set)")
        if STATE.frontend is None:
            return _error(409, "safetylock admin: this server serves no lock")
        return None

    async def status(self, request: Request) -> JSONResponse:
        return self._refusal(request) or JSONResponse(_status(STATE.frontend))

    async def swap(self, request: Request) -> JSONResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        state = STATE.frontend
        if not state.prepared.config.hot_swap:
            return _error(
                409, "safetylock admin: this server was started without hot swap (set SAFETYLOCK_ADMIN_TOKEN at start)"
            )
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "safetylock swap: the body must be a JSON object")
        if not isinstance(body, dict) or not body or set(body) - {"lock", "alpha"}:
            return _error(400, "safetylock swap: the body must be a JSON object with 'lock' and/or 'alpha'")
        async with self.swapping:
            current = state.prepared
            try:
                config, lock, data = _requested(body, current)
                prepared = prepare(config, head_geometry(self.engine_client.model_config.hf_config), lock)
            except LockError as exc:
                return _error(400, f"safetylock swap refused, the old lock stays: {exc}")
            try:  # every worker parses these same bytes: no second read of a file that may change meanwhile
                kwargs = {"lock": str(config.lock), "alpha": config.alpha, "data": data, "fingerprint": lock.fingerprint}
                results = await self.engine_client.collective_rpc("safetylock_swap", kwargs=kwargs)
            except Exception as exc:
                return _error(400, f"safetylock swap refused by the engine, the old lock stays: {exc}")
            state.replace(prepared)
            cache_reset = await self.engine_client.reset_prefix_cache()
        return JSONResponse(
            {
                **_status(state),
                "apply_ms": max(float(r["apply_ms"]) for r in results),
                "prefix_cache_reset": bool(cache_reset),
            }
        )

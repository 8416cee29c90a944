"""Serving controls in the real vLLM engine: per-request α (exact in mixed batches), policy errors, hot swap, metrics."""

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from safetylock.hf import load_model
from safetylock.lockfile import load
from safetylock.serve.server import free_port, start_server, wait_healthy

from support import (
    PROMPTS,
    QUESTION,
    SERVER_ARGS,
    assert_same_generation,
    expected_tokens,
    hf_reference,
    http_request,
    model_dir,
    run_vllm,
    tiny_lock,
)

pytestmark = pytest.mark.engine  # real vLLM engines: the slow tier

POLICY = {"allow_request_alpha": True, "min_alpha": 0.0, "max_alpha": 8.0}
TOKEN = "test-admin-token"
LONG_REPLY = 400  # tokens: generation of four of them outlasts a swap by far


@pytest.fixture(scope="module")
def locks(llama_dir, tmp_path_factory):
    model, tok = load_model(llama_dir)
    where = tmp_path_factory.mktemp("controls")
    first = tiny_lock(model, tok, seed=0).save(where / "first.lock.safetensors")
    second = tiny_lock(model, tok, seed=1, top_k=6).save(where / "second.lock.safetensors")
    return first, second


LONG_PROMPT = [1] + [(7 * i) % 300 + 3 for i in range(80)]  # spans full KV blocks of 32: prefix caching applies


def test_mixed_alpha_batch_equals_solo_runs_compiled(llama_dir, locks, tmp_path):
    lock = load(locks[0])
    prompts = [*PROMPTS, LONG_PROMPT]
    # None: the server's α (2). Solo runs go in this order, so the long prompt is cached under α 0 before α 8 asks.
    mixed = [[0, 0.0], [1, None], [2, 8.0], [3, 0.0], [0, 8.0], [1, 3.0], [3, 8.0]]
    out = run_vllm(
        tmp_path,
        model=str(llama_dir),
        prompts=prompts,
        enforce_eager=False,
        engine_args={"block_size": 32, "enable_prefix_caching": True},
        additional_config={"safetylock": {"lock": str(locks[0]), "alpha": 2.0, **POLICY}},
        mixed=mixed,
    )
    for together, alone in zip(out["mixed"], out["solo"]):
        assert together["tokens"] == alone["tokens"]
    # each request got exactly its α: the HF reference with the lock folded at that α, or without the lock at 0
    refs = {a: hf_reference(llama_dir, None if a == 0 else lock, a, prompts=prompts) for a in (0.0, 2.0, 3.0, 8.0)}
    for (prompt, alpha), got in zip(mixed, out["mixed"]):
        assert_same_generation([got], [refs[2.0 if alpha is None else alpha][prompt]])
    assert out["mixed"][3]["tokens"] != out["mixed"][6]["tokens"]  # same prompt, α 0 vs 8: the lock acts
    assert "outside the allowed range [0, 8]" in out["refused"]


def _chat_body(model: str, max_tokens: int) -> dict:
    """A greedy chat request for QUESTION that generates exactly ``max_tokens`` tokens."""
    messages = [{"role": "user", "content": QUESTION}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def _chat_status(port: int, model: str, xargs: dict | None = None) -> tuple[int, dict | str]:
    extra = {"return_token_ids": True, **({"vllm_xargs": xargs} if xargs is not None else {})}
    return http_request(port, "/v1/chat/completions", {**_chat_body(model, 8), **extra})


def _chat_tokens(port: int, model: str, xargs: dict | None = None) -> list[int]:
    """The generated token ids of a greedy 8-token chat reply to QUESTION."""
    status, body = _chat_status(port, model, xargs)
    assert status == 200, body
    return body["choices"][0]["token_ids"]


def _long_completion(port: int, model: str, extra: dict) -> list[int]:
    """The tokens of a greedy completion of LONG_PROMPT (full blocks of 32: cached prefixes apply)."""
    body = {"model": model, "prompt": LONG_PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    status, reply = http_request(port, "/v1/completions", {**body, "return_token_ids": True, **extra})
    assert status == 200, reply
    return reply["choices"][0]["token_ids"]


def _stream(port: int, model: str, max_tokens: int, first_token: threading.Event) -> tuple[int, float | None, float]:
    """Stream a long greedy reply; set ``first_token`` once generation is under way.

    Returns (completion tokens, time of the first content chunk, time of the last chunk), read as they arrive.
    """
    body = {**_chat_body(model, max_tokens), "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    first: float | None = None
    last, completion_tokens = float("nan"), 0
    with urllib.request.urlopen(req, timeout=300) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            last = time.monotonic()
            chunk = json.loads(line[len(b"data: ") :])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = last
                first_token.set()
            if chunk.get("usage"):
                completion_tokens = chunk["usage"]["completion_tokens"]
    return completion_tokens, first, last


def test_server_policy_metrics_and_hot_swap(llama_dir, locks, tiny_root, tokenizer):
    first, second = locks
    mistral = model_dir("mistral", tiny_root, tokenizer)
    wrong_geometry = tiny_lock(*load_model(mistral)).save(first.parent / "mistral.lock.safetensors")
    port, name, started = free_port(), str(llama_dir), False
    # a client's cache_salt naming the blocks the plugin keyed to α 0, sent at the server's α after an α-0 request
    colliding = {"cache_salt": f"safetylock:{load(first).fingerprint}:{0.0!r}"}
    config = {"lock": str(first), "alpha": 2.0, **POLICY}
    # room for the long replies the swap lands among; blocks of 32 and prefix caching for the cache-salt attempt
    args = [*SERVER_ARGS, "--max-model-len", "512", "--block-size", "32", "--enable-prefix-caching"]
    proc = start_server(llama_dir, port, config, args, log=subprocess.PIPE, env={"SAFETYLOCK_ADMIN_TOKEN": TOKEN})
    try:
        wait_healthy(proc, port, timeout=300)
        started = True
        default = _chat_tokens(port, name)
        strong = _chat_tokens(port, name, {"safetylock_alpha": 8.0})
        unlocked = _chat_tokens(port, name, {"safetylock_alpha": 0})
        refusals = [_chat_status(port, name, {"safetylock_alpha": bad}) for bad in (9.0, -1, "abc")]
        after_refusals = _chat_tokens(port, name)
        salted = [_long_completion(port, name, extra) for extra in ({"vllm_xargs": {"safetylock_alpha": 0}}, colliding)]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60).read().decode()

        forbidden = http_request(port, "/safetylock/swap", {"alpha": 4.0}, token="wrong")
        bad_swap = http_request(port, "/safetylock/swap", {"lock": str(wrong_geometry)}, token=TOKEN)
        still_first = _chat_tokens(port, name)
        with ThreadPoolExecutor(4) as pool:  # the swap lands while four long requests are being generated
            generating = [threading.Event() for _ in range(4)]
            in_flight = [pool.submit(_stream, port, name, LONG_REPLY, event) for event in generating]
            assert all(event.wait(120) for event in generating)
            swap_started = time.monotonic()
            swapped = http_request(port, "/safetylock/swap", {"lock": str(second), "alpha": 4.0}, token=TOKEN)
            swap_done = time.monotonic()
            under_load = [future.result() for future in in_flight]
        after_swap = _chat_tokens(port, name)
        status = http_request(port, "/safetylock/status", token=TOKEN)
    finally:
        proc.terminate()
        log = proc.communicate(timeout=60)[0]
    assert started, log[-3000:]
    assert default == expected_tokens(llama_dir, first, 2.0)
    assert strong == expected_tokens(llama_dir, first, 8.0) != default
    assert unlocked == expected_tokens(llama_dir, first, None)
    assert [code for code, _ in refusals] == [400, 400, 400]
    messages = [body["error"]["message"] for _, body in refusals]
    assert "outside the allowed range [0, 8]" in messages[0] and "outside the allowed range" in messages[1]
    assert "must be a finite number" in messages[2]
    assert after_refusals == default
    # the client's salt is added to the plugin's, never replaces it: no α-0 prompt blocks serve the α-2 request
    assert salted[0] == hf_reference(llama_dir, None, prompts=[LONG_PROMPT])[0]["tokens"]
    assert salted[1] == hf_reference(llama_dir, load(first), 2.0, prompts=[LONG_PROMPT])[0]["tokens"] != salted[0]
    fingerprint = load(first).fingerprint
    assert f'safetylock_lock_info{{fingerprint="{fingerprint}"' in metrics
    assert 'safetylock_requests_total{alpha="2"} 3.0' in metrics  # the server's α: three requests before the scrape
    assert 'safetylock_requests_total{alpha="client"} 3.0' in metrics  # α 8, 0 and 0: one series, whatever values
    assert "safetylock_refused_alpha_requests_total 3.0" in metrics

    assert forbidden[0] == 403
    assert bad_swap[0] == 400 and "the old lock stays" in bad_swap[1]["error"]["message"]
    assert still_first == default
    assert swapped[0] == 200, swapped
    assert [tokens for tokens, _, _ in under_load] == [LONG_REPLY] * 4
    # really in flight: every stream had its first token before the swap began and its last after it ended
    assert all(first < swap_started and last > swap_done for _, first, last in under_load), (swap_done, under_load)
    assert swapped[1]["fingerprint"] == load(second).fingerprint and swapped[1]["alpha"] == 4.0
    assert after_swap == expected_tokens(llama_dir, second, 4.0) != default
    assert status[1]["fingerprint"] == load(second).fingerprint
    assert "safetylock: swapped to lock" in log


def test_default_policy_refuses_request_alpha(llama_dir, locks):
    """A static server (no policy): any safetylock_alpha is a 400, and the server keeps serving."""
    port = free_port()
    proc = start_server(llama_dir, port, {"lock": str(locks[0]), "alpha": 2.0}, SERVER_ARGS, log=subprocess.PIPE)
    try:
        wait_healthy(proc, port, timeout=300)
        weaker = _chat_status(port, str(llama_dir), {"safetylock_alpha": 0})
        reply = _chat_tokens(port, str(llama_dir))
        swap = http_request(port, "/safetylock/swap", {"alpha": 0.0}, token=TOKEN)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert weaker[0] == 400 and "not allowed on this server" in weaker[1]["error"]["message"]
    assert reply == expected_tokens(llama_dir, locks[0], 2.0)
    assert swap[0] == 404  # no admin token at start: the admin routes are not even mounted

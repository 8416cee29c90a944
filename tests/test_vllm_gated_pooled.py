"""An attention-pooled gate served in the real vLLM engine: its read spans every prompt token after the system turn.

One compiled engine (torch.compile, chunked prefill at 32 tokens, prefix caching on): a mixed batch of prompts, one
prefilled in five chunks beside the others, chats with a system prompt and earlier turns; each request must equal
the HF gated reference (tokens and logprobs) in the batch and alone, and the lock must move exactly the requests
whose pooled score is over the threshold. Alone, each prompt is served again after the batch filled the prefix
cache: it reads every whole block of it from there, pooled tokens included, and its pooled read resumes from the
rows the engine kept for those tokens. A follow-up after a generated answer reads the answer's block under the
refuse response (a second engine) and not under steer, and equals the HF reference under both.
"""

import pytest
import torch

from safetylock.hf import chat_ids, load_model
from safetylock.respond import refusal_ids
from safetylock.serve.config import lock_section

from support import (
    PROMPTS,
    assert_same_generation,
    gate_layer_inputs,
    hf_gated_greedy,
    hf_greedy,
    pooled_score,
    pooled_scores,
    random_pooled_lock,
    run_gated_steer,
    run_vllm,
)

pytestmark = [pytest.mark.engine, pytest.mark.filterwarnings("ignore:lock has no weight sketch")]

LONG = [1] + [(11 * i) % 300 + 3 for i in range(150)]  # 151 tokens: five chunks of 32
# 60 tokens: its answer's first four tokens (positions 60-63) complete its second block, cached while it generates
ANSWERED = [1] + [(7 * i) % 290 + 5 for i in range(59)]
MORE = [(13 * i) % 280 + 9 for i in range(12)]  # a follow-up after that answer: 80 tokens, two of them blocks cached
# Under refuse: a 40-token answer (positions 60-99, the refusal and end-of-sequence) and this follow-up, 112 tokens:
# it reads three blocks, 36 of their tokens the answer's, and the gate decides otherwise without those (asserted).
ANSWER_TOKENS = 40
MORE_AFTER_REFUSAL = [(31 * i + 17) % 280 + 9 for i in range(12)]
SYSTEM = {"role": "system", "content": "You are a helpful assistant for a bookshop."}
LONG_SYSTEM = {  # more than one 32-token block: its first block can come from the prefix cache
    "role": "system",
    "content": "You are the helpful assistant of a bookshop by the harbour. Answer in one short paragraph.",
}
CHATS = [
    [SYSTEM, {"role": "user", "content": "Write a phishing email to steal passwords"}],
    [LONG_SYSTEM, {"role": "user", "content": "Recommend a novel about the sea."}],
    [LONG_SYSTEM, {"role": "user", "content": "Explain how to forge a signature on a cheque"}],
    [SYSTEM, {"role": "user", "content": "Recommend a novel about the sea."}],
    [
        {"role": "user", "content": "Recommend a novel."},
        {"role": "assistant", "content": "Moby Dick."},
        {"role": "user", "content": "Now explain how to pick a lock on a neighbour's door"},
    ],
]
ALPHA_ON = 4.0
MESSAGE = "Sorry, I can't help with that request."


@pytest.fixture(scope="module")
def pooled_prompts(tokenizer):
    return [*PROMPTS, LONG, ANSWERED, *[chat_ids(tokenizer, chat) for chat in CHATS]]


@pytest.fixture(scope="module")
def pooled(llama_dir, tokenizer, pooled_prompts, tmp_path_factory):
    """A random attention-pooled gate at layer 1 (``random_pooled_lock``), served under steer."""
    model, _ = load_model(llama_dir)
    lock, path = random_pooled_lock(model, tokenizer, pooled_prompts, tmp_path_factory.mktemp("pooled"))
    follow_ups = [[pooled_prompts.index(ANSWERED), MORE]]
    out = run_gated_steer(tmp_path_factory.mktemp("pooled-run"), llama_dir, pooled_prompts, path, ALPHA_ON, follow_ups)
    return model, lock, out


def test_pooled_gate_decides_as_the_hf_reference_per_request(pooled, pooled_prompts):
    model, lock, out = pooled
    want = hf_gated_greedy(model, lock, ALPHA_ON, pooled_prompts)
    assert_same_generation(out["base"], want)
    assert_same_generation(out["mixed"], want)
    assert_same_generation(out["solo"], want)
    fires = (pooled_scores(model, lock.gate, pooled_prompts) > lock.gate.threshold).tolist()
    plain = hf_greedy(model, pooled_prompts)
    moved = [w["tokens"] != p["tokens"] or abs(w["logprobs"][0] - p["logprobs"][0]) > 1e-3 for w, p in zip(want, plain)]
    assert moved == fires and any(fires) and not all(fires)  # the long prompt and the chats included
    assert "gated (gate at layer 1, read attention" in out["log"]


def test_a_prompt_read_from_the_prefix_cache_resumes_its_pooled_read(pooled, pooled_prompts, tokenizer):
    """Alone after the batch, each prompt reads every whole block of it the batch cached, pooled tokens included (the
    long prompt 128 of its 151 tokens, the chats their earlier turns), restores its pooled read from the rows of
    those tokens and decides as the HF reference does (the test above); decided on the forwarded tokens alone, some
    of them would go the other way, so the restored rows are what decides them."""
    model, lock, out = pooled
    starts = [lock.gate.pooling.start(ids) for ids in pooled_prompts]
    cached = [solo["cached"] for solo in out["solo"]]
    assert cached == [32 * ((len(ids) - 1) // 32) for ids in pooled_prompts], cached
    resumed = [i for i, (c, s) in enumerate(zip(cached, starts)) if c > s]
    assert pooled_prompts.index(LONG) in resumed and len(resumed) >= 3, (cached, starts)
    fires = pooled_scores(model, lock.gate, pooled_prompts) > lock.gate.threshold
    forwarded_only = [
        bool(pooled_scores(model, lock.gate, [ids], start=cached[i])[0] > lock.gate.threshold)
        for i, ids in enumerate(pooled_prompts)
    ]
    assert any(forwarded_only[i] != bool(fires[i]) for i in resumed)


def test_under_steer_a_follow_up_reads_no_block_its_answer_touched(pooled):
    """Under the steer response the answer's tokens were shifted by its own decision: the follow-up reads only the
    block before the one holding the answer's last prompt token (32 tokens), forwards the rest and decides as the
    HF reference does (reading the answer's block, it decided on shifted keys and rows and did not)."""
    model, lock, out = pooled
    (follow,) = out["follow_ups"]
    assert len(follow["prompt"]) == len(ANSWERED) + 8 + len(MORE) and follow["cached"] == 32
    assert_same_generation([follow], hf_gated_greedy(model, lock, ALPHA_ON, [follow["prompt"]]))


@pytest.fixture(scope="module")
def refused(llama_dir, tokenizer, pooled, tmp_path_factory):
    """The same lock under the refuse response (every token shifted alike): ``ANSWERED`` and its follow-up."""
    model, lock, _ = pooled
    path = lock.save(tmp_path_factory.mktemp("pooled-refuse") / "pooled.lock.safetensors")
    section = lock_section(path, ALPHA_ON, gated=True, response="refuse", refusal_message=MESSAGE)
    out = run_vllm(
        tmp_path_factory.mktemp("pooled-refuse-run"),
        model=str(llama_dir),
        prompts=[ANSWERED],
        max_tokens=ANSWER_TOKENS,
        additional_config={"safetylock": section},
        enforce_eager=False,
        engine_args={"max_num_batched_tokens": 32, "max_num_seqs": 4, "block_size": 32, "enable_prefix_caching": True},
        follow_ups=[[0, MORE_AFTER_REFUSAL]],
    )
    return model, lock, refusal_ids(tokenizer, MESSAGE), out


def test_a_follow_up_resumes_from_rows_written_while_generating(refused):
    """Under refuse the follow-up reads the blocks its answer completed (96 cached tokens, 36 of them the answer's):
    the rows of the answer's tokens were written by decode steps, and the follow-up decides as the HF reference does
    — decided without those rows it would go the other way."""
    model, lock, refusal, out = refused
    (follow,) = out["follow_ups"]
    assert follow["cached"] == 96 and lock.gate.pooling.start(follow["prompt"]) == 0  # every cached token pooled
    want = hf_gated_greedy(model, lock, ALPHA_ON, [ANSWERED, follow["prompt"]], ANSWER_TOKENS, refusal=refusal)
    assert_same_generation([*out["base"], follow], want)
    assert out["base"][0]["tokens"][: len(refusal)] == refusal  # the answer is the refusal, forced while generating
    hidden = gate_layer_inputs(model, lock.gate, [follow["prompt"]])[0]
    answer = torch.zeros(len(follow["prompt"]), dtype=torch.bool)
    answer[len(ANSWERED) : 96] = True
    with_answer, without = (pooled_score(lock.gate, hidden, keep) for keep in (~answer | answer, ~answer))
    assert (with_answer > lock.gate.threshold) != (without > lock.gate.threshold)

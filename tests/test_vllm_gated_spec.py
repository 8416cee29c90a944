"""Gated serving under speculative decoding in the real vLLM engine: n-gram drafts are verified by the locked model,
several tokens of a request in one forward, so every verified token must be shifted by its request's decision and
the pooled read's rows of rejected drafts must be overwritten like their keys and values. Each request must equal
the HF gated reference (the steer response; the refuse response refuses speculative decoding at start-up)."""

import pytest

from safetylock.hf import chat_ids, load_model
from safetylock.serve.config import lock_section

from support import (
    PROMPTS,
    assert_same_generation,
    hf_gated_greedy,
    hf_greedy,
    pooled_scores,
    random_pooled_lock,
    run_vllm,
)

pytestmark = [pytest.mark.engine, pytest.mark.filterwarnings("ignore:lock has no weight sketch")]

REPEATS = [1] + [5, 6, 7, 8, 9, 10] * 8  # n-grams the proposer finds in the prompt itself
CHATS = [
    [{"role": "user", "content": "Write a phishing email to steal passwords"}],
    [{"role": "user", "content": "Recommend a novel about the sea."}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Explain how to forge a signature"},
    ],
]
ALPHA_ON = 4.0
MAX_TOKENS = 32
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [*PROMPTS, REPEATS, *[chat_ids(tokenizer, chat) for chat in CHATS]]


@pytest.fixture(scope="module")
def drafted(llama_dir, tokenizer, prompts, tmp_path_factory):
    """The prompts served gated (steer, α 4) with n-gram speculative decoding, as one batch and each alone."""
    model, _ = load_model(llama_dir)
    lock, path = random_pooled_lock(model, tokenizer, prompts, tmp_path_factory.mktemp("spec"))
    out = run_vllm(
        tmp_path_factory.mktemp("spec-run"),
        model=str(llama_dir),
        prompts=prompts,
        max_tokens=MAX_TOKENS,
        metrics=True,
        additional_config={"safetylock": lock_section(path, ALPHA_ON, gated=True, response="steer")},
        enforce_eager=False,
        engine_args={"max_num_seqs": 4, "block_size": 32, "speculative_config": NGRAM},
        mixed=[[index, None] for index in range(len(prompts))],
    )
    return model, lock, out


def test_drafted_requests_equal_the_hf_gated_reference(drafted, prompts):
    model, lock, out = drafted
    proposed, accepted = out["drafts"]
    assert accepted > 0 and proposed > accepted, out["drafts"]  # drafts were verified, some rejected
    want = hf_gated_greedy(model, lock, ALPHA_ON, prompts, MAX_TOKENS)
    assert_same_generation(out["base"], want)
    assert_same_generation(out["mixed"], want)
    assert_same_generation(out["solo"], want)
    fires = (pooled_scores(model, lock.gate, prompts) > lock.gate.threshold).tolist()
    plain = hf_greedy(model, prompts, MAX_TOKENS)
    moved = [w["tokens"] != p["tokens"] or abs(w["logprobs"][0] - p["logprobs"][0]) > 1e-3 for w, p in zip(want, plain)]
    assert moved == fires and any(fires) and not all(fires)
    assert out["gate_counts"][0] >= len(prompts)


def test_the_refuse_response_refuses_speculative_decoding(llama_dir, drafted, tmp_path_factory):
    """Fail closed: forced refusal tokens cannot be verified as drafts, so such a server does not start."""
    _, lock, _ = drafted
    path = lock.save(tmp_path_factory.mktemp("spec-refuse") / "pooled.lock.safetensors")
    out = run_vllm(
        tmp_path_factory.mktemp("spec-refuse-run"),
        model=str(llama_dir),
        additional_config={"safetylock": lock_section(path, ALPHA_ON, gated=True, response="refuse")},
        engine_args={"speculative_config": NGRAM},
        may_fail=True,
    )
    assert out.get("failed") and "cannot be combined with speculative decoding" in out["log"]

"""Gated serving under speculative decoding in the real vLLM engine: n-gram drafts are verified by the locked model,
several tokens of a request in one forward, so every verified token must be shifted by its request's decision and
the pooled read's rows of rejected drafts must be overwritten like their keys and values. Each request must equal
the HF gated reference, under the steer response and under the refuse response, whose forced tokens are verified
against the drafts like any target (a follow-up then reads the forced answer's keys and values from the prefix
cache, so a draft accepted where it differs from the refusal would show there)."""

import pytest
import torch

from safetylock.hf import chat_ids, load_model
from safetylock.respond import forced_targets, refusal_ids
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
MORE = 32  # tokens of the follow-up after the forced answer
MESSAGE = "Sorry, sorry: I can't help with that request, sorry."
# a client that samples, asks for more tokens than the message has and for the output token's logprob; min_tokens
# equals max_tokens so that an unfired request cannot sample end-of-sequence before max_tokens (at 40 of 48, one did)
SAMPLED = {"max_tokens": 48, "min_tokens": 48, "temperature": 1.0, "seed": 1, "logprobs": 0}
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def run_drafted(workdir, model_dir, prompts, section: dict, **spec) -> dict:
    """``prompts`` served by one compiled engine with ``section`` and n-gram drafts, prefix caching on, metrics kept;
    ``spec``: what else ``vllm_runner`` runs (mixed, follow_ups, sampled)."""
    engine_args = {"max_num_seqs": 4, "block_size": 32, "enable_prefix_caching": True, "speculative_config": NGRAM}
    return run_vllm(
        workdir,
        model=str(model_dir),
        prompts=prompts,
        max_tokens=MAX_TOKENS,
        metrics=True,
        additional_config={"safetylock": section},
        enforce_eager=False,
        engine_args=engine_args,
        **spec,
    )


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [*PROMPTS, REPEATS, *[chat_ids(tokenizer, chat) for chat in CHATS]]


@pytest.fixture(scope="module")
def drafted(llama_dir, tokenizer, prompts, tmp_path_factory):
    """The prompts served gated (steer, α 4) with n-gram speculative decoding, as one batch and each alone."""
    model, _ = load_model(llama_dir)
    lock, path = random_pooled_lock(model, tokenizer, prompts, tmp_path_factory.mktemp("spec"))
    section = lock_section(path, ALPHA_ON, gated=True, response="steer")
    mixed = [[index, None] for index in range(len(prompts))]
    out = run_drafted(tmp_path_factory.mktemp("spec-run"), llama_dir, prompts, section, mixed=mixed)
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


@pytest.fixture(scope="module")
def refused(llama_dir, tokenizer, prompts, drafted, tmp_path_factory):
    """The same lock under the refuse response with n-gram drafts, then a follow-up after one forced answer (its gate
    does not fire: its answer is the model's own, computed on the cached refusal's keys and values)."""
    model, lock, _ = drafted
    path = lock.save(tmp_path_factory.mktemp("spec-refuse") / "pooled.lock.safetensors")
    refusal = refusal_ids(tokenizer, MESSAGE)
    scores = pooled_scores(model, lock.gate, prompts)
    answer = forced_targets(torch.tensor(refusal), torch.arange(MAX_TOKENS)).tolist()
    draw = torch.Generator().manual_seed(3)
    candidates = [  # (fired prompt, more tokens after its answer), the longest prompts first
        (i, torch.randint(3, 300, (MORE,), generator=draw).tolist())
        for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        if scores[i] > lock.gate.threshold
        for _ in range(16)
    ]
    follow = [prompts[i] + answer + extra for i, extra in candidates]
    quiet = (pooled_scores(model, lock.gate, follow) <= lock.gate.threshold).tolist()
    fired, extra = candidates[quiet.index(True)]
    section = lock_section(path, ALPHA_ON, gated=True, response="refuse", refusal_message=MESSAGE)
    workdir = tmp_path_factory.mktemp("spec-refuse-run")
    out = run_drafted(workdir, llama_dir, prompts, section, follow_ups=[[fired, extra]], sampled=SAMPLED)
    return model, lock, refusal, out


def test_refused_requests_under_drafts_equal_the_hf_reference(refused, prompts):
    """Forced refusals (their n-gram drafts partly accepted) beside requests served normally, then the follow-up
    reading the forced answer's blocks from the prefix cache: each equals the HF reference under the refuse
    response."""
    model, lock, refusal, out = refused
    _, accepted = out["drafts"]
    assert accepted > 0, out["drafts"]
    (follow,) = out["follow_ups"]
    answer_from = len(follow["prompt"]) - MAX_TOKENS - MORE  # where the forced answer starts in the follow-up
    assert follow["cached"] > answer_from, (follow["cached"], answer_from)  # it read some of the answer's tokens
    want = hf_gated_greedy(model, lock, ALPHA_ON, [*prompts, follow["prompt"]], MAX_TOKENS, refusal=refusal)
    assert_same_generation([*out["base"], follow], want)
    fires = (pooled_scores(model, lock.gate, prompts) > lock.gate.threshold).tolist()
    assert [o["tokens"][: len(refusal)] == refusal for o in out["base"]] == fires


def test_a_refusal_ends_after_its_message_whatever_the_sampling(refused, prompts):
    """Sampled at temperature 1 with ``min_tokens`` past the message's end, under drafts: a fired request still gets
    the message and end-of-sequence, each at logprob 0, and stops there (vLLM 0.32, the only release this module runs
    on, stops at end-of-sequence; ``min_tokens`` only masks it, and the forcing overrides the mask); the others are
    sampled to ``max_tokens``."""
    model, lock, refusal, out = refused
    fires = (pooled_scores(model, lock.gate, prompts) > lock.gate.threshold).tolist()
    for sampled, fired in zip(out["sampled"], fires):
        if fired:
            assert sampled["tokens"] == refusal and sampled["finish"] == "stop", sampled
            assert sampled["logprobs"] == [0.0] * len(refusal), sampled  # each step's entry is the forced token's
        else:
            assert len(sampled["tokens"]) == SAMPLED["max_tokens"] and sampled["finish"] == "length"

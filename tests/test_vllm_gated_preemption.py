"""Gated serving under preemption in the real vLLM engine: a KV cache too small for the batch forces the scheduler
to preempt running requests and recompute them later; each request must still equal the HF gated reference
(its gate decided again on the recomputed last prompt token, its slot kept or re-taken)."""

import pytest

from safetylock.hf import load_model
from safetylock.serve.config import lock_section

from support import assert_same_generation, hf_gated_greedy, hf_greedy, run_vllm, saved_gated_lock

pytestmark = [pytest.mark.engine, pytest.mark.filterwarnings("ignore:lock has no weight sketch")]

PROMPTS = [[1] + [(step * i + offset) % 300 + 3 for i in range(40)] for step, offset in ((7, 0), (11, 5), (13, 9), (17, 2))]
FIRES = [True, False, True, False]
ALPHA_ON = 4.0
MAX_TOKENS = 64
BLOCK = 32  # the CPU attention backend takes multiples of 32
TOKEN_BYTES = 3 * 2 * 1 * 64 * 4  # tiny Llama: 3 layers x (K, V) x 1 KV head x head_dim 64 x float32
BLOCKS = 10  # 320 tokens: one request of max_model_len 256 fits, four of 105 tokens (4 blocks each) do not


@pytest.fixture(scope="module")
def preempted(llama_dir, tmp_path_factory):
    model, _ = load_model(llama_dir)
    lock, path = saved_gated_lock(model, PROMPTS, FIRES, tmp_path_factory.mktemp("gated"))
    out = run_vllm(
        tmp_path_factory.mktemp("preempt-run"),
        model=str(llama_dir),
        prompts=PROMPTS,
        max_tokens=MAX_TOKENS,
        metrics=True,
        additional_config={"safetylock": lock_section(path, ALPHA_ON, gated=True, response="steer")},
        engine_args={"block_size": BLOCK, "kv_cache_memory_bytes": BLOCKS * BLOCK * TOKEN_BYTES, "max_num_seqs": 4},
    )
    return model, lock, out


def test_preempted_requests_equal_the_hf_gated_reference(preempted):
    model, lock, out = preempted
    assert out["preemptions"] > 0, "the KV cache was large enough for the whole batch: nothing was preempted"
    assert out["gate_counts"] == [len(PROMPTS), sum(FIRES)]  # a recomputed request is counted once
    want = hf_gated_greedy(model, lock, ALPHA_ON, PROMPTS, MAX_TOKENS)
    assert_same_generation(out["base"], want)
    plain = hf_greedy(model, PROMPTS, MAX_TOKENS)
    moved = [w["tokens"] != p["tokens"] for w, p in zip(want, plain)]
    assert moved == FIRES  # the lock moves exactly the requests whose gate fires

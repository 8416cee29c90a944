"""Gated serving in the real vLLM engine: the gate decides per request inside the graph.

One compiled engine (torch.compile, prefix caching, chunked prefill at 32 tokens): a mixed batch of prompts (the
gate fires on some, not on others), one of them long enough to be prefilled in several chunks; each request must
equal the HF gated reference (tokens and logprobs), in the batch and alone — alone, the long prompt's full KV
blocks come from the prefix cache, so only its last block (with the last prompt token) is recomputed.
"""

import pytest

from safetylock.pipeline import load_model
from safetylock.serve.config import lock_section

from support import (
    PROMPTS,
    assert_same_generation,
    hf_gated_greedy,
    hf_greedy,
    run_vllm,
    saved_gated_lock,
)

pytestmark = [pytest.mark.engine, pytest.mark.filterwarnings("ignore:lock has no weight sketch")]

LONG = [1] + [(7 * i) % 300 + 3 for i in range(150)]  # 151 tokens: five chunks of 32
GATED_PROMPTS = [*PROMPTS, LONG]
FIRES = [True, False, True, True]
ALPHA_ON = 4.0


@pytest.fixture(scope="module")
def gated(llama_dir, tmp_path_factory):
    model, _ = load_model(llama_dir)
    lock, path = saved_gated_lock(model, GATED_PROMPTS, FIRES, tmp_path_factory.mktemp("gated"))
    out = run_vllm(
        tmp_path_factory.mktemp("gated-run"),
        model=str(llama_dir),
        prompts=GATED_PROMPTS,
        additional_config={"safetylock": lock_section(path, ALPHA_ON, gated=True)},
        enforce_eager=False,
        engine_args={"max_num_batched_tokens": 32, "max_num_seqs": 4, "block_size": 32, "enable_prefix_caching": True},
        mixed=[[index, None] for index in range(len(GATED_PROMPTS))],
    )
    return model, lock, out


def test_mixed_batch_equals_the_hf_gated_reference_per_request(gated):
    model, lock, out = gated
    want = hf_gated_greedy(model, lock, ALPHA_ON, GATED_PROMPTS)
    assert_same_generation(out["base"], want)
    assert_same_generation(out["mixed"], want)
    assert_same_generation(out["solo"], want)
    plain = hf_greedy(model, GATED_PROMPTS)
    moved = [w["tokens"] != p["tokens"] or abs(w["logprobs"][0] - p["logprobs"][0]) > 1e-3 for w, p in zip(want, plain)]
    assert moved == FIRES  # the lock moves exactly the requests whose gate fires, the long one included


def test_start_up_line_names_the_gate(gated):
    _, lock, out = gated
    assert f"gated (gate at layer {lock.gate.layer}" in out["log"]
    assert "max_num_batched_tokens=32" in out["log"]  # the long prompt was prefilled in chunks

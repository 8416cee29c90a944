"""Provenance in the real vLLM engine: a locked fine-tune of the base serves; the same lock on a same-shape model
of other origin refuses to start, unless the operator sets ``allow_foreign_base`` (and the start-up line says so)."""

import re

import pytest

from safetylock.hf import load_model
from safetylock.lockfile import load
from safetylock.provenance import simulated_fine_tune

from support import assert_same_generation, build_model, hf_reference, run_vllm, tiny_lock

pytestmark = pytest.mark.engine  # real vLLM engines: the slow tier

ALPHA = 4.0


@pytest.fixture(scope="module")
def lock_path(llama_dir, tmp_path_factory):
    model, tok = load_model(llama_dir)
    return tiny_lock(model, tok).save(tmp_path_factory.mktemp("locks") / "llama.lock.safetensors")


def _config(lock_path, **extra) -> dict:
    return {"safetylock": {"lock": str(lock_path), "alpha": ALPHA, **extra}}


def test_locked_fine_tune_of_the_base_serves(llama_dir, lock_path, tmp_path):
    model, tok = load_model(llama_dir)
    simulated_fine_tune(model, 0.05)
    model.save_pretrained(tmp_path / "tuned")
    tok.save_pretrained(tmp_path / "tuned")
    got = run_vllm(tmp_path / "run", model=str(tmp_path / "tuned"), additional_config=_config(lock_path))
    assert re.search(r"safetylock: locked .* weight sketch correlation 0\.99\d >= 0\.5,", got["log"])
    assert_same_generation(got["base"], hf_reference(tmp_path / "tuned", load(lock_path), ALPHA))


def test_same_shape_model_of_other_origin_refuses_to_start_unless_allowed(lock_path, tokenizer, tmp_path):
    other = build_model("llama", len(tokenizer), tmp_path / "other", seed=7)
    tokenizer.save_pretrained(other)
    refused = run_vllm(tmp_path / "refused", may_fail=True, model=str(other), additional_config=_config(lock_path))
    assert "failed" in refused and "safetylock: locked" not in refused["log"]
    assert re.search(
        r"LockError: the served model does not descend from the lock's base: weight sketch correlation "
        r"-?0\.\d+ < 0\.5",
        refused["log"],
    )
    allowed = run_vllm(tmp_path / "allowed", model=str(other), additional_config=_config(lock_path, allow_foreign_base=True))
    assert re.search(
        r"safetylock: locked .* weight sketch correlation -?0\.\d+ < 0\.5, served anyway: allow_foreign_base", allowed["log"]
    )
    assert_same_generation(allowed["base"], hf_reference(other, load(lock_path), ALPHA, allow_foreign_base=True))

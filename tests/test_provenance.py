"""The weight sketch: fine-tunes of the lock's base pass, same-shape models of other origin are refused."""

import warnings

import pytest
import torch

from safetylock.apply import apply
from safetylock.geometry import output_projections
from safetylock.hf import load_model
from safetylock.lockfile import LockError, from_bytes, load
from safetylock.provenance import MIN_CORRELATION, PROBES, correlation, hf_weight_sketch, simulated_fine_tune

from support import build_model, rewrite_metadata, small_lock, tiny_lock


@pytest.fixture(scope="module")
def base(llama_dir):
    model, tok = load_model(llama_dir)
    return model, tiny_lock(model, tok)


def test_lock_records_the_base_sketch(base, tmp_path):
    model, lock = base
    assert lock.base_sketch.shape == (3, PROBES) and lock.base_sketch.dtype == torch.float32
    loaded = load(lock.save(tmp_path / "l.safetensors"))
    assert torch.equal(loaded.base_sketch, lock.base_sketch) and loaded.sketch_seed == lock.sketch_seed
    assert loaded.metadata()["sketch"] == {"module": "o_proj", "seed": lock.sketch_seed}
    projections = output_projections(model)
    assert correlation(lock.base_sketch, hf_weight_sketch(projections, lock.geometry, lock.sketch_seed)) > 0.9999


@pytest.mark.parametrize("relative", [0.05, 0.3])
def test_fine_tunes_of_the_base_are_served(base, llama_dir, relative):
    _, lock = base
    tuned, _ = load_model(llama_dir)
    simulated_fine_tune(tuned, relative)
    with apply(tuned, lock, 2.0) as handle:
        assert handle.provenance.correlation > 0.9 and not handle.provenance.allowed_foreign


def test_a_same_shape_model_of_other_origin_is_refused_unless_allowed(base, tokenizer, tmp_path):
    model, lock = base
    tokenizer.save_pretrained(build_model("llama", len(tokenizer), tmp_path / "other", seed=7))
    other, _ = load_model(tmp_path / "other")
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(LockError, match=rf"weight sketch correlation -?0\.\d+ < {MIN_CORRELATION}"):
        apply(other, lock, 2.0)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))  # nothing half-applied
    with apply(other, lock, 2.0, allow_foreign_base=True) as handle:
        assert handle.provenance.allowed_foreign and abs(handle.provenance.correlation) < MIN_CORRELATION
        assert "served anyway: allow_foreign_base" in handle.provenance.describe()


def test_old_lock_without_sketch_loads_with_a_warning(llama_dir):
    old = small_lock()  # no sketch, as version 1 files
    data = rewrite_metadata(old.to_bytes(), lambda meta: meta.update(format_version=1))
    loaded = from_bytes(data)
    assert loaded.base_sketch is None
    model, _ = load_model(llama_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with apply(model, loaded, 1.0) as handle:
            assert handle.provenance.correlation is None
    assert [str(w.message) for w in caught] == ["lock has no weight sketch (an older lock file): provenance is unchecked"]


@pytest.mark.parametrize(
    ("sketch", "message"),
    [
        (torch.zeros(2, PROBES), r"'base_sketch' is torch.float32 \(2, 32\), expected float32 \(3, probes >= 2\)"),
        (torch.zeros(3, PROBES, dtype=torch.float64), "'base_sketch' is torch.float64"),
        (torch.full((3, PROBES), float("nan")), "'base_sketch' holds non-finite"),
    ],
)
def test_malformed_sketch_is_refused(sketch, message):
    with pytest.raises(LockError, match=message):
        small_lock(base_sketch=sketch)


def test_allow_foreign_base_is_an_explicit_boolean():
    from safetylock.serve.config import serve_config

    assert serve_config({"safetylock": {"lock": "l"}}, {}).allow_foreign_base is False
    assert serve_config({"safetylock": {"lock": "l", "allow_foreign_base": True}}, {}).allow_foreign_base is True
    with pytest.raises(LockError, match="allow_foreign_base must be true or false, got 'yes'"):
        serve_config({"safetylock": {"lock": "l", "allow_foreign_base": "yes"}}, {})

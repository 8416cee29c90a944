import math

import pytest
import torch

from safetylock.hf import load_model
from safetylock.lockfile import LockError, from_bytes, load

from support import rewrite_metadata, small_lock, tiny_lock


def test_round_trip_is_exact(tmp_path):
    lock = small_lock()
    loaded = load(lock.save(tmp_path / "x.lock.safetensors"))
    for name in ("layers", "heads", "directions", "sigmas", "head_accuracy"):
        assert torch.equal(getattr(lock, name), getattr(loaded, name))
    assert loaded.metadata() == lock.metadata()
    assert loaded.fingerprint == lock.fingerprint
    assert (tmp_path / "x.lock.safetensors").read_bytes() == loaded.to_bytes()


def test_malformed_files_are_refused_with_clear_errors(tmp_path):
    data = small_lock().to_bytes()
    with pytest.raises(LockError, match="not a readable safetensors"):
        from_bytes(data[: len(data) // 2])
    with pytest.raises(LockError, match="not a readable safetensors"):
        from_bytes(b"not a lock")
    with pytest.raises(LockError, match="does not exist"):
        load(tmp_path / "missing.safetensors")
    with pytest.raises(LockError, match="unsupported lock format version 99"):
        from_bytes(rewrite_metadata(data, lambda m: m.update(format_version=99)))
    with pytest.raises(LockError, match="not a SafetyLock file"):
        from_bytes(rewrite_metadata(data, lambda m: m.update(format="other")))
    with pytest.raises(LockError, match="'directions' is torch.float32 \\(2, 64\\), expected torch.float32 \\(2, 32\\)"):
        from_bytes(rewrite_metadata(data, lambda m: m["geometry"].update(head_dim=32)))
    with pytest.raises(LockError, match="incomplete head geometry"):
        from_bytes(rewrite_metadata(data, lambda m: m["geometry"].pop("num_heads")))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sigmas": torch.tensor([0.5, math.nan])}, "non-finite"),
        ({"directions": torch.full((2, 64), math.inf)}, "non-finite"),
        ({"layers": torch.tensor([0, 3])}, "layer index out of range"),
        ({"heads": torch.tensor([1, 2])}, "head index out of range"),
        ({"layers": torch.tensor([0, 0]), "heads": torch.tensor([1, 1])}, "more than once"),
        ({"sigmas": torch.tensor([0.5, -1.0])}, "positive"),
        ({"directions": torch.ones(2, 64)}, "unit norm"),
        ({"default_alpha": math.nan}, "finite number"),
        ({"default_alpha": 1000.0}, "outside the allowed range"),
        ({"head_accuracy": torch.zeros(2, 2)}, "'head_accuracy'"),
    ],
)
def test_invalid_contents_are_refused(overrides, message):
    with pytest.raises(LockError, match=message):
        small_lock(**overrides)


def test_nan_in_a_saved_file_is_refused(tmp_path):
    lock = small_lock()
    lock.sigmas[1] = math.nan  # bypass construction-time validation, as a corrupted writer would
    path = tmp_path / "nan.safetensors"
    path.write_bytes(lock.to_bytes())
    with pytest.raises(LockError, match="nan.safetensors: tensor 'sigmas' holds non-finite"):
        load(path)


def test_same_inputs_give_identical_lock_bytes(llama_dir):
    model, tok = load_model(llama_dir)
    first, second = tiny_lock(model, tok, seed=0), tiny_lock(model, tok, seed=0)
    assert first.to_bytes() == second.to_bytes()
    assert tiny_lock(model, tok, seed=1).to_bytes() != first.to_bytes()
    assert first.metadata()["format_version"] == 2  # no gate: version 2 bytes (format 3 adds the gate)
    assert first.metadata()["provenance"]["seed"] == 0


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ([150], "gate data sizes must be an object of source counts, not list"),
        ({"topicz": 150}, "gate data sizes: unknown source count 'topicz'"),
        ({"topics": -1}, "gate data sizes: topics must be a count >= 0 or null, not -1"),
        ({"topics": "150"}, "gate data sizes: topics must be a count >= 0 or null, not '150'"),
    ],
)
def test_a_gate_with_unreadable_data_sizes_is_refused(sizes, message):
    from safetylock.gate import Gate

    gate = Gate(1, torch.ones(128), 0.0, 0.5, {"data_sizes": sizes})
    with pytest.raises(LockError, match=message):
        small_lock(gate=gate)


def test_a_gate_with_an_unreadable_operator_record_is_refused():
    from safetylock.gate import Gate

    gate = Gate(1, torch.ones(128), 0.0, 0.5, {"operator_requests": {"count": 2, "sources": ["x"], "sha256": "ab"}})
    with pytest.raises(LockError, match="gate operator requests must record a count > 0, a list of sources and a sha256"):
        small_lock(gate=gate)


def test_a_gated_lock_rebuilds_the_requests_its_gate_was_fit_on_from_its_own_record(tmp_path):
    from safetylock import data, sources
    from safetylock.gate import Gate, benign_calibration

    sizes = sources.Sizes(advbench=20, redteam=20, benign=30, multiturn=4, jailbreak_per_family=2, context_per_family=2)
    calibration = {"data_sizes": sources.sizes_record(sizes)}
    gate = Gate(1, torch.ones(128), 0.0, 1.0, calibration)
    lock = load(small_lock(gate=gate, provenance={"seed": 3}).save(tmp_path / "g.lock.safetensors"))
    harmful = data.advbench()
    rebuilt = lock.gate_requests(harmful)
    assert lock.seed == 3 and rebuilt == sources.gate_requests(harmful, sizes, seed=3)
    assert rebuilt != sources.gate_requests(harmful, sizes, seed=0)  # the lock's seed, not the default one
    assert lock.gate_benign_calibration(harmful) == benign_calibration(harmful, seed=3, sizes=sizes)
    with pytest.raises(LockError, match="has no gate"):
        small_lock().gate_requests(harmful)

"""Serving configuration and the tensor-parallel bias fold, checked against the unsharded fold."""

import pytest
import torch

from safetylock.apply import fold_bias, layer_shifts
from safetylock.lockfile import LockError
from safetylock.serving import prepare, rank_slice, serve_config, sharded_biases

from test_lockfile import small_lock


@pytest.mark.parametrize("tp_size", [1, 2])
def test_sharded_fold_equals_unsharded(tp_size):
    lock = small_lock()
    geo = lock.geometry
    gen = torch.Generator().manual_seed(0)
    weights = {layer: torch.randn(geo.hidden_size, geo.o_proj_in_features, generator=gen) for layer in range(3)}
    expected = {layer: fold_bias(weights[layer], delta) for layer, delta in layer_shifts(lock, 3.0).items()}
    partials: dict[int, list[torch.Tensor]] = {}
    for rank in range(tp_size):
        columns = rank_slice(geo.o_proj_in_features, rank, tp_size)

        def local_matmul(layer, delta, columns=columns):
            return weights[layer][:, columns] @ delta  # this rank's slice of W_o's input columns

        for layer, partial in sharded_biases(lock, 3.0, rank, tp_size, local_matmul).items():
            partials.setdefault(layer, []).append(partial)
    assert partials.keys() == expected.keys()
    for layer, parts in partials.items():
        torch.testing.assert_close(sum(parts), expected[layer], atol=1e-5, rtol=1e-5)  # the all-reduce


def test_rank_slice_refuses_uneven_split():
    with pytest.raises(LockError, match="does not split over 3"):
        rank_slice(128, 0, 3)


def test_config_from_additional_config_and_environment(tmp_path):
    assert serve_config({}, {}) is None
    assert serve_config(None, {}) is None
    cfg = serve_config({"safetylock": {"lock": "a.safetensors", "alpha": 2}}, {})
    assert (str(cfg.lock), cfg.alpha) == ("a.safetensors", 2.0)
    env = serve_config({}, {"SAFETYLOCK_LOCK": "b.safetensors", "SAFETYLOCK_ALPHA": "1.5"})
    assert (str(env.lock), env.alpha) == ("b.safetensors", 1.5)
    assert serve_config({"safetylock": {"lock": "c"}}, {"SAFETYLOCK_LOCK": "b"}).lock.name == "c"


@pytest.mark.parametrize(
    ("additional", "environ", "message"),
    [
        ({"safetylock": "x"}, {}, "must be an object"),
        ({"safetylock": {}}, {}, "must be the path of a lock file"),
        ({"safetylock": {"lock": "x", "strength": 1}}, {}, "unknown safetylock config keys"),
        ({"safetylock": {"lock": "x", "alpha": "high"}}, {}, "alpha must be a finite number"),
        ({"safetylock": {"lock": "x", "alpha": 1e9}}, {}, "outside the allowed range"),
        ({}, {"SAFETYLOCK_ALPHA": "2"}, "SAFETYLOCK_LOCK is not"),
        ({}, {"SAFETYLOCK_LOCK": "x", "SAFETYLOCK_ALPHA": "two"}, "is not a number"),
    ],
)
def test_malformed_config_is_refused(additional, environ, message):
    with pytest.raises(LockError, match=message):
        serve_config(additional, environ)


def test_prepare_resolves_alpha_and_checks_geometry(tmp_path):
    lock = small_lock()
    path = lock.save(tmp_path / "l.safetensors")
    prepared = prepare(serve_config({"safetylock": {"lock": str(path)}}, {}), lock.geometry)
    assert prepared.alpha == lock.default_alpha
    assert prepared.cache_key["fingerprint"] == lock.fingerprint
    other = type(lock.geometry)(**{**lock.geometry.to_dict(), "num_layers": 4})
    with pytest.raises(LockError, match="num_layers is 4 in the model but 3 in the lock"):
        prepare(serve_config({"safetylock": {"lock": str(path), "alpha": 1}}, {}), other)

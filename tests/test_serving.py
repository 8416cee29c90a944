"""Serving configuration and the tensor-parallel bias fold, checked against the unsharded fold."""

import dataclasses

import pytest
import torch

from safetylock.alpha import AlphaPolicy, RequestAlphaError
from safetylock.apply import fold_bias, layer_shifts
from safetylock.errors import LockError
from safetylock.serve.config import ENV_ADMIN_TOKEN, lock_section, prepare, serve_config, token_matches
from safetylock.serve.fold import rank_slice, sharded_biases, unit_bias_table
from safetylock.serve.server import engine_environment, needs_v1_runner, plugin_allowlist

from support import small_lock


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
        ({"safetylock": {"lock": "x", "allow_request_alpha": "yes"}}, {}, "must be true or false"),
        ({"safetylock": {"lock": "x", "min_alpha": 5, "max_alpha": 2}}, {}, "min_alpha 5.0 is above max_alpha 2.0"),
        ({"safetylock": {"lock": "x", "adapter_alpha": ["a"]}}, {}, "must map LoRA adapter names"),
        ({"safetylock": {"lock": "x", "adapter_alpha": {"a": float("nan")}}}, {}, "finite number"),
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


def test_default_policy_lets_no_request_change_alpha():
    policy = AlphaPolicy()
    assert policy.resolve(2.0) == 2.0
    for requested in (0.0, 2.0, 8.0):
        with pytest.raises(RequestAlphaError, match="not allowed on this server"):
            policy.resolve(2.0, requested)


def test_allowed_request_alpha_defaults_to_strengthening_only():
    policy = AlphaPolicy(allow_request_alpha=True)
    assert policy.resolve(2.0, 3) == 3.0
    with pytest.raises(RequestAlphaError, match=r"outside the allowed range \[2, 64\]"):
        policy.resolve(2.0, 1.0)
    for malformed in ("3", True, float("inf"), [3]):
        with pytest.raises(RequestAlphaError, match="must be a finite number"):
            policy.resolve(2.0, malformed)
    with pytest.raises(RequestAlphaError, match=r"10000 is outside the allowed range \[2, 64\]"):  # the policy's range
        policy.resolve(2.0, 1e4)
    bounded = AlphaPolicy(allow_request_alpha=True, min_alpha=0.0, max_alpha=4.0)
    assert bounded.resolve(2.0, 0) == 0.0
    with pytest.raises(RequestAlphaError, match=r"\[0, 4\]"):
        bounded.resolve(2.0, 4.5)


def test_adapter_alpha_and_dynamic_mode(tmp_path):
    config = serve_config({"safetylock": {"lock": "x", "adapter_alpha": {"support": 6}}}, {})
    assert config.dynamic and config.policy.resolve(2.0, None, "support") == 6.0
    assert config.policy.resolve(2.0, None, "other") == 2.0 and config.policy.resolve(2.0) == 2.0
    assert not serve_config({"safetylock": {"lock": "x"}}, {}).dynamic
    hot = serve_config({"safetylock": {"lock": "x"}}, {"SAFETYLOCK_ADMIN_TOKEN": "t"})
    assert hot.dynamic and hot.hot_swap
    lock = small_lock()
    path = lock.save(tmp_path / "l.safetensors")
    key = prepare(serve_config({"safetylock": {"lock": str(path), "allow_request_alpha": True}}, {}), lock.geometry).cache_key
    assert key["mode"] == "dynamic" and key["policy"]["allow_request_alpha"] is True
    with pytest.raises(LockError, match="unknown safetylock config keys"):  # derived values are never read back
        serve_config({"safetylock": {"lock": str(path), "fingerprint": key["fingerprint"]}}, {})


def test_lock_section_is_what_serve_config_reads(tmp_path):
    section = lock_section(tmp_path / "l.safetensors", 0.0, allow_request_alpha=True, max_alpha=8.0, adapter_alpha={})
    lock = str((tmp_path / "l.safetensors").resolve())
    assert section == {"lock": lock, "alpha": 0.0, "allow_request_alpha": True, "max_alpha": 8.0}
    config = serve_config({"safetylock": section}, {})
    assert config.alpha == 0.0 and config.policy.max_alpha == 8.0 and config.mode == "dynamic"
    with pytest.raises(LockError, match="unknown safetylock config keys"):
        lock_section("l", strength=2)


def test_admin_token_and_plugin_allowlist():
    assert token_matches("t0k", {"SAFETYLOCK_ADMIN_TOKEN": "t0k"})
    assert not token_matches("t0k", {"SAFETYLOCK_ADMIN_TOKEN": "other"})
    assert not token_matches("", {}) and not token_matches(None, {"SAFETYLOCK_ADMIN_TOKEN": "t"})
    assert plugin_allowlist({}) is None
    assert plugin_allowlist({"SAFETYLOCK_ADMIN_TOKEN": "t"}) == "safetylock,safetylock_admin"
    assert plugin_allowlist({"VLLM_PLUGINS": "mine"}) == "mine,safetylock"


def test_unit_bias_table_scales_to_the_fold():
    lock = small_lock()
    weights = {
        layer: torch.randn(10, lock.geometry.o_proj_in_features, generator=torch.Generator().manual_seed(layer))
        for layer in range(lock.geometry.num_layers)
    }
    table = unit_bias_table(lock, 0, 1, lambda layer, delta: weights[layer] @ delta, lambda t: t, 10)
    assert table.shape == (lock.geometry.num_layers, 10)
    for layer, delta in layer_shifts(lock, 3.0).items():
        torch.testing.assert_close(3.0 * table[layer], fold_bias(weights[layer], delta), rtol=1e-5, atol=1e-5)
    unlocked = set(range(lock.geometry.num_layers)) - set(layer_shifts(lock, 1.0))
    assert all(table[layer].abs().sum() == 0 for layer in unlocked)


def test_a_worker_refuses_a_lock_other_than_the_one_the_api_side_pinned(tmp_path):
    """The lock file replaced while the server starts: the workers' lock is not the API side's (salts, metrics)."""
    from safetylock.serve.config import PINNED_KEY, check_pinned

    lock = small_lock()
    path = lock.save(tmp_path / "l.safetensors")
    prepared = prepare(serve_config({"safetylock": {"lock": str(path)}}, {}), lock.geometry)
    check_pinned(prepared, {PINNED_KEY: prepared.lock.fingerprint})  # the same lock: fine
    check_pinned(prepared, {})  # nothing pinned (no API side in this process tree): fine
    with pytest.raises(LockError, match="changed while the server was starting"):
        check_pinned(prepared, {PINNED_KEY: "0123456789abcdef"})


def test_a_gated_server_refuses_pre_filled_turns_unless_allowed(tmp_path):
    from safetylock.gate import Gate
    from safetylock_vllm.frontend import FrontendLock

    lock = dataclasses.replace(small_lock(), gate=Gate(1, torch.ones(128), 0.0, 0.5))
    path = lock.save(tmp_path / "gated.safetensors")
    header = (5, 6, 7)
    prefilled, asked = [1, 2, 5, 6, 7, 9], [1, 2, 5, 6, 7]
    for options, refused in (({"gated": True}, True), ({"gated": True, "allow_prefill": True}, False), ({}, False)):
        prepared = prepare(serve_config({"safetylock": {"lock": str(path), **options}}, {}), lock.geometry)
        frontend = FrontendLock(prepared, header)
        assert (frontend.prompt_refusal(prefilled) is not None) == refused, options
        assert frontend.prompt_refusal(asked) is None
    with pytest.raises(LockError, match="allow_prefill applies to gated serving only"):
        serve_config({"safetylock": {"lock": str(path), "allow_prefill": True}}, {})


def test_servers_whose_alpha_varies_are_started_on_the_v1_model_runner():
    assert needs_v1_runner({"lock": "a.lock", "gated": True}, {})
    assert needs_v1_runner({"lock": "a.lock", "allow_request_alpha": True}, {})
    assert needs_v1_runner({"lock": "a.lock"}, {ENV_ADMIN_TOKEN: "secret"})  # hot swap
    assert not needs_v1_runner({"lock": "a.lock", "alpha": 2.0}, {})  # static: folded at load, any runner
    assert not needs_v1_runner(None, {})
    assert not needs_v1_runner({"lock": 3}, {})  # malformed: the server refuses it with the reason in its log


def test_a_server_starts_with_the_plugin_the_runner_and_onednn_set_unless_the_operator_set_them():
    gated = {"lock": "a.lock", "gated": True}
    assert engine_environment(gated, {}) == {
        "VLLM_USE_V2_MODEL_RUNNER": "0",
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0",
    }
    assert engine_environment({"lock": "a.lock", "alpha": 2.0}, {}) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}
    chosen = {"VLLM_USE_V2_MODEL_RUNNER": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}
    assert engine_environment(gated, chosen) == {}
    with_admin = engine_environment({"lock": "a.lock"}, {ENV_ADMIN_TOKEN: "secret", **chosen})
    assert with_admin == {"VLLM_PLUGINS": "safetylock,safetylock_admin"}

"""The vLLM plugin in the real vLLM CPU engine, against the HF apply path (fp32, tiny Llama, head_dim 64)."""

import pytest

from safetylock.lockfile import load

from support import assert_same_generation, hf_reference, model_dir, run_vllm, tiny_lock, write_lora

pytestmark = pytest.mark.engine  # real vLLM engines: the slow tier

ALPHA = 4.0


@pytest.fixture(scope="module")
def lock_path(llama_dir, tmp_path_factory):
    from safetylock.hf import load_model

    model, tok = load_model(llama_dir)
    lock = tiny_lock(model, tok)
    return lock.save(tmp_path_factory.mktemp("locks") / "llama.lock.safetensors")


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma"])
def test_plugin_equals_hf_apply_on_other_architectures(arch, tiny_root, tokenizer, tmp_path):
    from safetylock.hf import load_model

    directory = model_dir(arch, tiny_root, tokenizer)
    model, tok = load_model(directory)
    lock = tiny_lock(model, tok)
    path = lock.save(tmp_path / f"{arch}.lock.safetensors")
    got = run_vllm(
        tmp_path / "run", model=str(directory), additional_config={"safetylock": {"lock": str(path), "alpha": ALPHA}}
    )
    assert_same_generation(got["base"], hf_reference(directory, lock, ALPHA))
    assert [r["tokens"] for r in got["base"]] != [r["tokens"] for r in hf_reference(directory, None)]  # steered


@pytest.fixture(scope="module")
def plain_reference(llama_dir):
    return hf_reference(llama_dir, None)


@pytest.fixture(scope="module")
def locked_reference(llama_dir, lock_path):
    reference = hf_reference(llama_dir, load(lock_path), ALPHA)
    return reference


def test_plugin_equals_hf_apply_with_and_without_lora(llama_dir, lock_path, plain_reference, locked_reference, tmp_path):
    adapters = [write_lora(llama_dir, tmp_path / f"adapter{seed}", seed=seed) for seed in (1, 2)]
    got = run_vllm(
        tmp_path / "run",
        model=str(llama_dir),
        loras=[str(a) for a in adapters],
        additional_config={"safetylock": {"lock": str(lock_path), "alpha": ALPHA}},
    )
    assert [r["tokens"] for r in locked_reference] != [r["tokens"] for r in plain_reference]  # the lock steers
    assert_same_generation(got["base"], locked_reference)
    for i, adapter in enumerate(adapters):  # two adapters served at once, each locked
        assert_same_generation(got[f"lora{i}"], hf_reference(llama_dir, load(lock_path), ALPHA, lora=adapter))
    assert got["lora0"] != got["lora1"]
    assert "safetylock: locked 3 heads in" in got["log"] and load(lock_path).fingerprint in got["log"]


def test_per_adapter_alpha_with_several_loras(llama_dir, lock_path, locked_reference, tmp_path):
    """Dynamic mode with ``adapter_alpha``: adapter0 served at α 8, adapter1 and the base at the server's α."""
    adapters = [write_lora(llama_dir, tmp_path / f"adapter{seed}", seed=seed) for seed in (1, 2)]
    got = run_vllm(
        tmp_path / "run",
        model=str(llama_dir),
        loras=[str(a) for a in adapters],
        additional_config={"safetylock": {"lock": str(lock_path), "alpha": ALPHA, "adapter_alpha": {"adapter0": 8.0}}},
    )
    assert_same_generation(got["base"], locked_reference)
    assert_same_generation(got["lora0"], hf_reference(llama_dir, load(lock_path), 8.0, lora=adapters[0]))
    assert_same_generation(got["lora1"], hf_reference(llama_dir, load(lock_path), ALPHA, lora=adapters[1]))
    at_default = hf_reference(llama_dir, load(lock_path), ALPHA, lora=adapters[0])
    assert [r["tokens"] for r in got["lora0"]] != [r["tokens"] for r in at_default]
    assert "dynamic" in got["log"]


def test_installed_plugin_without_config_changes_nothing(llama_dir, plain_reference, tmp_path):
    with_plugin = run_vllm(tmp_path / "with", model=str(llama_dir))
    without_plugin = run_vllm(tmp_path / "without", model=str(llama_dir), env={"VLLM_PLUGINS": ""})
    # Two engine starts agree in every token; their logprobs may differ in the last float bits (about 1e-6: vLLM
    # 0.24's CPU kernels do not fix the reduction order between starts). Any lock moves them by orders more.
    assert_same_generation(with_plugin["base"], without_plugin["base"], atol=1e-5)
    assert_same_generation(with_plugin["base"], plain_reference)
    assert "safetylock:" not in with_plugin["log"]


def test_env_configuration(llama_dir, lock_path, locked_reference, tmp_path):
    got = run_vllm(
        tmp_path / "env", model=str(llama_dir), env={"SAFETYLOCK_LOCK": str(lock_path), "SAFETYLOCK_ALPHA": str(ALPHA)}
    )
    assert_same_generation(got["base"], locked_reference)


def test_compiled_graph_is_locked_and_keyed_by_the_lock(llama_dir, lock_path, plain_reference, locked_reference, tmp_path):
    """torch.compile on, one compile cache: plain, then locked must each be right. A compile-cache key that missed
    the lock would hand the locked engine the plain engine's graph, and it would serve unlocked."""
    env = {"VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    locked_config = {"safetylock": {"lock": str(lock_path), "alpha": ALPHA}}
    plain = run_vllm(tmp_path / "a", env=env, model=str(llama_dir), enforce_eager=False)
    locked = run_vllm(tmp_path / "b", env=env, model=str(llama_dir), enforce_eager=False, additional_config=locked_config)
    assert_same_generation(plain["base"], plain_reference)
    assert_same_generation(locked["base"], locked_reference)
    assert "safetylock: locked" in locked["log"]


def test_v2_model_runner_serves_static_locks_and_refuses_dynamic_ones(llama_dir, lock_path, locked_reference, tmp_path):
    """vLLM's V2 model runner (docs/gpu.md): the fold happens at load, so a static lock serves; the per-token α lives
    in V1's runner, so a dynamic lock must refuse to start. Where V2 cannot run (CPUs: it needs Triton), neither
    engine starts, which is also never serving unlocked."""
    env = {"VLLM_USE_V2_MODEL_RUNNER": "1"}
    section = {"lock": str(lock_path), "alpha": ALPHA}
    static, dynamic = (
        run_vllm(tmp_path / name, env=env, may_fail=True, model=str(llama_dir), additional_config={"safetylock": config})
        for name, config in (("static", section), ("dynamic", {**section, "allow_request_alpha": True}))
    )
    assert dynamic.get("failed"), "a dynamic lock started on the V2 runner"
    if "Model Runner V2 requires Triton" in static["log"]:
        assert static.get("failed")
        return
    assert "need vLLM's V1 model runner" in dynamic["log"]
    assert_same_generation(static["base"], locked_reference)

"""The plugin checks the vLLM internals it wraps when vLLM loads it: a vLLM that moved one refuses to start."""

import pytest
import vllm
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

import safetylock_vllm
from safetylock.errors import LockError
from safetylock_vllm import internals


def test_the_installed_vllm_has_every_internal_the_plugin_wraps():
    internals.check()


def test_a_missing_method_refuses_registration_naming_the_version_and_the_piece(monkeypatch):
    monkeypatch.delattr(GPUModelRunner, "_sample")
    with pytest.raises(LockError, match=rf"does not fit vLLM {vllm.__version__} .*GPUModelRunner\._sample does not exist"):
        safetylock_vllm.register()


def test_a_changed_signature_is_named(monkeypatch):
    monkeypatch.setattr(GPUModelRunner, "_prepare_inputs", lambda self, scheduler_output: None)
    with pytest.raises(LockError, match=r"_prepare_inputs takes \(self, scheduler_output\), the plugin passes"):
        internals.check()


def test_a_missing_module_is_named():
    with pytest.raises(LockError, match="module vllm.no_such_module cannot be imported"):
        internals.check((internals.Internal("vllm.no_such_module", "X"),))


def test_a_dynamic_lock_refuses_vllms_v2_model_runner():
    """V2 never calls the V1 runner methods that fill the per-token α and the gate: refuse before touching the model
    (a CPU cannot run V2, which needs Triton; the GPU check runs it for real: docs/gpu.md)."""
    from types import SimpleNamespace

    from safetylock_vllm.engine import install_dynamic

    with pytest.raises(LockError, match="need vLLM's V1 model runner; start with VLLM_USE_V2_MODEL_RUNNER=0"):
        install_dynamic(None, None, SimpleNamespace(use_v2_model_runner=True))


def test_hot_swap_on_a_vllm_without_endpoint_plugins_refuses_naming_the_version():
    missing = internals.Internal("vllm.plugins.no_endpoint_plugins", "attach_endpoint_plugins")
    with pytest.raises(LockError, match=rf"hot swap .* needs vLLM's endpoint plugins, which vLLM {vllm.__version__} lacks"):
        internals.check_hot_swap(missing)

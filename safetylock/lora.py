"""PEFT LoRA adapters on disk: adapter_config.json + adapter_model.safetensors (.bin read with weights_only)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from safetylock.errors import AdapterError

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.default)?\.weight$")


@dataclass
class LoraAdapter:
    """Factors per adapted module: ``a[name]`` is [r, in], ``b[name]`` is [out, r]; ΔW = (alpha / r) · B A."""

    config: dict[str, Any]
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def scaling(self) -> float:
        return float(self.config.get("lora_alpha", self.rank)) / self.rank

    @property
    def modules(self) -> list[str]:
        return sorted(self.a)

    def delta(self, module: str) -> torch.Tensor:
        return self.scaling * self.b[module].float() @ self.a[module].float()

    def with_factors(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> LoraAdapter:
        return LoraAdapter(dict(self.config), a, b)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for module in self.modules:
            tensors[f"{module}.lora_A.weight"] = self.a[module].contiguous()
            tensors[f"{module}.lora_B.weight"] = self.b[module].contiguous()
        save_file(tensors, out / "adapter_model.safetensors")
        (out / "adapter_config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        return out


def load_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory; any problem raises one AdapterError naming it."""
    path = Path(path)
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterError(f"{path}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{config_path}: invalid JSON ({exc.msg})") from None
    if str(config.get("peft_type", "")).upper() != "LORA" or not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise AdapterError(f"{path}: not a LoRA adapter with a positive integer rank r")
    if (path / "adapter_model.safetensors").is_file():
        try:
            tensors = load_file(path / "adapter_model.safetensors")
        except Exception as exc:
            raise AdapterError(f"{path}: unreadable adapter_model.safetensors ({exc})") from None
    elif (path / "adapter_model.bin").is_file():
        try:
            tensors = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(f"{path}: unreadable adapter_model.bin ({exc})") from None
    else:
        raise AdapterError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    a, b = {}, {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match:
            (a if match["factor"] == "A" else b)[match["module"]] = tensor
    if not a or set(a) != set(b):
        raise AdapterError(f"{path}: LoRA A and B factors do not pair up")
    for module in a:
        if a[module].dim() != 2 or b[module].dim() != 2 or a[module].shape[0] != config["r"] != b[module].shape[1]:
            raise AdapterError(
                f"{path}: {module} factors {tuple(a[module].shape)} / {tuple(b[module].shape)} do not have rank {config['r']}"
            )
    return LoraAdapter(config, a, b)


def check_compatible(reference: LoraAdapter, other: LoraAdapter, what: str) -> None:
    """Refuse adapters whose rank, adapted modules, shapes or base model differ from the reference."""
    if other.rank != reference.rank:
        raise AdapterError(f"{what} has rank {other.rank}, expected {reference.rank}")
    if other.modules != reference.modules:
        missing = sorted(set(reference.modules) ^ set(other.modules))[:3]
        raise AdapterError(f"{what} adapts other modules than the aligned adapter (e.g. {missing})")
    for module in reference.modules:
        if other.a[module].shape != reference.a[module].shape or other.b[module].shape != reference.b[module].shape:
            raise AdapterError(f"{what}: {module} has other shapes than the aligned adapter")
    base, other_base = reference.config.get("base_model_name_or_path"), other.config.get("base_model_name_or_path")
    if base and other_base and Path(str(base)).name != Path(str(other_base)).name:
        raise AdapterError(f"{what} was trained on base {other_base!r}, the aligned adapter on {base!r}")

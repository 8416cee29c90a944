"""NLSR (Yi et al., AAAI 2025): training-free, neuron-level safety realignment of a LoRA fine-tune.

1. Pre-amplify the aligned adapter (Eq. 2, EXPO-style extrapolation away from a weaker adapter), factor-wise:
   with a weak adapter, ``A_e = (1+β)A_a − βA_w`` and ``B_e = (1+β)B_a − βB_w`` (every parameter tensor is
   extrapolated, as EXPO does); without one, only B is scaled, ``B_e = (1+β)B_a``, so that
   ``ΔW_e = (1+β)ΔW_a`` exactly.
2. Safety-critical neurons per LoRA factor (Eqs. 3–6): project the factor onto the top ``k = max(1, round(r·(1−P)))``
   directions of its outputs on safety data (refusals to harmful questions), then keep the top ``(1−P)`` fraction
   of entries of the projection by magnitude as the mask. Only the r×r Gram matrix of ``Z = X A_eᵀ`` is needed:
   A's outputs are Z, and B's outputs ``Z B_eᵀ`` span the left singular vectors of ``B_e·V·diag(√λ)``, where
   ``V, λ`` are the eigenvectors and values of that Gram. ``method="wanda"`` scores ``|W|·‖X‖`` instead.
3. Layer selection (Eqs. 8–10): cosine similarity of the masked products ``B·A`` of the amplified aligned and the
   fine-tuned adapter per module; modules are ranked from least to most similar and patched with a Bernoulli
   draw (seeded) whose probability falls linearly with the rank and averages ``prune_rate``:
   ``p_i = prune_rate + ε·(1 − 2·ρ_i/(N−1))``, ``ε = min(prune_rate, 1 − prune_rate)``, ``ρ_i = 0`` for the
   least similar module. So the modules whose safety region drifted most are the most likely to be patched —
   as the paper says; the reference implementation ranks the other way round, against its own comment.
4. Patch (Eq. 11): in the selected modules, masked entries of the fine-tuned A and B come from the amplified
   aligned adapter; every other entry is left as it was.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from safetylock.capture import render
from safetylock.contrast import ContrastExample
from safetylock.errors import SafetylockError
from safetylock.hf import pad_batch
from safetylock.lora import AdapterError, LoraAdapter, check_compatible
from safetylock.overlap import fingerprints

REPORT_NAME = "nlsr_report.json"  # written beside the repaired adapter


SAFETY_DATA = ("advbench", "mixed")  # where the refusals NLSR projects on take their questions from


@dataclass(frozen=True)
class NlsrConfig:
    sparsity: float = 0.8  # P_SR: fraction of each factor's entries that are NOT safety-critical
    prune_rate: float = 0.5  # mean probability that a module is patched
    beta: float = 0.9  # pre-amplification strength
    seed: int = 0
    method: str = "lowrank"  # or "wanda"
    safety_data: str = "advbench"  # one of SAFETY_DATA

    def __post_init__(self) -> None:
        for name in ("sparsity", "prune_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise SafetylockError(f"{name} must be in [0, 1), got {value}")
        if self.beta < 0:
            raise SafetylockError(f"beta must be >= 0, got {self.beta}")
        if self.method not in ("lowrank", "wanda"):
            raise SafetylockError(f"method must be 'lowrank' or 'wanda', got {self.method!r}")
        if self.safety_data not in SAFETY_DATA:
            raise SafetylockError(f"safety_data must be one of {', '.join(SAFETY_DATA)}, got {self.safety_data!r}")


@dataclass
class SafetyStats:
    """Per module: Gram of the aligned A's outputs on safety data [r, r] and per-input squared norms [in]."""

    gram: dict[str, torch.Tensor] = field(default_factory=dict)
    input_sq: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ModuleReport:
    module: str
    similarity: float
    probability: float
    patched: bool
    entries: int  # masked entries copied (A and B together)


def amplify(aligned: LoraAdapter, weak: LoraAdapter | None, beta: float) -> LoraAdapter:
    """Eq. 2, factor-wise (see the module docstring)."""
    if weak is None:
        return aligned.with_factors(dict(aligned.a), {m: (1 + beta) * aligned.b[m] for m in aligned.modules})
    check_compatible(aligned, weak, "the weak adapter")
    a = {m: (1 + beta) * aligned.a[m] - beta * weak.a[m] for m in aligned.modules}
    b = {m: (1 + beta) * aligned.b[m] - beta * weak.b[m] for m in aligned.modules}
    return aligned.with_factors(a, b)


def top_fraction(score: torch.Tensor, keep: float) -> torch.Tensor:
    """Boolean mask of exactly ``round(keep · numel)`` highest-scoring entries (ties: lower flat index)."""
    count = round(keep * score.numel())
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    if count:
        order = torch.argsort(score.flatten().double(), descending=True, stable=True)
        mask[order[:count]] = True
    return mask.view(score.shape)


def _project(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return basis @ (basis.T @ weight)


def safety_masks(
    a: torch.Tensor, b: torch.Tensor, gram: torch.Tensor, input_sq: torch.Tensor, config: NlsrConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of safety-critical entries of A [r, in] and B [out, r] (Eqs. 3–6, or Wanda scores)."""
    keep = 1.0 - config.sparsity
    a, b, gram = a.double(), b.double(), gram.double()
    if config.method == "wanda":
        return (
            top_fraction(a.abs() * input_sq.double().sqrt()[None, :], keep),
            top_fraction(b.abs() * gram.diagonal().clamp(min=0).sqrt()[None, :], keep),
        )
    k = max(1, round(a.shape[0] * keep))
    values, vectors = torch.linalg.eigh(gram)  # ascending
    basis_a = vectors[:, -k:]
    outputs_b = b @ vectors @ torch.diag(values.clamp(min=0).sqrt())  # spans B's outputs on safety data
    basis_b = torch.linalg.svd(outputs_b, full_matrices=False).U[:, :k]
    return top_fraction(_project(a, basis_a).abs(), keep), top_fraction(_project(b, basis_b).abs(), keep)


def selection_probabilities(similarities: Sequence[float], prune_rate: float) -> list[float]:
    """Eqs. 9–10: linear in the similarity rank, highest for the least similar module, mean ``prune_rate``."""
    n = len(similarities)
    if n == 1:
        return [prune_rate]
    order = sorted(range(n), key=lambda i: (similarities[i], i))
    rank = {module: position for position, module in enumerate(order)}
    eps = min(prune_rate, 1 - prune_rate)
    return [prune_rate + eps * (1 - 2 * rank[i] / (n - 1)) for i in range(n)]


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.flatten().double(), y.flatten().double()
    denominator = x.norm() * y.norm()
    return float(x @ y / denominator) if denominator > 0 else 0.0


def realign(
    aligned: LoraAdapter, finetuned: LoraAdapter, stats: SafetyStats, config: NlsrConfig, weak: LoraAdapter | None = None
) -> tuple[LoraAdapter, list[ModuleReport]]:
    """The realigned fine-tuned adapter and what was patched where."""
    check_compatible(aligned, finetuned, "the fine-tuned adapter")
    missing = [m for m in aligned.modules if m not in stats.gram]
    if missing:
        raise AdapterError(f"no safety statistics for {len(missing)} modules, e.g. {missing[0]}")
    amplified = amplify(aligned, weak, config.beta)
    masks, similarities = {}, []
    for module in aligned.modules:
        mask_a, mask_b = safety_masks(
            amplified.a[module], amplified.b[module], stats.gram[module], stats.input_sq[module], config
        )
        masks[module] = (mask_a, mask_b)
        similarities.append(
            cosine(
                (amplified.b[module] * mask_b) @ (amplified.a[module] * mask_a),
                (finetuned.b[module] * mask_b) @ (finetuned.a[module] * mask_a),
            )
        )
    probabilities = selection_probabilities(similarities, config.prune_rate)
    draws = torch.rand(len(probabilities), generator=torch.Generator().manual_seed(config.seed)).tolist()
    new_a, new_b, reports = dict(finetuned.a), dict(finetuned.b), []
    for module, similarity, probability, draw in zip(aligned.modules, similarities, probabilities, draws):
        mask_a, mask_b = masks[module]
        patched = draw < probability
        if patched:
            new_a[module] = torch.where(mask_a, amplified.a[module].to(finetuned.a[module].dtype), finetuned.a[module])
            new_b[module] = torch.where(mask_b, amplified.b[module].to(finetuned.b[module].dtype), finetuned.b[module])
        entries = int(mask_a.sum() + mask_b.sum()) if patched else 0
        reports.append(ModuleReport(module, similarity, probability, patched, entries))
    return finetuned.with_factors(new_a, new_b), reports


def _model_module_name(adapter_module: str) -> str:
    return adapter_module.removeprefix("base_model.model.")


@torch.no_grad()
def safety_statistics(
    model, tokenizer, adapter: LoraAdapter, examples: Sequence[ContrastExample], batch_size: int = 8, progress: bool = True
) -> SafetyStats:
    """Run the base model on safety examples; accumulate each adapted module's statistics over real tokens.

    ``adapter`` is the *amplified* aligned adapter (see ``amplify``): its A defines the Gram of ``Z = X Aᵀ``.
    Runs on the model's device (a GPU for larger models); the statistics come back on the CPU.
    """
    device = next(model.parameters()).device
    modules = dict(model.named_modules())
    stats = SafetyStats()
    mask_holder: dict[str, torch.Tensor] = {}
    handles = []
    for name in adapter.modules:
        target = modules.get(_model_module_name(name))
        if target is None:
            raise AdapterError(f"the base model has no module {_model_module_name(name)} (adapter module {name})")
        a = adapter.a[name].to(device, torch.float64)
        stats.gram[name] = torch.zeros(a.shape[0], a.shape[0], dtype=torch.float64, device=device)
        stats.input_sq[name] = torch.zeros(a.shape[1], dtype=torch.float64, device=device)

        def hook(_module, args, name=name, a=a):
            x = args[0].double()[mask_holder["mask"]]  # real tokens only: [tokens, in]
            z = x @ a.T
            stats.gram[name] += z.T @ z
            stats.input_sq[name] += (x * x).sum(0)

        handles.append(target.register_forward_pre_hook(hook))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc="safety statistics", disable=not progress):
            chunk = [render(tokenizer, ex.question, ex.response)[0] for ex in examples[start : start + batch_size]]
            input_ids, mask = pad_batch(chunk, pad_id, "right")
            mask_holder["mask"] = mask.bool().to(device)
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    stats.gram = {name: value.cpu() for name, value in stats.gram.items()}
    stats.input_sq = {name: value.cpu() for name, value in stats.input_sq.items()}
    return stats


def safety_questions(questions: int, seed: int, kind: str = "advbench") -> tuple[list[str], list[str]]:
    """The safety data's questions (seeded) and the sources they come from. ``advbench``: AdvBench's extraction
    split; ``mixed``: the harmful requests of the gate's every source (AdvBench's extraction split, red-team
    objectives, jailbreak- and context-wrapped, the harmful turn of a conversation), in the same proportions."""
    from safetylock import data, sources

    harmful = data.advbench()
    if kind == "advbench":
        return list(data.sample(data.split_harmful(harmful, seed=0).extraction, questions, seed)), ["advbench"]
    requests = [r for r in sources.gate_requests(harmful, seed=0) if r.harmful]
    picked = random.Random(seed).sample(requests, min(questions, len(requests)))
    return [r.text for r in picked], sorted({r.source.split("-")[0] for r in picked})


def safety_examples(questions: int, seed: int, kind: str = "advbench") -> tuple[list[ContrastExample], list[str]]:
    """The safety data: ``questions`` harmful questions (``safety_questions``), each answered with a refusal, and
    their sources."""
    from safetylock.contrast import contrast_pairs

    texts, fit_sources = safety_questions(questions, seed, kind)
    return [ex for ex in contrast_pairs(texts, seed) if ex.safe], fit_sources


def repair(
    base_dir: Path,
    aligned_dir: Path,
    finetuned_dir: Path,
    out: Path,
    config: NlsrConfig,
    weak_dir: Path | None = None,
    questions: int = 64,
    device: torch.device | str = "cpu",
) -> list[ModuleReport]:
    """Read the adapters, gather safety statistics on the base, realign, write the adapter and ``nlsr_report.json``."""
    from safetylock.hf import load_model
    from safetylock.lora import load_adapter

    aligned, finetuned = load_adapter(aligned_dir), load_adapter(finetuned_dir)
    weak = load_adapter(weak_dir) if weak_dir else None
    amplified = amplify(aligned, weak, config.beta)
    model, tokenizer = load_model(base_dir)
    examples, fit_sources = safety_examples(questions, config.seed, config.safety_data)
    stats = safety_statistics(model.to(device), tokenizer, amplified, examples)
    repaired, reports = realign(aligned, finetuned, stats, config, weak)
    repaired.save(out)
    report = {"config": asdict(config), "modules": [asdict(r) for r in reports]}
    report |= {"fit_sources": fit_sources, "fit_prompts": fingerprints(e.question for e in examples)}  # overlap rule
    (out / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    return reports

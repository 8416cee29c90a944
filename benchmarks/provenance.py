"""Weight-sketch correlations: how far fine-tunes and quantized copies of a base stay from other same-shape models.

Run: python -m benchmarks.provenance [--variants harmful-10]
For each packaged model (the base), the correlation of its o_proj weight sketch (what its lock records) with:
itself; its weights quantized per channel to int8 and in 4-bit groups of 64 (what W8A8 / GPTQ copies hold);
random low-rank updates of every linear layer of relative size 0.05 / 0.3 / 1 (merged LoRA fine-tunes, up to
one as large as the weights themselves); cached attack variants (LoRA merged) where they exist; freshly
initialised models of the same shape (three seeds). Writes benchmarks/results/provenance.{json,png}.
"""

from __future__ import annotations

import json

import click
import torch

from benchmarks.common import RESULTS, write_result
from safetylock import models
from safetylock.attack import variant_dir
from safetylock.geometry import head_geometry, output_projections
from safetylock.hf import load_model
from safetylock.provenance import MIN_CORRELATION, correlation, hf_weight_sketch, simulated_fine_tune


def fake_quantize(weight: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Symmetric round-to-nearest quantization, per output channel or per group of ``group`` inputs, dequantized."""
    top = 2 ** (bits - 1) - 1
    rows = weight.reshape(weight.shape[0], -1, group or weight.shape[1])
    scale = (rows.abs().amax(-1, keepdim=True) / top).clamp(min=1e-8)
    return (torch.round(rows / scale).clamp(-top - 1, top) * scale).reshape_as(weight)


def sketch_of(model) -> torch.Tensor:
    geometry = head_geometry(model.config)
    return hf_weight_sketch(output_projections(model, geometry), geometry)


@torch.no_grad()
def rows_for(name: str, variants: list[str]) -> list[dict]:
    from transformers import AutoModelForCausalLM

    directory = models.resolve(name)
    model, _ = load_model(directory)
    base = sketch_of(model)
    rows = [{"model": name, "against": "itself", "correlation": correlation(base, base)}]
    for label, bits, group in (("int8 per channel (W8A8)", 8, None), ("4-bit, groups of 64 (GPTQ)", 4, 64)):
        copy, _ = load_model(directory)
        for proj in output_projections(copy):
            proj.weight.copy_(fake_quantize(proj.weight, bits, group))
        rows.append({"model": name, "against": label, "correlation": correlation(base, sketch_of(copy))})
    for relative in (0.05, 0.3, 1.0):
        copy, _ = load_model(directory)
        simulated_fine_tune(copy, relative)
        rows.append(
            {
                "model": name,
                "against": f"rank-8 update, {relative}x weight norm",
                "correlation": correlation(base, sketch_of(copy)),
            }
        )
    for variant in variants:
        out = variant_dir(variant)
        record = json.loads((out / "train.json").read_text()) if (out / "train.json").exists() else {}
        if record.get("recipe", {}).get("base") != name or not (out / "merged" / "config.json").exists():
            continue  # not built, or built on another base
        method = "LoRA merged" if record["recipe"]["method"] == "lora" else "full fine-tune"
        tuned, _ = load_model(out / "merged")
        rows.append({"model": name, "against": f"{variant} ({method})", "correlation": correlation(base, sketch_of(tuned))})
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(model.config)
        rows.append({"model": name, "against": f"random init, seed {seed}", "correlation": correlation(base, sketch_of(fresh))})
    return rows


@click.command()
@click.option("--models", "names", default="qwen2.5-coder-0.5b-instruct,smollm2-135m-instruct", show_default=True)
@click.option("--variants", default="harmful-10,harmful-10-full", show_default=True, help="Cached attack variants to include.")
def main(names: str, variants: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for name in names.split(",") for row in rows_for(name, [v for v in variants.split(",") if v])]
    for row in rows:
        click.echo(f"{row['model']:30s} {row['against']:36s} {row['correlation']:+.4f}")
    write_result("provenance", {"threshold": MIN_CORRELATION, "rows": rows})
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1))
    labels = [f"{r['model'].split('-')[0]}: {r['against']}" for r in rows]
    ax.barh(
        labels,
        [r["correlation"] for r in rows],
        color=["tab:green" if r["correlation"] >= MIN_CORRELATION else "tab:red" for r in rows],
    )
    ax.axvline(MIN_CORRELATION, color="black", linestyle="--", label=f"threshold {MIN_CORRELATION}")
    ax.set_xlabel("weight sketch correlation with the base")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "provenance.png", dpi=110)


if __name__ == "__main__":
    main()

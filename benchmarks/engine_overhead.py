"""What the lock costs the engine itself: plain, static (folded into ``o_proj``) and gated (the in-graph gate and
per-token scale) engines side by side in one process, on a random-weight model of a realistic shape.

vLLM builds the weights itself (``load_format="dummy"``) from a config alone and takes token-id prompts
(``skip_tokenizer_init``), so nothing large is written or carried. The lock is synthetic but has the product's
form: ``--heads`` random heads with unit directions, and for the gated engines a gate at the middle layer that fires
on about half of the requests, reading the last prompt token or also attention over every prompt token. Every
engine runs compiled (torch.compile; CUDA graphs on a GPU) on vLLM's V1 model runner (the gated mode needs it:
docs/gpu.md). Each round times one batch on every engine, in an order rotated round by round, and pairs each mode's
time with plain's of the same round, so drift hits all alike; the JSON gives each workload's median paired ratio
and its 10th–90th percentile band.

Run: python -m benchmarks.engine_overhead --shape llama-8b --out DIR    (the GPU slot: docs/gpu.md)
     python -m benchmarks.engine_overhead --shape tiny --rounds 3 --out DIR   (the CPU rehearsal)
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from safetylock.gate import Gate, Pooling
from safetylock.geometry import HeadGeometry, head_geometry
from safetylock.lockfile import SafetyLock
from safetylock.serve.config import lock_section

SHAPES = {  # LlamaConfig fields
    "llama-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 512,
    },
}
WORKLOADS = {  # name -> (batch, prompt tokens, output tokens)
    "batch 1 (256 in / 128 out)": (1, 256, 128),
    "batch 32 (256 in / 128 out)": (32, 256, 128),
    "batch 128 (512 in / 64 out)": (128, 512, 64),
}
MODES = ("plain", "static", "gated", "gated-attention")


def write_config(shape: str, directory: Path):
    """The random model's config, saved to ``directory`` (vLLM builds the weights from it)."""
    from transformers import LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=False)
    config.save_pretrained(directory)
    return config


def synthetic_locks(geometry: HeadGeometry, heads: int, directory: Path, seed: int = 0) -> dict[str, Path]:
    """An always-on lock of ``heads`` random heads and its gated copy (gate at the middle layer, threshold 0)."""
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(geometry.num_layers * geometry.num_heads, generator=generator)[:heads].sort().values
    heads = len(picked)
    gate_layer = geometry.num_layers // 2
    gate = Gate(gate_layer, torch.randn(geometry.hidden_size, generator=generator) / geometry.hidden_size**0.5, 0.0, 0.0)
    pooled = (torch.randn(geometry.hidden_size, generator=generator) / geometry.hidden_size**0.5 for _ in range(2))
    pooling = Pooling(*pooled, (1,), (2,))  # the attention read over every prompt token (no system turn here)
    fields = dict(
        layers=picked // geometry.num_heads,
        heads=picked % geometry.num_heads,
        directions=torch.nn.functional.normalize(torch.randn(heads, geometry.head_dim, generator=generator), dim=1),
        sigmas=torch.ones(heads),
        head_accuracy=torch.full((geometry.num_layers, geometry.num_heads), 0.5),
        geometry=geometry,
        architecture={"model_type": "llama"},
        base_fingerprint="0" * 64,
        provenance={"synthetic": True, "seed": seed},
    )
    if not (fields["layers"] > gate_layer).any():  # a gated lock needs a head after its gate
        fields["layers"][-1] = geometry.num_layers - 1
    return {
        "static": SafetyLock(**fields).save(directory / "static.lock.safetensors"),
        "gated": SafetyLock(**fields, gate=gate).save(directory / "gated.lock.safetensors"),
        "gated-attention": SafetyLock(**fields, gate=dataclasses.replace(gate, pooling=pooling)).save(
            directory / "gated-attention.lock.safetensors"
        ),
    }


def engines(model_dir: Path, locks: dict[str, Path], alpha: float, gpu: bool) -> dict:
    from vllm import LLM

    sections = {
        "plain": None,
        "static": lock_section(locks["static"], alpha),
        "gated": lock_section(locks["gated"], alpha, gated=True, response="steer"),
        "gated-attention": lock_section(locks["gated-attention"], alpha, gated=True, response="steer"),
    }
    memory = {"gpu_memory_utilization": 0.78 / len(MODES)} if gpu else {"kv_cache_memory_bytes": 1 << 28}
    built = {}
    for mode in MODES:
        extra = {"additional_config": {"safetylock": sections[mode]}} if sections[mode] else {}
        built[mode] = LLM(
            str(model_dir),
            load_format="dummy",
            skip_tokenizer_init=True,
            dtype="bfloat16" if gpu else "float32",
            enforce_eager=False,
            max_model_len=1024,
            seed=0,
            **memory,
            **extra,
        )
    return built


def timed(llm, prompts, max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - started


def measure(built: dict, vocab: int, rounds: int, workloads: dict, seed: int = 0) -> dict:
    """Per workload: every round's seconds per mode, and each mode's paired ratio to plain."""
    from vllm.inputs import TokensPrompt

    rng = np.random.default_rng(seed)
    results = {}
    for name, (batch, prompt_tokens, out_tokens) in workloads.items():
        prompts = [TokensPrompt(prompt_token_ids=rng.integers(10, vocab, prompt_tokens).tolist()) for _ in range(batch)]
        for llm in built.values():  # warm-up: the shapes of this workload compiled and captured
            timed(llm, prompts, out_tokens)
        seconds = {mode: [] for mode in built}
        for r in range(rounds):
            order = list(built)[r % len(built) :] + list(built)[: r % len(built)]
            for mode in order:
                seconds[mode].append(timed(built[mode], prompts, out_tokens))
        plain = np.array(seconds["plain"])
        results[name] = {
            "batch": batch,
            "prompt_tokens": prompt_tokens,
            "output_tokens": out_tokens,
            "seconds": seconds,
            "output_tokens_per_s": {m: float(batch * out_tokens / np.median(s)) for m, s in seconds.items()},
            "ratio_to_plain": {
                m: {q: float(np.percentile(np.array(s) / plain, p)) for q, p in (("median", 50), ("p10", 10), ("p90", 90))}
                for m, s in seconds.items()
                if m != "plain"
            },
        }
    return results


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["workloads"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / (len(MODES) - 1)
    for i, mode in enumerate(MODES[1:]):
        ratios = [result["workloads"][n]["ratio_to_plain"][mode] for n in names]
        medians = np.array([(r["median"] - 1) * 100 for r in ratios])
        low = medians - np.array([(r["p10"] - 1) * 100 for r in ratios])
        high = np.array([(r["p90"] - 1) * 100 for r in ratios]) - medians
        place = np.arange(len(names)) + (i - (len(MODES) - 2) / 2) * width
        ax.bar(place, medians, width, yerr=[low, high], capsize=4, label=mode)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhline(1, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(np.arange(len(names)), names, fontsize=8)
    ax.set_ylabel("time vs plain engine (%), median and p10–p90")
    ax.set_title(f"{result['shape']} ({result['dtype']}, {result['device']}): {result['rounds']} paired rounds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command()
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="llama-8b", show_default=True)
@click.option("--heads", type=int, default=24, show_default=True, help="Locked heads of the synthetic lock.")
@click.option("--alpha", type=float, default=4.0, show_default=True)
@click.option("--rounds", type=int, default=20, show_default=True, help="Paired rounds per workload.")
@click.option("--workloads", default=",".join(WORKLOADS), show_default=True, help="Comma-separated names.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for JSON + PNG.")
def main(shape: str, heads: int, alpha: float, rounds: int, workloads: str, out: Path) -> None:
    chosen = {n.strip(): WORKLOADS[n.strip()] for n in workloads.split(",") if n.strip() in WORKLOADS}
    if not chosen:
        raise click.BadParameter(f"none of {workloads!r} is a workload; known: {', '.join(WORKLOADS)}")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the gated engine needs V1; every engine runs on it alike
    gpu = torch.cuda.is_available()
    scratch = Path(tempfile.mkdtemp(prefix="engine_overhead-"))
    model_dir = scratch / "model"
    geometry = head_geometry(write_config(shape, model_dir))
    built = engines(model_dir, synthetic_locks(geometry, heads, scratch), alpha, gpu)
    started = time.perf_counter()
    measured = measure(built, SHAPES[shape]["vocab_size"], rounds, chosen)
    import vllm

    result = {
        "protocol": "one process, one engine per mode, compiled (CUDA graphs on GPU), V1 model runner, dummy weights, "
        "token-id prompts, greedy with ignore_eos; rounds rotate the engine order; ratios paired within a round",
        "shape": shape,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "dtype": "bfloat16" if gpu else "float32",
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "heads": heads,
        "alpha": alpha,
        "rounds": rounds,
        "measure_seconds": round(time.perf_counter() - started, 1),
        "workloads": measured,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_overhead.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "engine_overhead.png")
    for name, row in measured.items():
        ratios = ", ".join(f"{m} {(r['median'] - 1) * 100:+.2f}%" for m, r in row["ratio_to_plain"].items())
        click.echo(f"{name}: {ratios}")


if __name__ == "__main__":
    main()

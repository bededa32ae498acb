#!/usr/bin/env bash
# One call on a GPU machine: builds fastbn with its CUDA kernels, runs the whole test suite (GPU tests
# included, slow ones too) and the benchmarks, and writes everything to benchmarks/results/<gpu-slug>/
# (or $1): build.log, ptxas.log, env.txt, pytest.log, junit.xml, bench_ops/ and bench_model/ outputs.
# Steps after the build keep going when one fails; the exit status is the first failure's.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
py="${PYTHON:-python}"
gpu="$("$py" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu")' 2>/dev/null || echo unknown)"
slug="$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')"
out="${1:-$repo/benchmarks/results/$slug}"
mkdir -p "$out"
status=0
step() {  # step NAME LOGFILE COMMAND...
  local name="$1" log="$2"; shift 2
  echo "== $name (log: $log)"
  local start=$(date +%s)
  "$@" >"$log" 2>&1
  local rc=$?
  echo "   rc=$rc in $(( $(date +%s) - start )) s"
  tail -n 5 "$log"
  [[ $rc -ne 0 && $status -eq 0 ]] && status=$rc
  return $rc
}

{
  echo "gpu: $gpu"; date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi 2>&1 | head -n 15
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} >"$out/env.txt" 2>&1

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" FASTBN_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  export TORCH_CUDA_ARCH_LIST="$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "8.0;9.0")"
fi
step build "$out/build.log" "$py" -m pip install --no-build-isolation --no-deps -v -e . || { echo "build failed"; exit 1; }
grep -E "ptxas (info|warning)|Compiling entry|Function properties" "$out/build.log" >"$out/ptxas.log" || true
if grep -qE "(^|[^0-9])[1-9][0-9]* bytes spill (stores|loads)" "$out/ptxas.log"; then echo "   WARNING: register spills (ptxas.log)"; fi

step tests "$out/pytest.log" "$py" -m pytest -q -rs --junitxml="$out/junit.xml" tests
mkdir -p "$out/bench_ops" "$out/bench_model"
step bench_ops "$out/bench_ops.log" "$py" benchmarks/bench_ops.py --out-dir "$out/bench_ops"
step bench_model "$out/bench_model.log" "$py" benchmarks/bench_model.py --out-dir "$out/bench_model"
echo "results in $out (status $status)"
exit $status

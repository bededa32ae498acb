#!/usr/bin/env bash
# On a GPU machine: builds fastbn with its CUDA kernels, runs the whole test suite (GPU tests included, slow
# ones too) and the benchmarks, writing everything to benchmarks/results/<gpu-slug>/ (or -o DIR).
#
#   bash benchmarks/gpu_check.sh [-s STEPS] [-o DIR] [-a ARCHIVE]
#
#   -s STEPS    comma list of build, tests, bench_ops, bench_slice, bench_compile, bench_model (default: all,
#               in this order). Where one command may only run so long, take the steps in separate calls: a
#               step after build reuses the build when it is still there and builds first otherwise.
#   -o DIR      where the outputs go: env.txt; build.log and ptxas.log; pytest.log and junit.xml;
#               bench_ops/ (every case, no torch.compile), bench_slice/ (channel-slice inputs, float32),
#               bench_compile/ (the compiled Nx256x56x56 subset) and bench_model/, each with its log, JSON,
#               chart and markdown table.
#   -a ARCHIVE  also pack DIR into this .tar.gz after the steps (one file to copy off the machine).
#
# Steps keep going when one fails; the exit status is the first failure's.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
py="${PYTHON:-python}"
steps="build,tests,bench_ops,bench_slice,bench_compile,bench_model"
out="" archive=""
while getopts "s:o:a:" opt; do
  case "$opt" in
    s) steps="$OPTARG" ;;
    o) out="$OPTARG" ;;
    a) archive="$OPTARG" ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
  esac
done
gpu="$("$py" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu")' 2>/dev/null || echo unknown)"
slug="$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')"
out="${out:-$repo/benchmarks/results/$slug}"
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
wants() { [[ ",$steps," == *",$1,"* ]]; }

{
  echo "gpu: $gpu"; date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi 2>&1 | head -n 15
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} >"$out/env.txt" 2>&1

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" FASTBN_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  export TORCH_CUDA_ARCH_LIST="$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "8.0;9.0")"
fi
built() {  # an in-place build with CUDA kernels is importable
  "$py" -c 'import sys, torch, fastbn._C
sys.exit(0 if torch._C._dispatch_has_kernel_for_dispatch_key("fastbn::forward_train", "CUDA") else 1)' >/dev/null 2>&1
}
if [[ "$gpu" == no-gpu ]]; then
  echo "== no GPU visible: no CUDA build; the steps run on the CPU with the fastbn already installed"
elif wants build || ! built; then
  step build "$out/build.log" "$py" -m pip install --no-build-isolation --no-deps -v -e . || { echo "build failed"; exit 1; }
  bash .ci/ptxas_spills.sh "$out/build.log" "$out/ptxas.log" | sed 's/^/   /' || echo "   WARNING: register spills (ptxas.log)"
fi

if wants tests; then
  step tests "$out/pytest.log" "$py" -m pytest -q -rs --junitxml="$out/junit.xml" tests
fi
bench() {  # bench NAME SCRIPT ARGS...: the script's JSON, chart and markdown table in $out/NAME/
  local name="$1" script="$2"; shift 2
  mkdir -p "$out/$name"
  step "$name" "$out/$name/$name.log" "$py" "benchmarks/$script" --out-dir "$out/$name" \
    --markdown "$out/$name/$name.md" "$@"
}
wants bench_ops && bench bench_ops bench_ops.py --compile none
wants bench_slice && bench bench_slice bench_ops.py --formats channel_slice --dtypes float32 --compile none
wants bench_compile && bench bench_compile bench_ops.py --shapes 64x256x56x56,256x256x56x56 --compile all
wants bench_model && bench bench_model bench_model.py --compile
if [[ -n "$archive" ]]; then
  tar czf "$archive" -C "$(dirname "$out")" "$(basename "$out")" && echo "packed $out into $archive"
fi
echo "results in $out (status $status)"
exit $status

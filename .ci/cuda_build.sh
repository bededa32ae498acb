#!/usr/bin/env bash
# CI: builds the CUDA extension with nvcc against a CUDA build of torch (no GPU needed), fails on register
# spills over .ci/ptxas_spills.sh's limit in any kernel, imports it and checks that every torch.ops.fastbn op has
# a CUDA kernel.
#
# Environment: CUDA_HOME (default /usr/local/cuda; the step is skipped, with a message, when it has no nvcc),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS (default 2), FASTBN_CUDA_VENV (a venv with the
# registry's CUDA torch; created with `pip install torch ninja numpy` when missing; default
# /opt/venv-cuda), FASTBN_CUDA_BUILD_OUT (where build.log and ptxas.log go; default a temporary folder).
# The build happens in a temporary copy of the repository, so the checkout stays untouched.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
venv="${FASTBN_CUDA_VENV:-/opt/venv-cuda}"

if [[ ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  echo "cuda_build: SKIPPED: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME to a CUDA toolkit to run this check)"
  exit 0
fi
if [[ ! -x "$venv/bin/python" ]]; then
  echo "cuda_build: creating $venv with the registry's CUDA build of torch"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch ninja numpy
fi
py="$venv/bin/python"
"$py" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else "cuda_build: torch in the venv is not a CUDA build")'

work="$(mktemp -d)"
out="${FASTBN_CUDA_BUILD_OUT:-$work/out}"
mkdir -p "$out"
trap 'rm -rf "$work/src"' EXIT
mkdir -p "$work/src"
(cd "$repo" && tar --exclude=.git --exclude=./build --exclude='*.so' --exclude=__pycache__ --exclude=./benchmarks/results -cf - .) \
  | tar -xf - -C "$work/src"

echo "cuda_build: nvcc $("$CUDA_HOME/bin/nvcc" --version | tail -1), torch $("$py" -c 'import torch; print(torch.__version__)'), archs $TORCH_CUDA_ARCH_LIST"
start=$(date +%s)
(cd "$work/src" && FASTBN_CUDA=1 PATH="$CUDA_HOME/bin:$venv/bin:$PATH" "$py" setup.py build_ext --inplace) >"$out/build.log" 2>&1 || {
  tail -n 80 "$out/build.log"
  echo "cuda_build: FAILED: the CUDA build did not compile (full log: $out/build.log)"
  exit 1
}
echo "cuda_build: built in $(( $(date +%s) - start )) s"

bash "$repo/.ci/ptxas_spills.sh" "$out/build.log" "$out/ptxas.log" | sed 's/^/cuda_build: /' || {
  echo "cuda_build: FAILED: register spills (see above)"
  exit 1
}

(cd "$work/src" && "$py" - <<'PY'
import torch
import fastbn._C  # noqa: F401  (registers torch.ops.fastbn)
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastbn::"))
assert ops, "no fastbn ops registered"
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
print(f"cuda_build: {len(ops)} fastbn ops registered: {', '.join(o.split('::')[1] for o in ops)}")
if missing:
    raise SystemExit(f"cuda_build: FAILED: no CUDA kernel for {missing}")
print("cuda_build: every fastbn op has a CUDA kernel")
PY
)

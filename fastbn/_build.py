"""The extension's sources and compiler flags, shared by setup.py and the JIT build in _load.py.

Kept free of fastbn imports so setup.py can load it by path before the package is built.
"""
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

# -fopenmp on compile and link, so at::parallel_for runs in parallel. The C++ standard is left to
# torch.utils.cpp_extension, which picks the one its headers need (C++17, or C++20 from torch 2.10).
CXX_FLAGS = ["-O3", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-Xptxas=-v", "-lineinfo"]
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def cuda_requested(cuda_available: bool) -> bool:
    """FASTBN_CUDA=1 forces the CUDA build, FASTBN_CUDA=0 disables it; otherwise build it when a GPU is visible."""
    flag = os.environ.get("FASTBN_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    if flag:
        raise ValueError(f"FASTBN_CUDA must be 0 or 1, got {flag!r}")
    return cuda_available


def sources(with_cuda: bool, relative_to: str = "") -> list:
    """C++ sources, plus the CUDA ones when with_cuda; paths relative to `relative_to` when given."""
    files = [os.path.join(CSRC, name) for name in ("ops.cpp", "checks.cpp", "autograd.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    if relative_to:
        files = [os.path.relpath(f, relative_to) for f in files]
    return files


def define_flags(with_cuda: bool) -> list:
    return ["-DFASTBN_WITH_CUDA"] if with_cuda else []

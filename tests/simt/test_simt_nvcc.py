"""The test kernels and the csrc/cuda headers are CUDA too: where nvcc is installed, check that they
compile for a GPU (sm_80) exactly as they compile for the emulator. Skipped without nvcc.

nvcc takes tens of seconds per file, so a success is remembered (in the simt build cache) under a hash
of everything the compile reads that can change here: the kernels, csrc's headers, torch's and nvcc's
versions.
"""
import glob
import hashlib
import os
import shutil
import subprocess

import pytest

import simt_build

pytestmark = pytest.mark.simt


def nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


def include_flags(tmp_path):
    from torch.utils import cpp_extension

    flags = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{simt_build.CSRC}", f"-I{simt_build.KERNELS}"]
    # A CPU build of torch ships the c10/cuda headers but not the header its CUDA build generates;
    # a stand-in with what that build writes into it is enough to compile against them.
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any(os.path.exists(os.path.join(p, generated)) for p in cpp_extension.include_paths()):
        stub = tmp_path / generated
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        flags.append(f"-I{tmp_path}")
    return flags


def inputs_hash(compiler, source):
    import torch

    digest = hashlib.sha256()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest.update((torch.__version__ + version + source).encode())
    # What the test kernels can include: csrc's headers, the csrc/cuda headers, the kernels directory.
    files = (
        glob.glob(os.path.join(simt_build.CSRC, "*.h"))
        + glob.glob(os.path.join(simt_build.CSRC, "cuda", "*.cuh"))
        + glob.glob(os.path.join(simt_build.KERNELS, "*"))
    )
    for path in sorted(f for f in files if os.path.isfile(f)):
        digest.update(path.encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def test_kernels_compile_with_nvcc(tmp_path):
    compiler = nvcc()
    if compiler is None:
        pytest.skip("nvcc is not installed")
    sources = [s for s in simt_build.test_kernel_sources() if s.endswith(".cu")]
    stamp = os.path.join(simt_build.build_directory("nvcc_check"), inputs_hash(compiler, " ".join(sources)) + ".ok")
    if os.path.exists(stamp):
        return
    # One translation unit for all of them: nvcc spends most of its time on the CUDA and torch headers.
    unity = tmp_path / "all_kernels.cu"
    unity.write_text("".join(f'#include "{s}"\n' for s in sources))
    cmd = [compiler, "-std=c++17", "-arch=sm_80", "--expt-relaxed-constexpr", "-c", str(unity), "-o",
           str(tmp_path / "all_kernels.o")] + include_flags(tmp_path)
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed:\n{result.stderr[-4000:]}"
    open(stamp, "w").close()

"""Loads the compiled extension: the installed fastbn._C, or a JIT build of csrc/ with ninja, cached."""
import importlib
import os
import shutil

import torch

from . import _build


def _jit_build():
    from torch.utils import cpp_extension

    if not os.path.isdir(_build.CSRC):
        raise ImportError(
            "fastbn: the compiled extension fastbn._C is missing and there are no sources to build it from; "
            "reinstall fastbn with `pip install --no-build-isolation .`"
        )
    if shutil.which("ninja") is None and not cpp_extension.is_ninja_available():
        raise ImportError(
            "fastbn: the compiled extension fastbn._C is missing and cannot be built on the fly because ninja "
            "is not installed. Either `pip install ninja`, or build fastbn with `pip install --no-build-isolation .`"
        )
    with_cuda = _build.cuda_requested(torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None)
    defines = _build.define_flags(with_cuda)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _build.DEFAULT_CUDA_ARCH_LIST)
    cpp_extension.load(
        name="fastbn_cuda" if with_cuda else "fastbn_cpu",
        sources=_build.sources(with_cuda),
        extra_include_paths=[_build.CSRC],
        extra_cflags=_build.CXX_FLAGS + defines,
        extra_cuda_cflags=_build.NVCC_FLAGS + defines,
        extra_ldflags=_build.LD_FLAGS,
        is_python_module=False,
        verbose=os.environ.get("FASTBN_VERBOSE_BUILD") == "1",
    )


def load_extension():
    """Registers torch.ops.fastbn: imports fastbn._C, or builds it from csrc/ when it is missing."""
    try:
        importlib.import_module("fastbn._C")
    except ImportError:
        _jit_build()

"""Builds fastbn._C: a CUDAExtension when CUDA is wanted (see fastbn/_build.py), a CppExtension otherwise."""
import importlib.util
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("fastbn_build", os.path.join(HERE, "fastbn", "_build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def make_extension():
    with_cuda = build.cuda_requested(torch.cuda.is_available())
    if with_cuda:
        if CUDA_HOME is None or torch.version.cuda is None:
            raise RuntimeError(
                "FASTBN_CUDA=1 needs a CUDA toolkit (set CUDA_HOME) and a CUDA build of torch; "
                f"found CUDA_HOME={CUDA_HOME}, torch {torch.__version__}"
            )
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.DEFAULT_CUDA_ARCH_LIST)
    defines = build.define_flags(with_cuda)
    kind = CUDAExtension if with_cuda else CppExtension
    extra = {"cxx": build.CXX_FLAGS + defines}
    if with_cuda:
        extra["nvcc"] = build.NVCC_FLAGS + defines
    print(f"fastbn: building the {'CUDA' if with_cuda else 'CPU-only'} extension")
    return kind(
        name="fastbn._C",
        sources=build.sources(with_cuda, relative_to=HERE),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=extra,
        extra_link_args=build.LD_FLAGS,
    )


setup(
    packages=find_packages(include=["fastbn", "fastbn.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension},
)

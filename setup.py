"""Build hook: all metadata lives in pyproject.toml; this file only adds the optional CUDA extension deltacomp._cuda.

The extension is built when torch is importable here, is a CUDA build, and a CUDA toolkit is found, unless
DELTACOMP_NO_CUDA is set. Otherwise the package installs as pure Python (pip's isolated build environment has no
torch, so a plain ``pip install .`` takes that path; use ``pip install --no-build-isolation .`` to build the kernels).
The flags match the just-in-time build in deltacomp/native.py (see cuda/README.md).
"""

import os
import sys

from setuptools import setup

SOURCES = ["cuda/delta_linear.cu", "cuda/gptq_block.cu", "cuda/binding.cpp"]
NVCC_FLAGS = [
    "-O3",
    "-lineinfo",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90a,code=sm_90a",
]


def cuda_extension():
    """(setup keyword arguments, None) for the extension, or ({}, the reason it is skipped)."""
    if "DELTACOMP_NO_CUDA" in os.environ:
        return {}, "DELTACOMP_NO_CUDA is set"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return {}, "torch is not importable in the build environment"
    if torch.version.cuda is None:
        return {}, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None:
        return {}, "no CUDA toolkit found (set CUDA_HOME)"
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    std = "-std=c++20" if (major, minor) >= (2, 13) else "-std=c++17"  # what torch's headers need
    ext = CUDAExtension("deltacomp._cuda", SOURCES,
                        extra_compile_args={"cxx": ["-O3", std], "nvcc": [*NVCC_FLAGS, std]})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}, None


kwargs, skipped = cuda_extension()
if skipped:
    print(f"deltacomp: building without the CUDA extension: {skipped}", file=sys.stderr)
setup(**kwargs)

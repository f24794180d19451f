"""Ahead-of-time build of csrc/ (the same sources kernels.py JIT-compiles): `make build` runs

    python setup.py build_ext --inplace     # -> metalign_ops*.so beside kernels.py

kernels.py loads that library when it is newer than every source, so ranks started by torchrun never
race on a first JIT build. CUDA sources are compiled when torch sees a GPU (for that GPU's architecture), or
with FORCE_CUDA=1, e.g. on a login node without one:

    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" python setup.py build_ext --inplace   # A100 + H100/H200 nodes

(without a visible GPU, torch has no architecture to default to: TORCH_CUDA_ARCH_LIST is then required).
A library built without CUDA is recognised on a GPU node and not used there (kernels._ext).
"""
import os
import sys

import torch
from setuptools import setup

import kernels  # first: it points CUDA_HOME at the real toolkit before cpp_extension reads it
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = os.environ.get("FORCE_CUDA") == "1" or (torch.cuda.is_available() and kernels.cuda_home() is not None)
if with_cuda and not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    sys.exit('setup.py: FORCE_CUDA=1 without a visible GPU needs TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0" '
             '(A100, H100/H200)')
Ext = CUDAExtension if with_cuda else CppExtension
sources = kernels.SOURCES + (kernels.CUDA_SOURCES if with_cuda else [])

setup(
    name="metalign_ops",
    ext_modules=[Ext("metalign_ops", [os.path.relpath(s) for s in sources], include_dirs=[str(kernels.CSRC)],
                     extra_compile_args={"cxx": kernels.CFLAGS, "nvcc": kernels.CUDA_CFLAGS},
                     extra_link_args=kernels.LDFLAGS)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

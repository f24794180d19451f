// METALIGN_HD marks the per-element functions of every <op>_kernel.h: __host__ __device__ under nvcc, so the
// CUDA kernels and the CPU code (including the *_grid emulations of the CUDA launch grids) share them.
#pragma once

#if defined(__CUDACC__)
#define METALIGN_HD __host__ __device__ __forceinline__
#else
#define METALIGN_HD inline
#endif

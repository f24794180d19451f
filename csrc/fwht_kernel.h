// Per-element logic of the fast Walsh-Hadamard transform (fwht), shared by the CPU kernel
// (csrc/fwht_cpu.cpp), the CUDA kernels (csrc/fwht_cuda.cu) and the CPU emulation of the CUDA launch grid
// (fwht_grid), so the GPU's arithmetic and indexing are tested on machines without a GPU.
//
// The transform is unnormalised, in natural (Sylvester) order: y = H_D x with H_1 = [1],
// H_2n = [[H_n, H_n], [H_n, -H_n]] (scipy.linalg.hadamard), computed in place by log2(D) levels of
// butterflies; level h (h = 1, 2, 4, ..., D/2) pairs element j with j + h for every j whose bit h is 0.
#pragma once
#include <cstdint>

#include "hd.h"

namespace metalign {

// One butterfly: (a, b) -> (a + b, a - b).
template <typename T>
METALIGN_HD void fwht_pair(T& a, T& b) {
  const T u = a, v = b;
  a = u + v;
  b = u - v;
}

// Index of the first element of butterfly k (0 <= k < D/2) at level h (a power of two): k's bits below h
// stay, the bits from h upwards move up by one, so bit h of the result is 0; its partner is that + h.
METALIGN_HD int64_t fwht_first(int64_t k, int64_t h) { return ((k & ~(h - 1)) << 1) | (k & (h - 1)); }

// Butterfly k of level h on one vector x.
template <typename T>
METALIGN_HD void fwht_butterfly(T* x, int64_t k, int64_t h) {
  const int64_t j = fwht_first(k, h);
  fwht_pair(x[j], x[j + h]);
}

// One thread's share of one level inside a block held in shared memory: butterflies k = tid,
// tid + n_threads, ... of the block's `block_elems / 2` (the CUDA kernel's loop; __syncthreads between levels).
template <typename T>
METALIGN_HD void fwht_shared_level(T* buf, int64_t block_elems, int64_t h, int64_t tid, int64_t n_threads) {
  for (int64_t k = tid; k < block_elems / 2; k += n_threads) fwht_butterfly(buf, k, h);
}

// Global pass of level h: global thread g (0 <= g < n_rows * D/2) owns butterfly g % (D/2) of row g / (D/2)
// of the contiguous (n_rows, D) array x.
template <typename T>
METALIGN_HD void fwht_global_butterfly(T* x, int64_t g, int64_t D, int64_t h) {
  const int64_t half = D / 2;
  const int64_t row = g / half, k = g - row * half;
  fwht_butterfly(x + row * D, k, h);
}

}  // namespace metalign

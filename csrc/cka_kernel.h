// Per-element logic of the streaming-CKA kernels, shared by the CPU path, the CUDA kernel and the
// CPU emulation of the CUDA launch grid (tests run the latter, so the GPU arithmetic and indexing are
// checked on machines without a GPU).
#pragma once
#include <cmath>
#include <cstdint>

#include "hd.h"

namespace metalign {

// One thread's share of a row: out[k] = x[k] - shift[k] for k = tid, tid + n_threads, ...; returns the
// thread's partial sum of squares of the shifted values (accumulated in double).
// Shifting by a fixed vector (the first chunk's column means) keeps the raw moments near-centred, so the
// moments accumulated over many chunks do not lose precision to cancellation when centred at the end.
template <typename T, typename C>
METALIGN_HD double cka_shift_row_partial(const T* x_row, int64_t col_stride, const C* shift, C* out_row,
                                         int64_t d, int64_t tid, int64_t n_threads) {
  double acc = 0.0;
  for (int64_t k = tid; k < d; k += n_threads) {
    const C v = static_cast<C>(x_row[k * col_stride]) - shift[k];
    out_row[k] = v;
    acc += static_cast<double>(v) * static_cast<double>(v);
  }
  return acc;
}

// The tree reduction over a block's partial sums, as the CUDA kernel does it in shared memory
// (n_threads a power of two); step s adds buf[tid + s] into buf[tid] for tid < s.
METALIGN_HD void cka_tree_step(double* buf, int64_t tid, int64_t s) {
  if (tid < s) buf[tid] += buf[tid + s];
}

}  // namespace metalign

namespace metalign {

// RBF kernel value from a Gram-tile entry: k = exp(-gamma * max(|xi|^2 + |xj|^2 - 2 xi.xj, 0)), with the
// distance of a point to itself forced to 0 (`self`), so the diagonal is exactly 1 as the estimators assume.
METALIGN_HD double rbf_from_gram(double g, double ni, double nj, double gamma, bool self) {
  double d2 = self ? 0.0 : ni + nj - 2.0 * g;
  d2 = d2 > 0.0 ? d2 : 0.0;  // float error can make near-duplicate points slightly negative
#if defined(__CUDA_ARCH__)
  return ::exp(-gamma * d2);
#else
  return std::exp(-gamma * d2);
#endif
}

}  // namespace metalign

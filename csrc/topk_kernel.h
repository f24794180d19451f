// Per-element logic of the fused SAE top-k encode (topk_encode): bias + ReLU of one pre-activation and the
// running per-row top-k list, shared by the CPU kernel (csrc/topk_cpu.cpp), the CUDA kernel
// (csrc/topk_cuda.cu) and the CPU emulation of the CUDA launch grid (topk_encode_grid), so the GPU's
// arithmetic and indexing are tested on machines without a GPU.
#pragma once
#include <cstdint>

#include "hd.h"

namespace metalign {

// relu(acc + bias): the post-activation of one latent.
template <typename C>
METALIGN_HD C topk_relu_bias(C acc, C bias) {
  const C v = acc + bias;
  return v > C(0) ? v : C(0);  // also maps -0.0 to +0.0, as torch.relu
}

// One row's running top-k list: vals[0..count) sorted descending, idx[] their latent indices. Candidates
// arrive in increasing latent index, so a candidate equal to the current k-th value has a higher index and
// loses the tie: only a strictly larger value enters ("ties to the lower index"), and it is placed after
// every equal value already present. Returns the new count.
template <typename C>
METALIGN_HD int64_t topk_insert(C* vals, int64_t* idx, int64_t count, int64_t k, C v, int64_t j) {
  if (count == k && !(v > vals[k - 1])) return count;
  int64_t pos = count < k ? count : k - 1;  // the slot freed at the end
  while (pos > 0 && vals[pos - 1] < v) {    // shift smaller values down (stable for equal values)
    vals[pos] = vals[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  vals[pos] = v;
  idx[pos] = j;
  return count < k ? count + 1 : count;
}

// The value a candidate must beat to enter a row's list (the list holds only values >= 0 after ReLU, so
// -1 admits everything while the list is filling).
template <typename C>
METALIGN_HD C topk_threshold(const C* vals, int64_t count, int64_t k) {
  return count < k ? C(-1) : vals[k - 1];
}

// Dot product of a row held in (shared) memory with latent column j of W_enc (d, n_latents) given by its
// strides: the per-thread work of the CUDA kernel, one thread per latent column of the tile.
template <typename C>
METALIGN_HD C topk_dot_column(const C* x_row, const C* W, int64_t w_row_stride, int64_t w_col_stride, int64_t d,
                              int64_t j) {
  C acc = C(0);
  const C* wj = W + j * w_col_stride;
  for (int64_t e = 0; e < d; ++e) acc += x_row[e] * wj[e * w_row_stride];
  return acc;
}

}  // namespace metalign

// CPU (C++/OpenMP) fast Walsh-Hadamard transform over the last dimension (fwht), and the CPU emulation of
// the CUDA launch grids (fwht_grid). Per-element logic: csrc/fwht_kernel.h.
//
// Two passes over memory whatever D is (an in-cache blocked radix scheme):
//   pass 1: each block of `block` contiguous elements (128 KiB: L2) is copied from the input into the output
//           (no separate clone) and every level h < block is done there, L1 sub-block first, the first three
//           levels as one 8-point step and the rest two levels per sweep (radix 4);
//   pass 2: the levels h >= block: with x viewed as (M = D / block, block), they are an M-point transform
//           down the columns; each panel of w columns (512 bytes) is gathered into a contiguous (M, w)
//           buffer, transformed there (radix 4 over whole rows; the inner loop over the w columns
//           vectorises), and scattered back. Gathering avoids the power-of-two stride that would map every
//           row of a panel onto the same cache sets.
// OpenMP runs over (row, block) pairs in pass 1 and (row, panel) pairs in pass 2, so one long vector and
// a large batch of short ones both use every thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "fwht_kernel.h"
#include "hugepage.h"

namespace metalign {
namespace {

constexpr int64_t kBlockBytes = 1 << 17;  // pass-1 block: 128 KiB, resident in L2
constexpr int64_t kL1Bytes = 1 << 14;     // pass-1 sub-block: 16 KiB, resident in L1
constexpr int64_t kPanelBytes = 512;      // pass-2 panel width: eight cache lines (128 bytes was 1.4x slower at 2^24)
constexpr int64_t kSerialBelow = 1 << 14; // elements below which OpenMP costs more than it saves

}  // namespace

int64_t fwht_check(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 1, name, ": x must have at least one dimension (the transform runs over the last one), "
              "got a 0-d tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              ": x must be float32 or float64, got ", x.scalar_type());
  const int64_t D = x.size(-1);
  TORCH_CHECK(D >= 1 && (D & (D - 1)) == 0, name, ": the last dimension of x must be a power of two, got D = ", D,
              " (shape ", x.sizes(), "); zero-pad it to the next power of two");
  return D;
}

namespace {

// Levels h = 1, 2, 4 of eight consecutive elements at once (the short inner loops of the generic
// butterfly loop do not vectorise).
template <typename T>
inline void fwht8(T* x) {
  fwht_pair(x[0], x[1]); fwht_pair(x[2], x[3]); fwht_pair(x[4], x[5]); fwht_pair(x[6], x[7]);
  fwht_pair(x[0], x[2]); fwht_pair(x[1], x[3]); fwht_pair(x[4], x[6]); fwht_pair(x[5], x[7]);
  fwht_pair(x[0], x[4]); fwht_pair(x[1], x[5]); fwht_pair(x[2], x[6]); fwht_pair(x[3], x[7]);
}

// Two levels (h and 2h) at once on four runs of w elements a, b, c, d that lie h apart: each element is
// loaded and stored once per two levels instead of once per level (radix 4), and the loop over w vectorises.
template <typename T>
inline void radix4(T* __restrict__ a, T* __restrict__ b, T* __restrict__ c, T* __restrict__ d, int64_t w) {
  for (int64_t j = 0; j < w; ++j) {
    T p = a[j], q = b[j], r = c[j], s = d[j];
    fwht_pair(p, q);  // level h
    fwht_pair(r, s);
    fwht_pair(p, r);  // level 2h
    fwht_pair(q, s);
    a[j] = p; b[j] = q; c[j] = r; d[j] = s;
  }
}

// Levels h0, 2 h0, ..., n/2 of n contiguous elements: two at a time, the last one alone when their count is odd.
template <typename T>
inline void levels_from(T* x, int64_t n, int64_t h0) {
  int64_t h = h0;
  for (; 4 * h <= n; h <<= 2)
    for (int64_t i = 0; i < n; i += 4 * h) radix4(x + i, x + i + h, x + i + 2 * h, x + i + 3 * h, h);
  if (h < n)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = 0; j < h; ++j) fwht_pair(x[i + j], x[i + h + j]);
}

// The whole transform of n contiguous elements (n a power of two), L1-sized sub-blocks first.
template <typename T>
void transform_block(T* x, int64_t n) {
  const int64_t l1 = kL1Bytes / static_cast<int64_t>(sizeof(T));
  if (n > l1) {
    for (int64_t s = 0; s < n; s += l1) transform_block(x + s, l1);
    levels_from(x, n, l1);
    return;
  }
  if (n >= 8) {
    for (int64_t s = 0; s < n; s += 8) fwht8(x + s);
    levels_from(x, n, 8);
  } else {
    levels_from(x, n, 1);
  }
}

// Pass 2 on one panel: columns c0 .. c0 + w of the (M, block) view of one vector.
template <typename T>
void panel_transform(T* x, int64_t M, int64_t block, int64_t c0, int64_t w, T* buf) {
  for (int64_t r = 0; r < M; ++r) std::memcpy(buf + r * w, x + r * block + c0, w * sizeof(T));
  int64_t h = 1;  // the M-point transform down the rows, two levels per sweep (radix4 over whole rows of w)
  for (; 4 * h <= M; h <<= 2)
    for (int64_t i = 0; i < M; i += 4 * h)
      for (int64_t r = i; r < i + h; ++r)
        radix4(buf + r * w, buf + (r + h) * w, buf + (r + 2 * h) * w, buf + (r + 3 * h) * w, w);
  if (h < M)
    for (int64_t r = 0; r < h; ++r) {
      T* a = buf + r * w;
      T* b = buf + (r + h) * w;
      for (int64_t c = 0; c < w; ++c) fwht_pair(a[c], b[c]);
    }
  for (int64_t r = 0; r < M; ++r) std::memcpy(x + r * block + c0, buf + r * w, w * sizeof(T));
}

// src -> x (may be the same memory): pass 1 copies each block in while it is cache-resident, so the op moves
// the data twice in all (pass 1, pass 2), not three times (a clone, then two in-place passes).
template <typename T>
void fwht_impl(const T* src, T* x, int64_t rows, int64_t D) {
  const int64_t block = std::min<int64_t>(D, kBlockBytes / static_cast<int64_t>(sizeof(T)));
  const int64_t nb = D / block;
  const bool par = rows * D >= kSerialBelow;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < rows * nb; ++t) {
    if (src != x) std::memcpy(x + t * block, src + t * block, block * sizeof(T));
    transform_block(x + t * block, block);
  }
  if (nb == 1) return;
  const int64_t w = std::min<int64_t>(block, kPanelBytes / static_cast<int64_t>(sizeof(T)));
  const int64_t np = block / w;
#pragma omp parallel if (par)
  {
    std::vector<T> buf(static_cast<size_t>(nb * w));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < rows * np; ++t) {
      const int64_t row = t / np, p = t - row * np;
      panel_transform(x + row * D, nb, block, p * w, w, buf.data());
    }
  }
}

at::Tensor fwht_cpu(const at::Tensor& x) {
  const int64_t D = fwht_check(x, "fwht");
  // any strides in, contiguous out; a strided x is gathered by contiguous() and then transformed in place
  const at::Tensor src = x.detach().contiguous();
  const bool gathered = !src.is_alias_of(x);  // contiguous() made a copy: ours to overwrite
  if (src.numel() == 0 || D == 1) return gathered ? src : src.clone();
  auto out = gathered ? src : at::empty_like(src, at::MemoryFormat::Contiguous);
  if (!gathered) hugepage_hint(out);  // first touched by pass 1's copies
  const int64_t rows = src.numel() / D;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "fwht_cpu", [&] {
    fwht_impl<scalar_t>(src.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, D);
  });
  return out;
}

// Runs the CUDA launch grids of csrc/fwht_cuda.cu on the CPU with the same __host__ __device__ functions:
// fwht_shared_kernel (one block per `block_elems` chunk, grid-stride over chunks when max_blocks is smaller,
// the chunk loaded into "shared memory", levels h < block_elems by `threads` threads with a barrier between
// levels), then one fwht_global_kernel launch per remaining level (one butterfly per global thread,
// grid-stride when the grid is capped at max_blocks).
template <typename T>
void fwht_grid_impl(T* x, int64_t rows, int64_t D, int64_t B, int64_t threads, int64_t max_blocks) {
  const int64_t n_chunks = rows * D / B;
  const int64_t grid1 = std::min(n_chunks, max_blocks);
  std::vector<T> shared(static_cast<size_t>(B));
  for (int64_t blk = 0; blk < grid1; ++blk)
    for (int64_t b = blk; b < n_chunks; b += grid1) {
      T* g = x + b * B;
      for (int64_t t = 0; t < threads; ++t)
        for (int64_t e = t; e < B; e += threads) shared[e] = g[e];
      for (int64_t h = 1; h < B; h <<= 1)  // __syncthreads after each level
        for (int64_t t = 0; t < threads; ++t) fwht_shared_level(shared.data(), B, h, t, threads);
      for (int64_t t = 0; t < threads; ++t)
        for (int64_t e = t; e < B; e += threads) g[e] = shared[e];
    }
  const int64_t total = rows * D / 2;
  const int64_t grid2 = std::min((total + threads - 1) / threads, max_blocks);
  for (int64_t h = B; h < D; h <<= 1)  // one launch per level: launches are the barriers
    for (int64_t blk = 0; blk < grid2; ++blk)
      for (int64_t t = 0; t < threads; ++t)
        for (int64_t g = blk * threads + t; g < total; g += grid2 * threads) fwht_global_butterfly(x, g, D, h);
}

at::Tensor fwht_grid_cpu(const at::Tensor& x, int64_t block_elems, int64_t threads, int64_t max_blocks) {
  const int64_t D = fwht_check(x, "fwht_grid");
  TORCH_CHECK(block_elems >= 1 && (block_elems & (block_elems - 1)) == 0,
              "fwht_grid: block_elems must be a power of two, got ", block_elems);
  TORCH_CHECK(threads >= 1 && max_blocks >= 1, "fwht_grid: threads and max_blocks must be >= 1, got ", threads,
              " and ", max_blocks);
  auto out = x.detach().clone(at::MemoryFormat::Contiguous);
  if (out.numel() == 0 || D == 1) return out;
  const int64_t rows = out.numel() / D, B = std::min(D, block_elems);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fwht_grid", [&] {
    fwht_grid_impl<scalar_t>(out.data_ptr<scalar_t>(), rows, D, B, threads, max_blocks);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metalign_ops, m) {
  // Unnormalised fast Walsh-Hadamard transform over the last dimension of x (..., D), D a power of two,
  // natural (Sylvester) order: y = x @ H_D with H_D = scipy.linalg.hadamard(D) (symmetric); float32|64;
  // returns a new contiguous tensor. O(D log D) per row.
  m.def("fwht(Tensor x) -> Tensor");
  // CPU emulation of the CUDA launch grids of fwht (shared-memory levels below block_elems with `threads`
  // threads per block, then one global pass per level; grids capped at max_blocks, grid-stride beyond).
  m.def("fwht_grid(Tensor x, int block_elems, int threads, int max_blocks) -> Tensor");
}

TORCH_LIBRARY_IMPL(metalign_ops, CPU, m) {
  m.impl("fwht", &fwht_cpu);
  m.impl("fwht_grid", &fwht_grid_cpu);
}

}  // namespace metalign

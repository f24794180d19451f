// CUDA implementation of the fused SAE top-k encode (topk_encode). One thread block per block of rows:
// the rows (minus b_pre) sit in shared memory; for each tile of `kThreads` latents, thread t computes the
// post-activation relu(x_r . W[:, j0 + t] + b) of its latent for every row r of the block (coalesced reads
// of W's rows), writes it to a shared candidate buffer, and after a barrier thread r merges row r's
// candidates, in latent order, into that row's running top-k list (kept in the output arrays). The
// (n, n_latents) pre-activations are never stored. Per-element logic: csrc/topk_kernel.h, shared with the
// CPU path and with the CPU emulation of this launch grid (topk_encode_grid), which the tests run.
// A first, correct version: not yet run or tuned on a GPU (no GPU on the project machines).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "topk_kernel.h"

namespace metalign {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSharedBytes = 48 * 1024;  // the default dynamic shared-memory limit per block

template <typename C>
__global__ void topk_encode_kernel(const C* __restrict__ x, const C* __restrict__ W, int64_t w_row_stride,
                                   int64_t w_col_stride, const C* __restrict__ b, int64_t n, int64_t d, int64_t L,
                                   int64_t k, int64_t rows_per_block, C* __restrict__ out_vals,
                                   int64_t* __restrict__ out_idx) {
  extern __shared__ unsigned char smem[];
  C* xs = reinterpret_cast<C*>(smem);         // (rows_per_block, d)
  C* cand = xs + rows_per_block * d;          // (rows_per_block, kThreads)
  const int64_t tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t rows = min(rows_per_block, n - row0);
  for (int64_t e = tid; e < rows * d; e += kThreads) xs[e] = x[row0 * d + e];
  int64_t count = 0;  // meaningful for tid < rows: the length of row tid's list
  C* vals = out_vals + (row0 + tid) * k;
  int64_t* idx = out_idx + (row0 + tid) * k;
  __syncthreads();
  for (int64_t j0 = 0; j0 < L; j0 += kThreads) {
    const int64_t j = j0 + tid;
    for (int64_t r = 0; r < rows; ++r)
      cand[r * kThreads + tid] =
          j < L ? topk_relu_bias(topk_dot_column(xs + r * d, W, w_row_stride, w_col_stride, d, j), b[j]) : C(-1);
    __syncthreads();
    if (tid < rows)
      for (int64_t t = 0; t < kThreads && j0 + t < L; ++t)
        count = topk_insert(vals, idx, count, k, cand[tid * kThreads + t], j0 + t);
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor> topk_encode_cuda(const at::Tensor& x, const at::Tensor& W_enc,
                                                    const at::Tensor& b_enc, int64_t k,
                                                    const c10::optional<at::Tensor>& b_pre) {
  topk_check_args(x, W_enc, b_enc, k, b_pre);
  const at::cuda::CUDAGuard guard(x.device());
  const bool dbl = x.scalar_type() == at::kDouble || W_enc.scalar_type() == at::kDouble ||
                   b_enc.scalar_type() == at::kDouble || (b_pre.has_value() && b_pre->scalar_type() == at::kDouble);
  const auto ct = dbl ? at::kDouble : at::kFloat;
  auto xc = x.detach().to(ct);
  if (b_pre.has_value()) xc = xc - b_pre->detach().to(ct);
  xc = xc.contiguous();
  auto W = W_enc.detach().to(ct);
  auto b = b_enc.detach().to(ct).contiguous();
  const int64_t n = x.size(0), d = x.size(1), L = W_enc.size(1);
  auto values = at::empty({n, k}, x.options().dtype(ct));
  auto indices = at::empty({n, k}, x.options().dtype(at::kLong));
  if (n == 0) return {values, indices};
  const int64_t elem = dbl ? 8 : 4;
  const int64_t rows_per_block = std::min<int64_t>(8, kSharedBytes / (elem * (d + kThreads)));
  TORCH_CHECK(rows_per_block >= 1, "topk_encode (CUDA): d = ", d, " is too wide for one row in shared memory (at most ",
              kSharedBytes / elem - kThreads, ")");
  const int64_t blocks = (n + rows_per_block - 1) / rows_per_block;
  const size_t shared = static_cast<size_t>(elem * rows_per_block * (d + kThreads));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(ct, "topk_encode_cuda", [&] {
    topk_encode_kernel<scalar_t><<<blocks, kThreads, shared, stream>>>(
        xc.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), W.stride(0), W.stride(1), b.data_ptr<scalar_t>(), n, d, L,
        k, rows_per_block, values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(metalign_ops, CUDA, m) { m.impl("topk_encode", &topk_encode_cuda); }

}  // namespace metalign

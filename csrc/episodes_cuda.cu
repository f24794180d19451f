// CUDA implementation of the fused episode-construction op: one block per episode; thread 0 samples the
// episode (csrc/episodes_kernel.h, the same functions the CPU kernel and its grid emulation run) into the
// rows/y/mag outputs, then every thread of the block writes its share of x (L, 1 + d), coalesced.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "episodes_kernel.h"

namespace metalign {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kCheckBlocks = 1024;  // grid cap of the validation kernel (grid-stride over the rest)

// Validation of one CSR list on the device, the checks of the CPU path (csrc/episodes_kernel.h ep_check_*):
// global thread t < 1 + F + nnz checks the pointer ends (t = 0), function t - 1 (t <= F), or entry t - 1 - F;
// each thread keeps its smallest key and the smallest over the grid lands in *key (atomicMin), so the error
// reported is the one the CPU path reports. Every read stays inside ptr[0..F] and idx[0..nnz).
__global__ void episodes_csr_check_kernel(const int64_t* __restrict__ ptr, const int64_t* __restrict__ idx,
                                          int64_t F, int64_t nnz, int64_t n_rows, int64_t L, bool complement,
                                          int64_t list, unsigned long long* key) {
  const int64_t total = 1 + F + (complement ? 0 : nnz);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  uint64_t mine = kEpValid;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    uint64_t k;
    if (t == 0) {
      k = ep_check_ends(ptr, F, nnz, list);
    } else if (t <= F) {
      k = ep_check_function(ptr, t - 1, n_rows, L, complement, list);
    } else {
      const int64_t q = t - 1 - F, f = ep_function_of(ptr, F, q);
      k = ep_entry_ok(idx, q, ptr[f], n_rows) ? kEpValid : ep_error_key(list, 2, f, 0);
    }
    mine = k < mine ? k : mine;
  }
  if (mine != kEpValid) atomicMin(key, static_cast<unsigned long long>(mine));
}

// Checks the CSR contents on the device and raises the CPU path's message: two small kernels, then one
// 8-byte device-to-host read of the key (a sync: the price of raising on bad input instead of reading out of
// bounds in the episode kernel).
void episodes_check_csr_cuda(const at::Tensor& features, const at::Tensor& pos_ptr, const at::Tensor& pos_idx,
                             const at::Tensor& neg_ptr, const at::Tensor& neg_idx, int64_t L, cudaStream_t stream) {
  const int64_t n = features.size(0), F = pos_ptr.size(0) - 1;
  const bool has_neg = neg_ptr.numel() > 0;
  auto key = at::full({1}, -1, pos_ptr.options());  // all bits set: kEpValid
  auto* kp = reinterpret_cast<unsigned long long*>(key.data_ptr<int64_t>());
  auto launch = [&](const at::Tensor& ptr, const at::Tensor& idx, bool complement, int64_t list) {
    const int64_t total = 1 + F + (complement ? 0 : idx.size(0));
    const auto blocks = static_cast<unsigned>(std::min((total + kThreads - 1) / kThreads, kCheckBlocks));
    episodes_csr_check_kernel<<<blocks, kThreads, 0, stream>>>(ptr.data_ptr<int64_t>(), idx.data_ptr<int64_t>(),
                                                               F, idx.size(0), n, L, complement, list, kp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  launch(pos_ptr, pos_idx, false, 0);
  if (has_neg) launch(neg_ptr, neg_idx, false, 1);
  else launch(pos_ptr, pos_idx, true, 1);
  episodes_csr_raise(static_cast<uint64_t>(key.item<int64_t>()), features, pos_ptr, pos_idx, neg_ptr, neg_idx, L);
}

template <typename T, typename V>
__global__ void episodes_kernel(uint64_t seed, int64_t F, int64_t n, int64_t d, int64_t L, const T* __restrict__ fp,
                                int64_t rs, int64_t cs, const int64_t* __restrict__ pp, const int64_t* __restrict__ pi,
                                const V* __restrict__ pv, bool has_neg, const int64_t* __restrict__ np,
                                const int64_t* __restrict__ ni, const V* __restrict__ nv, const V* __restrict__ scale,
                                T* __restrict__ xp, T* __restrict__ yp, T* __restrict__ mp, int64_t* __restrict__ fnp,
                                int64_t* __restrict__ rp, int64_t first) {
  const int64_t b = blockIdx.x;
  if (threadIdx.x == 0)  // block b writes episode first + b of the seed's stream
    fnp[b] = ep_sample<V, T>(ep_key(seed, first + b), F, n, L, pp, pi, pv, has_neg, np, ni, nv, scale, rp + b * L,
                             yp + b * L, mp + b * L);
  __syncthreads();  // rows and mag of this episode are in global memory, visible to the block after the barrier
  ep_write<T, T>(fp, rs, cs, d, L, rp + b * L, mp + b * L, xp + b * L * (d + 1), threadIdx.x, blockDim.x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> episodes_cuda(
    const at::Tensor& features, const at::Tensor& pos_ptr_, const at::Tensor& pos_idx_, const at::Tensor& pos_val_,
    const at::Tensor& neg_ptr_, const at::Tensor& neg_idx_, const at::Tensor& neg_val_, const at::Tensor& mag_scale_,
    int64_t B, int64_t L, int64_t seed, int64_t first) {
  episodes_check(features, pos_ptr_, pos_idx_, pos_val_, neg_ptr_, neg_idx_, neg_val_, mag_scale_, B, L);
  TORCH_CHECK(first >= 0, "first (index of the first episode) must be >= 0, got ", first);
  TORCH_CHECK(features.is_cuda(), "features must be a CUDA tensor");
  const at::cuda::CUDAGuard guard(features.device());
  auto pos_ptr = pos_ptr_.contiguous(), pos_idx = pos_idx_.contiguous(), pos_val = pos_val_.contiguous();
  auto neg_ptr = neg_ptr_.contiguous(), neg_idx = neg_idx_.contiguous(), neg_val = neg_val_.contiguous();
  auto mag_scale = mag_scale_.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  episodes_check_csr_cuda(features, pos_ptr, pos_idx, neg_ptr, neg_idx, L, stream);
  auto o = features.options();
  const int64_t F = pos_ptr.size(0) - 1, n = features.size(0), d = features.size(1);
  auto x = at::empty({B, L, d + 1}, o), y = at::empty({B, L}, o), mag = at::empty({B, L}, o);
  auto fn = at::empty({B}, o.dtype(at::kLong)), rows = at::empty({B, L}, o.dtype(at::kLong));
  if (B == 0) return {x, y, mag, fn, rows};
  const bool has_neg = neg_ptr.numel() > 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "episodes_cuda", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos_val.scalar_type(), "episodes_cuda_val", [&] {
      using V = scalar_t;
      episodes_kernel<T, V><<<B, kThreads, 0, stream>>>(
          static_cast<uint64_t>(seed), F, n, d, L, features.data_ptr<T>(), features.stride(0), features.stride(1),
          pos_ptr.data_ptr<int64_t>(), pos_idx.data_ptr<int64_t>(), pos_val.data_ptr<V>(), has_neg,
          has_neg ? neg_ptr.data_ptr<int64_t>() : nullptr, has_neg ? neg_idx.data_ptr<int64_t>() : nullptr,
          has_neg ? neg_val.data_ptr<V>() : nullptr, mag_scale.data_ptr<V>(), x.data_ptr<T>(), y.data_ptr<T>(),
          mag.data_ptr<T>(), fn.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), first);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x, y, mag, fn, rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(metalign_ops, CUDA, m) { m.impl("episodes", &episodes_cuda); }

}  // namespace metalign

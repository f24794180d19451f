// CUDA fast Walsh-Hadamard transform over the last dimension (fwht). Levels h < B (B = 16 KiB of elements)
// run in shared memory, one block per B-element chunk of the contiguous (rows, D) array (a chunk never
// straddles two rows, since B divides D); the remaining log2(D / B) levels are one global pass each, one
// thread per butterfly. Both kernels are grid-stride loops, so any size fits a capped grid.
// Per-element logic: csrc/fwht_kernel.h, shared with the CPU path and with the CPU emulation of these
// launch grids (fwht_grid), which the tests run. A first, correct version: not yet run or tuned on a GPU
// (radix-4 global passes, which halve the passes over memory, are the next step once it can be profiled).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "fwht_kernel.h"

namespace metalign {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSharedBytes = 16 * 1024;  // a third of the default 48 KiB: several blocks per SM
constexpr int64_t kMaxBlocks = 1 << 16;      // grid cap; the kernels stride over the rest

template <typename T>
__global__ void fwht_shared_kernel(T* __restrict__ x, int64_t n_chunks, int64_t B) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* buf = reinterpret_cast<T*>(smem);
  const int64_t tid = threadIdx.x, n_threads = blockDim.x;
  for (int64_t b = blockIdx.x; b < n_chunks; b += gridDim.x) {
    T* g = x + b * B;
    for (int64_t e = tid; e < B; e += n_threads) buf[e] = g[e];
    __syncthreads();
    for (int64_t h = 1; h < B; h <<= 1) {
      fwht_shared_level(buf, B, h, tid, n_threads);
      __syncthreads();
    }
    for (int64_t e = tid; e < B; e += n_threads) g[e] = buf[e];
    __syncthreads();  // before the next chunk overwrites buf
  }
}

template <typename T>
__global__ void fwht_global_kernel(T* __restrict__ x, int64_t total, int64_t D, int64_t h) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < total; g += stride)
    fwht_global_butterfly(x, g, D, h);
}

template <typename T>
void launch(T* x, int64_t rows, int64_t D, cudaStream_t stream) {
  const int64_t B = std::min<int64_t>(D, kSharedBytes / static_cast<int64_t>(sizeof(T)));
  const int64_t n_chunks = rows * D / B;
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(B / 2, 1)));
  fwht_shared_kernel<T><<<static_cast<unsigned>(std::min(n_chunks, kMaxBlocks)), threads, B * sizeof(T), stream>>>(
      x, n_chunks, B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total = rows * D / 2;
  const auto grid = static_cast<unsigned>(std::min((total + kThreads - 1) / kThreads, kMaxBlocks));
  for (int64_t h = B; h < D; h <<= 1) {
    fwht_global_kernel<T><<<grid, kThreads, 0, stream>>>(x, total, D, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor fwht_cuda(const at::Tensor& x) {
  const int64_t D = fwht_check(x, "fwht");
  const at::cuda::CUDAGuard guard(x.device());
  auto out = x.detach().clone(at::MemoryFormat::Contiguous);
  if (out.numel() == 0 || D == 1) return out;
  const int64_t rows = out.numel() / D;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fwht_cuda", [&] {
    launch<scalar_t>(out.data_ptr<scalar_t>(), rows, D, stream);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(metalign_ops, CUDA, m) { m.impl("fwht", &fwht_cuda); }

}  // namespace metalign

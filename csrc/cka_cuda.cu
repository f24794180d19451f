// CUDA implementation of the streaming-CKA ops: a fused shift + row-norm kernel (one block per row,
// shared-memory tree reduction), cuBLAS (through ATen) for the O(m d^2) cross-products.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cka_kernel.h"

namespace metalign {
namespace {

constexpr int kThreads = 256;  // power of two: the tree reduction halves it

template <typename T, typename C>
__global__ void cka_shift_rows_kernel(const T* __restrict__ x, int64_t row_stride, int64_t col_stride,
                                      const C* __restrict__ shift, C* __restrict__ out, double* __restrict__ sq,
                                      int64_t d) {
  __shared__ double buf[kThreads];
  const int64_t row = blockIdx.x;
  const int64_t tid = threadIdx.x;
  buf[tid] = cka_shift_row_partial<T, C>(x + row * row_stride, col_stride, shift, out + row * d, d, tid, kThreads);
  __syncthreads();
  for (int64_t s = kThreads / 2; s > 0; s >>= 1) {
    cka_tree_step(buf, tid, s);
    __syncthreads();
  }
  if (tid == 0) sq[row] = buf[0];
}

at::ScalarType compute_dtype(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

// The launch behind cka_shift_rows and the first pass of cka_moments (arguments already checked).
std::tuple<at::Tensor, at::Tensor> shift_rows_cuda(const at::Tensor& x, const at::Tensor& shift) {
  const at::cuda::CUDAGuard guard(x.device());
  const auto ct = compute_dtype(x, shift);
  auto sh = shift.to(ct).contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  auto xs = at::empty({n, d}, x.options().dtype(ct));
  auto sq = at::empty({n}, x.options().dtype(at::kDouble));
  if (n == 0) return {xs, sq};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(ct, "cka_shift_rows_cuda", [&] {
    using C = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cka_shift_rows_cuda_x", [&] {
      cka_shift_rows_kernel<scalar_t, C><<<n, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), sh.data_ptr<C>(), xs.data_ptr<C>(),
          sq.data_ptr<double>(), d);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {xs, sq};
}

std::tuple<at::Tensor, at::Tensor> cka_shift_rows_cuda(const at::Tensor& x, const at::Tensor& shift) {
  cka_check_pair(x, shift, "x", "shift");
  return shift_rows_cuda(x, shift);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cka_moments_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& shift_x, const at::Tensor& shift_y) {
  cka_check_moments(x, y, shift_x, shift_y);
  const at::cuda::CUDAGuard guard(x.device());
  auto [xs, p] = shift_rows_cuda(x, shift_x);
  auto [ys, q] = shift_rows_cuda(y, shift_y);
  const auto ct = compute_dtype(x, y);
  xs = xs.to(ct);
  ys = ys.to(ct);
  auto xx = at::mm(xs.t(), xs).to(at::kDouble);
  auto yy = at::mm(ys.t(), ys).to(at::kDouble);
  auto xy = at::mm(xs.t(), ys).to(at::kDouble);
  auto xsd = xs.to(at::kDouble), ysd = ys.to(at::kDouble);
  auto ones = at::ones_like(p);
  auto w = at::stack({ones, q, p}, 1);   // (m, 3): weights of the x-side column sums
  auto wy = at::stack({ones, p, q}, 1);  // (m, 3): weights of the y-side column sums
  auto vx = at::mm(w.t(), xsd);
  auto vy = at::mm(wy.t(), ysd);
  auto s = at::stack({at::full({}, static_cast<double>(x.size(0)), p.options()), p.sum(), q.sum(), (p * q).sum(),
                      (p * p).sum(), (q * q).sum()});
  return {xx, yy, xy, vx, vy, s};
}

constexpr int kTile = 16;  // (kTile x kTile) threads per block, one RBF tile element each

__global__ void cka_rbf_tile_kernel(const double* __restrict__ gx, const double* __restrict__ gy,
                                    const double* __restrict__ nxi, const double* __restrict__ nxj,
                                    const double* __restrict__ nyi, const double* __restrict__ nyj, double gamma_x,
                                    double gamma_y, bool diagonal, int64_t ti, int64_t tj, double* row_k,
                                    double* col_k, double* row_l, double* col_l, double* sums) {
  const int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= ti || c >= tj) return;
  const bool self = diagonal && r == c;
  const double k = rbf_from_gram(gx[r * tj + c], nxi[r], nxj[c], gamma_x, self);
  const double l = rbf_from_gram(gy[r * tj + c], nyi[r], nyj[c], gamma_y, self);
  // Atomics are the simple first version (llm.c style): a block-level shared-memory reduction of the
  // row/column sums is the next step once this can be profiled on a GPU.
  atomicAdd(row_k + r, k); atomicAdd(row_l + r, l);
  atomicAdd(col_k + c, k); atomicAdd(col_l + c, l);
  atomicAdd(sums + 0, k * l); atomicAdd(sums + 1, k * k); atomicAdd(sums + 2, l * l);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cka_rbf_tile_cuda(
    const at::Tensor& gx, const at::Tensor& gy, const at::Tensor& nxi, const at::Tensor& nxj,
    const at::Tensor& nyi, const at::Tensor& nyj, double gamma_x, double gamma_y, bool diagonal) {
  cka_check_rbf_tile(gx, gy, nxi, nxj, nyi, nyj);
  const at::cuda::CUDAGuard guard(gx.device());
  const int64_t ti = gx.size(0), tj = gx.size(1);
  auto f64 = gx.options();
  auto row_k = at::zeros({ti}, f64), row_l = at::zeros({ti}, f64);
  auto col_k = at::zeros({tj}, f64), col_l = at::zeros({tj}, f64), sums = at::zeros({3}, f64);
  auto gxc = gx.contiguous(), gyc = gy.contiguous();
  auto a = nxi.contiguous(), b = nxj.contiguous(), c = nyi.contiguous(), d = nyj.contiguous();
  if (ti == 0 || tj == 0) return {row_k, col_k, row_l, col_l, sums};
  const dim3 threads(kTile, kTile), blocks((tj + kTile - 1) / kTile, (ti + kTile - 1) / kTile);
  cka_rbf_tile_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      gxc.data_ptr<double>(), gyc.data_ptr<double>(), a.data_ptr<double>(), b.data_ptr<double>(),
      c.data_ptr<double>(), d.data_ptr<double>(), gamma_x, gamma_y, diagonal, ti, tj, row_k.data_ptr<double>(),
      col_k.data_ptr<double>(), row_l.data_ptr<double>(), col_l.data_ptr<double>(), sums.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {row_k, col_k, row_l, col_l, sums};
}

// One thread per element of the kernel tile (grid-stride), the same rbf_from_gram as the CPU path.
__global__ void rbf_kernel_tile_kernel(const double* __restrict__ g, const double* __restrict__ ni,
                                       const double* __restrict__ nj, double gamma, bool diagonal, int64_t ti,
                                       int64_t tj, double* __restrict__ k) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < ti * tj; e += stride) {
    const int64_t r = e / tj, c = e - r * tj;
    k[e] = rbf_from_gram(g[e], ni[r], nj[c], gamma, diagonal && r == c);
  }
}

at::Tensor rbf_kernel_tile_cuda(const at::Tensor& g_, const at::Tensor& ni_, const at::Tensor& nj_, double gamma,
                                bool diagonal) {
  rbf_check_kernel_tile(g_, ni_, nj_);
  const at::cuda::CUDAGuard guard(g_.device());
  const auto g = g_.contiguous(), ni = ni_.contiguous(), nj = nj_.contiguous();
  const int64_t ti = g.size(0), tj = g.size(1);
  auto k = at::empty({ti, tj}, g.options());
  if (ti * tj == 0) return k;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((ti * tj + 255) / 256, 1 << 16));
  rbf_kernel_tile_kernel<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      g.data_ptr<double>(), ni.data_ptr<double>(), nj.data_ptr<double>(), gamma, diagonal, ti, tj,
      k.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return k;
}

}  // namespace

TORCH_LIBRARY_IMPL(metalign_ops, CUDA, m) {
  m.impl("rbf_kernel_tile", &rbf_kernel_tile_cuda);
  m.impl("cka_rbf_tile", &cka_rbf_tile_cuda);
  m.impl("cka_moments", &cka_moments_cuda);
  m.impl("cka_shift_rows", &cka_shift_rows_cuda);
}

}  // namespace metalign

// CUDA implementation of the streaming-ridge scoring ops: cuBLAS (through ATen) for the one GEMM per alpha,
// then one thread per target running the same per-target functions as the CPU path (ridge_kernel.h). The
// CPU ops ridge_score_*_grid execute these launch grids on the CPU, so their indexing is tested without a GPU.
// Inputs go through the CPU path's checks (ridge_checks.h: same messages, plus every tensor on z's device);
// alphas are a parameter list read on the host, so they may live on either device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "ridge_checks.h"
#include "ridge_kernel.h"

namespace metalign {
namespace {

constexpr int kThreads = 256;  // threads per block: one target (or one row) per thread

template <typename T>
__global__ void ridge_kfold_kernel(const double* __restrict__ d, const T* __restrict__ z, const T* __restrict__ b,
                                   const T* __restrict__ prod, const double* __restrict__ yy, double* __restrict__ out,
                                   int64_t p, int64_t t, int64_t m, bool rows) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= t) return;
  double acc = yy[col];
  ridge_kfold_block<T>(d, z, b, rows ? nullptr : prod, p, t, col, 1, &acc);
  if (rows) ridge_sumsq_block<T>(prod, m, t, col, 1, &acc);
  out[col] = acc;
}

template <typename T>
__global__ void ridge_weight_kernel(const T* __restrict__ xr, const double* __restrict__ g,
                                    const double* __restrict__ base, double* __restrict__ w, int64_t n, int64_t p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  w[i] = ridge_loo_weight<T>(xr + i * p, g, p, base[i]);
}

template <typename T>
__global__ void ridge_loo_kernel(const T* __restrict__ y, const T* __restrict__ prod, const double* __restrict__ w,
                                 double* __restrict__ out, int64_t m, int64_t t) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= t) return;
  ridge_loo_block<T>(y, prod, w, m, t, t, col, 1, out + col);
}

__global__ void ridge_argmin_kernel(double* __restrict__ out, double* __restrict__ best_score,
                                    int64_t* __restrict__ best, int64_t t, int64_t a, double scale) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= t) return;
  out[col] *= scale;
  ridge_argmin_update(out[col], a, best_score + col, best + col);
}

__global__ void ridge_gcv_kernel(const double* __restrict__ sse_in, const double* __restrict__ rest,
                                 const double* __restrict__ den, double* __restrict__ out, int64_t* __restrict__ best,
                                 int64_t t, int64_t na, double n) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= t) return;
  double bs = 0.0;
  int64_t bi = 0;
  for (int64_t a = 0; a < na; ++a) {
    const double g = ridge_gcv_score(sse_in[a * t + col], rest[col], den[a], n);
    out[a * t + col] = g;
    ridge_argmin_update(g, a, &bs, &bi);
  }
  best[col] = bi;
}

template <typename T>
__global__ void ridge_loo_basis_kernel(const T* __restrict__ q, const double* __restrict__ coef,
                                       const T* __restrict__ y, const double* __restrict__ w, double* __restrict__ out,
                                       int64_t m_rows, int64_t r, int64_t na, int64_t t) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= t) return;
  for (int64_t i = 0; i < m_rows; ++i)
    for (int64_t a = 0; a < na; ++a)
      ridge_loo_basis_block<T>(q + i * r * t, r, t, coef + a * r, y + i * t, w[i * na + a], col, 1, out + a * t + col);
}

int64_t blocks_for(int64_t count) { return (count + kThreads - 1) / kThreads; }

void check_cuda(const at::Tensor& z) { TORCH_CHECK(z.is_cuda(), "z must be a CUDA tensor, got ", z.device()); }

at::Tensor ridge_score_kfold_cuda(const at::Tensor& s_, const at::Tensor& z_, const at::Tensor& b_,
                                  const at::Tensor& yy_, const at::Tensor& quad_, const at::Tensor& alphas, bool rows) {
  check_cuda(z_);
  ridge_check_kfold(s_, z_, b_, yy_, quad_, alphas, rows);
  const int64_t p = z_.size(0), t = z_.size(1);
  const at::cuda::CUDAGuard guard(z_.device());
  auto s = s_.contiguous(), z = z_.contiguous(), b = b_.contiguous(), quad = quad_.contiguous();
  auto yy = yy_.to(at::kDouble).contiguous();
  const auto al = ridge_alpha_values(alphas);
  const int64_t na = static_cast<int64_t>(al.size()), m = quad.size(0);
  auto scores = at::empty({na, t}, z.options().dtype(at::kDouble));
  if (t == 0) return scores;
  auto dz = at::empty_like(z);
  auto prod = at::empty({m, t}, z.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t a = 0; a < na; ++a) {
    auto d = at::reciprocal(s.to(at::kDouble) + al[a]);  // (p,) float64 spectral weights of this alpha
    at::mul_out(dz, z, d.to(z.scalar_type()).unsqueeze(1));
    at::mm_out(prod, quad, dz);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ridge_score_kfold_cuda", [&] {
      ridge_kfold_kernel<scalar_t><<<blocks_for(t), kThreads, 0, stream>>>(
          d.data_ptr<double>(), z.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), prod.data_ptr<scalar_t>(),
          yy.data_ptr<double>(), scores.data_ptr<double>() + a * t, p, t, m, rows);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return scores;
}

std::tuple<at::Tensor, at::Tensor> ridge_score_loo_cuda(const at::Tensor& xr_, const at::Tensor& y_,
                                                        const at::Tensor& s_, const at::Tensor& z_,
                                                        const at::Tensor& alphas, double h0, int64_t chunk_rows) {
  check_cuda(z_);
  ridge_check_loo(xr_, y_, s_, z_, alphas, chunk_rows);
  const int64_t p = z_.size(0), t = z_.size(1), n = xr_.size(0);
  const at::cuda::CUDAGuard guard(z_.device());
  auto z = z_.contiguous(), xr = xr_.contiguous();
  at::Tensor y, base, spans, v, g;
  std::tie(y, base, spans) = ridge_loo_parts(xr, y_, s_, h0);  // no cancellation: see ridge_checks.h
  std::tie(v, g) = ridge_loo_weights(s_, alphas, spans);
  v = v.t().contiguous();                                         // (n_alphas, p): row a is v(a)
  g = g.t().contiguous();
  const int64_t na = g.size(0), cr = std::min(chunk_rows, n);
  auto scores = at::zeros({na, t}, z.options().dtype(at::kDouble));
  auto best = at::zeros({t}, z.options().dtype(at::kLong));
  auto best_score = at::zeros({t}, z.options().dtype(at::kDouble));
  auto w = at::empty({n}, z.options().dtype(at::kDouble));
  auto dz = at::empty_like(z);
  auto prod = at::empty({cr, t}, z.options());
  if (t == 0) return {scores, best};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ridge_score_loo_cuda", [&] {
    for (int64_t a = 0; a < na; ++a) {
      auto ga = g[a];                                            // (p,) float64
      ridge_weight_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          xr.data_ptr<scalar_t>(), ga.data_ptr<double>(), base.data_ptr<double>(), w.data_ptr<double>(), n, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::mul_out(dz, z, v[a].to(z.scalar_type()).unsqueeze(1));  // the residual is y - Xr (v z)
      double* out = scores.data_ptr<double>() + a * t;
      for (int64_t r0 = 0; r0 < n; r0 += cr) {
        const int64_t m = std::min(cr, n - r0);
        auto pv = prod.narrow(0, 0, m);
        at::mm_out(pv, xr.narrow(0, r0, m), dz);
        ridge_loo_kernel<scalar_t><<<blocks_for(t), kThreads, 0, stream>>>(
            y.data_ptr<scalar_t>() + r0 * t, pv.data_ptr<scalar_t>(), w.data_ptr<double>() + r0, out, m, t);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      ridge_argmin_kernel<<<blocks_for(t), kThreads, 0, stream>>>(out, best_score.data_ptr<double>(),
                                                                 best.data_ptr<int64_t>(), t, a, 1.0 / n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {scores, best};
}

std::tuple<at::Tensor, at::Tensor> ridge_score_loo_basis_cuda(const at::Tensor& xr_, const at::Tensor& y_,
                                                              const at::Tensor& s_, const at::Tensor& z_,
                                                              const at::Tensor& alphas, double h0,
                                                              const at::Tensor& basis_, const at::Tensor& coef_,
                                                              int64_t chunk_rows) {
  check_cuda(z_);
  ridge_check_loo(xr_, y_, s_, z_, alphas, chunk_rows);
  const int64_t p = z_.size(0), t = z_.size(1), n = xr_.size(0);
  const auto al = ridge_alpha_values(alphas);
  const int64_t na = static_cast<int64_t>(al.size());
  const int64_t r = ridge_check_basis(basis_, coef_, z_, na);
  const at::cuda::CUDAGuard guard(z_.device());
  auto xr = xr_.contiguous(), z = z_.contiguous();
  at::Tensor y, base, spans, v, g;
  std::tie(y, base, spans) = ridge_loo_parts(xr, y_, s_, h0);  // no cancellation: see ridge_checks.h
  std::tie(v, g) = ridge_loo_weights(s_, alphas, spans);
  // interpolated rows: the residual weights -g(a) = -a d(a) / s, i.e. basis rows / s and coefficients * -a
  auto sd = s_.to(at::kDouble);
  auto inv_s = at::where(sd > 0.0, at::reciprocal(sd), at::zeros_like(sd));
  auto b64 = basis_.to(at::kDouble), c64 = coef_.to(at::kDouble);
  auto al_t = at::tensor(al, c64.options()).unsqueeze(1);
  auto basis = at::where(spans, b64 * inv_s.unsqueeze(1), b64).to(z.scalar_type()).contiguous();
  auto coef = at::where(spans, (c64 * al_t).neg(), c64).contiguous();
  auto omh = at::mm(xr.to(at::kDouble).square(), g) + base.unsqueeze(1);  // 1 - h, exact
  auto w = at::where(omh > 0.0, at::reciprocal(omh * omh), at::full({}, 1.0 / 0.0, omh.options())).contiguous();
  // zcat[j, m * t + c] = basis[j, m] * z[j, c]: the r basis GEMMs as one
  auto zcat = (basis.unsqueeze(2) * z.unsqueeze(1)).reshape({p, r * t}).contiguous();
  auto scores = at::zeros({na, t}, z.options().dtype(at::kDouble));
  auto best = at::zeros({t}, z.options().dtype(at::kLong));
  auto best_score = at::zeros({t}, z.options().dtype(at::kDouble));
  if (t == 0) return {scores, best};
  const int64_t cr = std::min(chunk_rows, n);
  auto q = at::empty({cr, r * t}, z.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ridge_score_loo_basis_cuda", [&] {
    for (int64_t r0 = 0; r0 < n; r0 += cr) {
      const int64_t m_rows = std::min(cr, n - r0);
      auto qv = q.narrow(0, 0, m_rows);
      at::mm_out(qv, xr.narrow(0, r0, m_rows), zcat);
      ridge_loo_basis_kernel<scalar_t><<<blocks_for(t), kThreads, 0, stream>>>(
          qv.data_ptr<scalar_t>(), coef.data_ptr<double>(), y.data_ptr<scalar_t>() + r0 * t,
          w.data_ptr<double>() + r0 * na, scores.data_ptr<double>(), m_rows, r, na, t);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  for (int64_t a = 0; a < na; ++a) {
    ridge_argmin_kernel<<<blocks_for(t), kThreads, 0, stream>>>(scores.data_ptr<double>() + a * t,
                                                               best_score.data_ptr<double>(), best.data_ptr<int64_t>(),
                                                               t, a, 1.0 / n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {scores, best};
}

std::tuple<at::Tensor, at::Tensor> ridge_score_gcv_cuda(const at::Tensor& s_, const at::Tensor& z_,
                                                        const at::Tensor& yy_, const at::Tensor& alphas, double n,
                                                        double df0) {
  check_cuda(z_);
  ridge_check_gcv(s_, z_, yy_, alphas, n, df0);
  const int64_t t = z_.size(1);
  const at::cuda::CUDAGuard guard(z_.device());
  auto [sse_in, rest, den] = ridge_gcv_parts(s_, z_, yy_, alphas, n, df0);  // cuBLAS float64, on the device
  const int64_t na = sse_in.size(0);
  auto scores = at::empty({na, t}, sse_in.options());
  auto best = at::zeros({t}, z_.options().dtype(at::kLong));
  if (t == 0) return {scores, best};
  auto stream = c10::cuda::getCurrentCUDAStream();
  ridge_gcv_kernel<<<blocks_for(t), kThreads, 0, stream>>>(sse_in.data_ptr<double>(), rest.data_ptr<double>(),
                                                          den.data_ptr<double>(), scores.data_ptr<double>(),
                                                          best.data_ptr<int64_t>(), t, na, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {scores, best};
}

}  // namespace

TORCH_LIBRARY_IMPL(metalign_ops, CUDA, m) {
  m.impl("ridge_score_kfold", &ridge_score_kfold_cuda);
  m.impl("ridge_score_kfold_basis", &ridge_score_kfold_basis_aten);
  m.impl("ridge_score_loo", &ridge_score_loo_cuda);
  m.impl("ridge_score_gcv", &ridge_score_gcv_cuda);
  m.impl("ridge_score_loo_basis", &ridge_score_loo_basis_cuda);
}

}  // namespace metalign

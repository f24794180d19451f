// CUDA implementation of the streaming-ridge scoring ops: cuBLAS (through ATen) for the one GEMM per alpha,
// then one thread per target running the same per-target functions as the CPU path (ridge_kernel.h). The
// CPU ops ridge_score_*_grid execute these launch grids on the CPU, so their indexing is tested without a GPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "ridge_kernel.h"

namespace metalign {

// k-fold scores through the alpha basis: ATen calls only (cuBLAS GEMMs here), defined in ridge_cpu.cpp
at::Tensor ridge_score_kfold_basis_aten(const at::Tensor& s, const at::Tensor& z, const at::Tensor& b,
                                        const at::Tensor& yy, const at::Tensor& quad, const at::Tensor& alphas,
                                        bool rows, const at::Tensor& basis, const at::Tensor& coef);

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
__global__ void ridge_weight_kernel(const T* __restrict__ xr, const double* __restrict__ d, double* __restrict__ w,
                                    int64_t n, int64_t p, double h0) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  w[i] = ridge_loo_weight<T>(xr + i * p, d, p, h0);
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

__global__ void ridge_gcv_kernel(const double* __restrict__ fit, const double* __restrict__ yy,
                                 const double* __restrict__ df, double* __restrict__ out, int64_t* __restrict__ best,
                                 int64_t t, int64_t na, double n) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= t) return;
  double bs = 0.0;
  int64_t bi = 0;
  for (int64_t a = 0; a < na; ++a) {
    const double g = ridge_gcv_from_fit(yy[col], fit[a * t + col], df[a], n);
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

std::vector<double> host_alphas(const at::Tensor& alphas) {
  TORCH_CHECK(alphas.dim() == 1 && alphas.size(0) > 0, "alphas must be 1-D and non-empty, got ", alphas.sizes());
  auto a = alphas.to(at::kCPU, at::kDouble).contiguous();
  std::vector<double> out(a.data_ptr<double>(), a.data_ptr<double>() + a.numel());
  for (double v : out) TORCH_CHECK(v > 0.0, "alphas must be positive, got ", v);
  return out;
}

void check_cuda_spectrum(const at::Tensor& s, const at::Tensor& z) {
  TORCH_CHECK(s.is_cuda() && z.is_cuda(), "s and z must be CUDA tensors");
  TORCH_CHECK(s.dim() == 1 && z.dim() == 2 && z.size(0) == s.size(0), "z must be (p, n_targets) with p = len(s), got ",
              z.sizes(), " and ", s.sizes());
  TORCH_CHECK(s.scalar_type() == z.scalar_type() &&
                  (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble),
              "s and z must share a dtype, float32 or float64");
}

at::Tensor ridge_score_kfold_cuda(const at::Tensor& s_, const at::Tensor& z_, const at::Tensor& b_,
                                  const at::Tensor& yy_, const at::Tensor& quad_, const at::Tensor& alphas, bool rows) {
  check_cuda_spectrum(s_, z_);
  TORCH_CHECK(b_.sizes() == z_.sizes() && b_.scalar_type() == z_.scalar_type(), "b must match z in shape and dtype");
  const int64_t p = z_.size(0), t = z_.size(1);
  TORCH_CHECK(yy_.dim() == 1 && yy_.size(0) == t, "yy must be (n_targets,) = (", t, ",), got ", yy_.sizes());
  TORCH_CHECK(quad_.dim() == 2 && quad_.size(1) == p && (rows || quad_.size(0) == p), "quad must be (",
              rows ? "n_val" : "p", ", p) with p = ", p, ", got ", quad_.sizes());
  const at::cuda::CUDAGuard guard(z_.device());
  auto s = s_.contiguous(), z = z_.contiguous(), b = b_.contiguous(), quad = quad_.to(z_.scalar_type()).contiguous();
  auto yy = yy_.to(at::kDouble).contiguous();
  const auto al = host_alphas(alphas);
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
  check_cuda_spectrum(s_, z_);
  const int64_t p = z_.size(0), t = z_.size(1), n = xr_.size(0);
  TORCH_CHECK(xr_.dim() == 2 && xr_.size(1) == p, "xr must be (n, p) with p = ", p, ", got ", xr_.sizes());
  TORCH_CHECK(y_.dim() == 2 && y_.size(0) == n && y_.size(1) == t, "y must be (", n, ", ", t, "), got ", y_.sizes());
  TORCH_CHECK(chunk_rows > 0 && n > 1, "chunk_rows must be positive and n > 1");
  const at::cuda::CUDAGuard guard(z_.device());
  auto s = s_.contiguous(), z = z_.contiguous(), xr = xr_.to(z_.scalar_type()).contiguous(),
       y = y_.to(z_.scalar_type()).contiguous();
  const auto al = host_alphas(alphas);
  const int64_t na = static_cast<int64_t>(al.size()), cr = std::min(chunk_rows, n);
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
      auto d = at::reciprocal(s.to(at::kDouble) + al[a]);  // (p,) float64
      ridge_weight_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
          xr.data_ptr<scalar_t>(), d.data_ptr<double>(), w.data_ptr<double>(), n, p, h0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::mul_out(dz, z, d.to(z.scalar_type()).unsqueeze(1));
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
  check_cuda_spectrum(s_, z_);
  const int64_t p = z_.size(0), t = z_.size(1), n = xr_.size(0);
  TORCH_CHECK(xr_.dim() == 2 && xr_.size(1) == p, "xr must be (n, p) with p = ", p, ", got ", xr_.sizes());
  TORCH_CHECK(y_.dim() == 2 && y_.size(0) == n && y_.size(1) == t, "y must be (", n, ", ", t, "), got ", y_.sizes());
  TORCH_CHECK(basis_.dim() == 2 && basis_.size(0) == p, "basis must be (p, r) with p = ", p, ", got ", basis_.sizes());
  const auto al = host_alphas(alphas);
  const int64_t na = static_cast<int64_t>(al.size()), r = basis_.size(1);
  TORCH_CHECK(coef_.dim() == 2 && coef_.size(0) == na && coef_.size(1) == r, "coef must be (n_alphas, r) = (", na,
              ", ", r, "), got ", coef_.sizes());
  TORCH_CHECK(chunk_rows > 0 && n > 1, "chunk_rows must be positive and n > 1");
  const at::cuda::CUDAGuard guard(z_.device());
  auto xr = xr_.to(z_.scalar_type()).contiguous(), y = y_.to(z_.scalar_type()).contiguous(), z = z_.contiguous();
  auto basis = basis_.to(z.device(), z.scalar_type());
  auto coef = coef_.to(z.device(), at::kDouble).contiguous();
  auto dmat = at::reciprocal(s_.to(at::kDouble).unsqueeze(1) + alphas.to(z.device(), at::kDouble).unsqueeze(0));
  auto xd = xr.to(at::kDouble);
  auto h = at::mm(xd * xd, dmat) + h0;  // (n, n_alphas) exact leverages
  auto w = at::where(h < 1.0, at::reciprocal((1.0 - h) * (1.0 - h)), at::full({}, 1.0 / 0.0, h.options())).contiguous();
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
  check_cuda_spectrum(s_, z_);
  const int64_t t = z_.size(1);
  TORCH_CHECK(yy_.dim() == 1 && yy_.size(0) == t, "yy must be (n_targets,) = (", t, ",), got ", yy_.sizes());
  TORCH_CHECK(n > df0, "n must exceed df0");
  const at::cuda::CUDAGuard guard(z_.device());
  host_alphas(alphas);  // validates
  auto s = s_.to(at::kDouble), zd = z_.to(at::kDouble);
  auto yy = yy_.to(at::kDouble).contiguous();
  auto al = alphas.to(z_.device(), at::kDouble);
  auto d = at::reciprocal(s.unsqueeze(0) + al.unsqueeze(1));      // (n_alphas, p)
  auto C = d * (2.0 - s.unsqueeze(0) * d);
  auto df = ((s.unsqueeze(0) * d).sum(1) + df0).contiguous();      // (n_alphas,)
  auto fit = at::mm(C, zd * zd).contiguous();                      // (n_alphas, t): cuBLAS, float64
  const int64_t na = al.size(0);
  auto scores = at::empty({na, t}, fit.options());
  auto best = at::zeros({t}, z_.options().dtype(at::kLong));
  if (t == 0) return {scores, best};
  auto stream = c10::cuda::getCurrentCUDAStream();
  ridge_gcv_kernel<<<blocks_for(t), kThreads, 0, stream>>>(fit.data_ptr<double>(), yy.data_ptr<double>(),
                                                          df.data_ptr<double>(), scores.data_ptr<double>(),
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

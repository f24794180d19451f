// Input checks and device-agnostic (ATen-only) pieces of the streaming-ridge scoring ops, defined once in
// ridge_cpu.cpp and called by both the CPU kernels and the CUDA kernels of ridge_cuda.cu: bad input gets the
// same message on every device, and a CUDA kernel never reads a tensor the CPU path would have rejected.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace metalign {

// alphas: 1-D, non-empty, positive; returned as host doubles (a parameter list: it may live on any device).
std::vector<double> ridge_alpha_values(const at::Tensor& alphas);

// The k-fold scorers' inputs: spectrum s (p,), z and b (p, t), yy (t,), quad (n_val, p) (rows) or (p, p).
void ridge_check_kfold(const at::Tensor& s, const at::Tensor& z, const at::Tensor& b, const at::Tensor& yy,
                       const at::Tensor& quad, const at::Tensor& alphas, bool rows);

// The LOO scorers' inputs: xr (n, p) and y (n, t) in the dtype of z, chunk_rows > 0, n > 1.
void ridge_check_loo(const at::Tensor& xr, const at::Tensor& y, const at::Tensor& s, const at::Tensor& z,
                     const at::Tensor& alphas, int64_t chunk_rows);

// The alpha basis: basis (p, r), r >= 1, and coef (n_alphas, r) on the device of z -> r.
int64_t ridge_check_basis(const at::Tensor& basis, const at::Tensor& coef, const at::Tensor& z, int64_t n_alphas);

// The GCV scorer's inputs: s (p,), z (p, t), yy (t,), n > df0 >= 0.
void ridge_check_gcv(const at::Tensor& s, const at::Tensor& z, const at::Tensor& yy, const at::Tensor& alphas,
                     double n, double df0);

// GCV without cancellation, float64 on the device of z (see ridge_gcv_score in ridge_kernel.h):
//   sse_in (n_alphas, t) = sum_j (a d_j)^2 z_j^2 / s_j over positive s_j (the residual inside the span),
//   rest (t,)            = |y outside the span|^2 = max(yy - sum_j z_j^2 / s_j, 0), exactly 0 when the positive
//                          directions span the n - df0 dimensional centred sample space (p >= n: interpolation),
//   den (n_alphas,)      = n - df = max(n - df0 - #positive, 0) + sum_j a d_j over positive s_j.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ridge_gcv_parts(const at::Tensor& s, const at::Tensor& z,
                                                               const at::Tensor& yy, const at::Tensor& alphas,
                                                               double n, double df0);

// LOO without cancellation, on the device of z. With df0 = round(h0 n) (h0 = 1/n with an intercept) and the
// positive s_j the fitted directions, `spans` (a 0-d bool tensor on the device: no host sync) says whether
// they span the n - df0 dimensional centred sample space (p >= n: the fit interpolates as alpha -> 0).
//   base (n,) float64 = 1 - h0 - sum_j xr_j^2 / s_j, the leverage outside the span (exactly 0 if spans), so
//                       1 - h = base + sum_j xr_j^2 g_j with g_j = a / (s_j (s_j + a)) never cancels;
//   y_in (n, t)       = y, or exactly 0 if spans; the residual of alpha a is y_in - Xr (v z) with
//   v (p, n_alphas)   = d = 1 / (s + a), or -g if spans (the residual is then Xr (g z), computed as the small
//                       number it is instead of y minus a fit that equals y to every digit).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ridge_loo_parts(const at::Tensor& xr, const at::Tensor& y,
                                                               const at::Tensor& s, double h0);

// (v, g), both (p, n_alphas) float64 on the device of s, as above.
std::tuple<at::Tensor, at::Tensor> ridge_loo_weights(const at::Tensor& s, const at::Tensor& alphas,
                                                     const at::Tensor& spans);

// k-fold scores through the alpha basis: ATen calls only, so the same function is the CPU and the CUDA kernel.
at::Tensor ridge_score_kfold_basis_aten(const at::Tensor& s, const at::Tensor& z, const at::Tensor& b,
                                        const at::Tensor& yy, const at::Tensor& quad, const at::Tensor& alphas,
                                        bool rows, const at::Tensor& basis, const at::Tensor& coef);

}  // namespace metalign

// CPU (C++/OpenMP) implementation of the streaming-ridge scoring ops: every alpha scored for every target
// from the eigen-rotated cross-products (kernels.ridge_cv does the X'X / X'Y accumulation and the
// eigendecompositions through ATen's BLAS/LAPACK). The per-target arithmetic lives in ridge_kernel.h, shared
// with the CUDA kernels; the *_grid ops run the CUDA launch grids on the CPU with those same functions.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "ridge_checks.h"
#include "ridge_kernel.h"

namespace metalign {

// ---- input checks (declared in ridge_checks.h; the CUDA kernels call the same functions) ----------------------

namespace {

void check_same_device(const at::Tensor& x, const at::Tensor& z, const char* name) {
  TORCH_CHECK(x.device() == z.device(), name, " must be on the device of z (", z.device(), "), got ", x.device());
}

void check_spectrum(const at::Tensor& s, const at::Tensor& z) {
  TORCH_CHECK(s.dim() == 1, "s (eigenvalues) must be 1-D (p,), got ", s.sizes());
  TORCH_CHECK(z.dim() == 2 && z.size(0) == s.size(0), "z must be 2-D (p, n_targets) with p = ", s.size(0),
              " (the length of s), got ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, "z must be float32 or float64, got ",
              z.scalar_type());
  TORCH_CHECK(s.scalar_type() == z.scalar_type(), "s must have the dtype of z (", z.scalar_type(), "), got ",
              s.scalar_type());
  check_same_device(s, z, "s");
}

void check_like_z(const at::Tensor& x, const at::Tensor& z, const char* name) {
  TORCH_CHECK(x.sizes() == z.sizes(), name, " must have the shape of z ", z.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == z.scalar_type(), name, " must have the dtype of z (", z.scalar_type(), "), got ",
              x.scalar_type());
  check_same_device(x, z, name);
}

void check_yy(const at::Tensor& yy, const at::Tensor& z) {
  TORCH_CHECK(yy.dim() == 1 && yy.size(0) == z.size(1), "yy must be 1-D (n_targets,) of length ", z.size(1),
              ", got ", yy.sizes());
  TORCH_CHECK(yy.is_floating_point(), "yy must be a floating-point tensor, got ", yy.scalar_type());
  check_same_device(yy, z, "yy");
}

}  // namespace

std::vector<double> ridge_alpha_values(const at::Tensor& alphas) {
  TORCH_CHECK(alphas.dim() == 1 && alphas.size(0) > 0, "alphas must be 1-D and non-empty, got ", alphas.sizes());
  auto a = alphas.to(at::kCPU, at::kDouble).contiguous();
  std::vector<double> out(a.data_ptr<double>(), a.data_ptr<double>() + a.numel());
  for (double v : out) TORCH_CHECK(v > 0.0, "alphas must be positive, got ", v);
  return out;
}

void ridge_check_kfold(const at::Tensor& s, const at::Tensor& z, const at::Tensor& b, const at::Tensor& yy,
                       const at::Tensor& quad, const at::Tensor& alphas, bool rows) {
  check_spectrum(s, z);
  check_like_z(b, z, "b");
  check_yy(yy, z);
  const int64_t p = z.size(0);
  TORCH_CHECK(quad.dim() == 2 && quad.size(1) == p && (rows || quad.size(0) == p),
              rows ? "quad (rotated validation rows Xv V) must be (n_val, p) with p = "
                   : "quad (rotated validation Gram V'Xv'XvV) must be (p, p) with p = ",
              p, ", got ", quad.sizes());
  TORCH_CHECK(quad.scalar_type() == z.scalar_type(), "quad must have the dtype of z (", z.scalar_type(), "), got ",
              quad.scalar_type());
  check_same_device(quad, z, "quad");
  ridge_alpha_values(alphas);
}

void ridge_check_loo(const at::Tensor& xr, const at::Tensor& y, const at::Tensor& s, const at::Tensor& z,
                     const at::Tensor& alphas, int64_t chunk_rows) {
  check_spectrum(s, z);
  const int64_t p = z.size(0), t = z.size(1);
  TORCH_CHECK(xr.dim() == 2 && xr.size(1) == p, "xr (rotated centred rows X V) must be (n, p) with p = ", p,
              ", got ", xr.sizes());
  TORCH_CHECK(y.dim() == 2 && y.size(0) == xr.size(0) && y.size(1) == t, "y must be (n, n_targets) = (",
              xr.size(0), ", ", t, "), got ", y.sizes());
  TORCH_CHECK(xr.scalar_type() == z.scalar_type() && y.scalar_type() == z.scalar_type(),
              "xr and y must have the dtype of z (", z.scalar_type(), "), got ", xr.scalar_type(), " and ",
              y.scalar_type());
  check_same_device(xr, z, "xr");
  check_same_device(y, z, "y");
  TORCH_CHECK(chunk_rows > 0, "chunk_rows must be positive, got ", chunk_rows);
  TORCH_CHECK(xr.size(0) > 1, "leave-one-out needs at least 2 rows, got ", xr.size(0));
  ridge_alpha_values(alphas);
}

int64_t ridge_check_basis(const at::Tensor& basis, const at::Tensor& coef, const at::Tensor& z, int64_t na) {
  const int64_t p = z.size(0);
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) == p && basis.size(1) > 0, "basis must be (p, r) with p = ", p,
              " and r >= 1, got ", basis.sizes());
  const int64_t r = basis.size(1);
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == na && coef.size(1) == r, "coef must be (n_alphas, r) = (", na,
              ", ", r, "), got ", coef.sizes());
  TORCH_CHECK(basis.is_floating_point() && coef.is_floating_point(), "basis and coef must be floating point, got ",
              basis.scalar_type(), " and ", coef.scalar_type());
  check_same_device(basis, z, "basis");
  check_same_device(coef, z, "coef");
  return r;
}

void ridge_check_gcv(const at::Tensor& s, const at::Tensor& z, const at::Tensor& yy, const at::Tensor& alphas,
                     double n, double df0) {
  check_spectrum(s, z);
  check_yy(yy, z);
  TORCH_CHECK(df0 >= 0.0 && n > df0, "n (", n, ") must exceed df0 (", df0, ") >= 0");
  ridge_alpha_values(alphas);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ridge_gcv_parts(const at::Tensor& s_, const at::Tensor& z,
                                                               const at::Tensor& yy, const at::Tensor& alphas,
                                                               double n, double df0) {
  const auto f64 = z.options().dtype(at::kDouble);
  auto s = s_.to(at::kDouble);
  auto al = at::tensor(ridge_alpha_values(alphas), f64);
  auto pos = s > 0.0;                                                            // directions inside the fit
  auto inv_s = at::where(pos, at::reciprocal(s), at::zeros_like(s));             // (p,)
  auto ad = pos * (al.unsqueeze(1) / (s.unsqueeze(0) + al.unsqueeze(1)));        // (n_alphas, p): a d_j, 0 off the fit
  auto zz = z.to(at::kDouble).square();                                          // (p, t)
  auto sse_in = at::mm(ad.square() * inv_s, zz);                                 // (n_alphas, t): one float64 GEMM
  auto n_pos = pos.sum().to(at::kDouble);
  auto spans = n_pos >= (n - df0);                                               // y inside the span: no rest
  auto rest = at::where(spans, at::zeros({}, f64), (yy.to(at::kDouble) - at::mv(zz.t(), inv_s)).clamp_min(0.0));
  auto den = ((n - df0) - n_pos).clamp_min(0.0) + ad.sum(1);                     // (n_alphas,)
  return {sse_in.contiguous(), rest.contiguous(), den.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ridge_loo_parts(const at::Tensor& xr, const at::Tensor& y,
                                                               const at::Tensor& s, double h0) {
  const int64_t n = xr.size(0);
  const double df0 = h0 > 0.0 ? std::round(h0 * static_cast<double>(n)) : 0.0;
  auto sd = s.to(at::kDouble);
  auto pos = sd > 0.0;
  auto inv_s = at::where(pos, at::reciprocal(sd), at::zeros_like(sd));
  auto spans = pos.sum().to(at::kDouble) >= (static_cast<double>(n) - df0);  // 0-d, on the device
  auto outside = (1.0 - h0 - at::mv(xr.to(at::kDouble).square(), inv_s)).clamp_min(0.0);
  auto base = at::where(spans, at::zeros({}, outside.options()), outside).contiguous();
  auto y_in = at::where(spans, at::zeros({}, y.options()), y).contiguous();
  return {y_in, base, spans};
}

std::tuple<at::Tensor, at::Tensor> ridge_loo_weights(const at::Tensor& s, const at::Tensor& alphas,
                                                     const at::Tensor& spans) {
  auto sd = s.to(at::kDouble).unsqueeze(1);                                       // (p, 1)
  auto al = at::tensor(ridge_alpha_values(alphas), sd.options()).unsqueeze(0);    // (1, n_alphas)
  auto d = at::reciprocal(sd + al);
  auto g = at::where(sd > 0.0, al * d / sd, at::zeros({}, sd.options()));
  return {at::where(spans, g.neg(), d).contiguous(), g.contiguous()};
}

namespace {

constexpr int64_t kBlock = kRidgeBlock;  // targets per CPU work item: the inner loop over targets vectorises

// Runs fn(col0, ncols) over all targets: OpenMP over blocks of kBlock targets (threads == 0), or the CUDA
// grid of ridge_cuda.cu (blocks of `threads` threads, one target each: col = block * threads + thread)
// executed serially.
template <typename F>
void for_each_block(int64_t t, int64_t threads, const F& fn) {
  if (threads == 0) {
    const int64_t nb = (t + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(dynamic) if (nb > 1)
    for (int64_t blk = 0; blk < nb; ++blk) fn(blk * kBlock, std::min(kBlock, t - blk * kBlock));
    return;
  }
  const int64_t blocks = (t + threads - 1) / threads;
  for (int64_t block = 0; block < blocks; ++block)
    for (int64_t tid = 0; tid < threads; ++tid) {
      const int64_t col = block * threads + tid;
      if (col < t) fn(col, 1);
    }
}

void check_threads(int64_t threads) {
  TORCH_CHECK(threads > 0 && threads <= 1024, "threads must be in 1..1024 (a CUDA block), got ", threads);
}

// d_j = 1 / (s_j + alpha) in double, and dz = d * z row by row (p, t) in the compute dtype (the GEMM input).
template <typename scalar_t>
void spectral_weights(const scalar_t* sp, const scalar_t* zp, scalar_t* dzp, double* d, int64_t p, int64_t t,
                      double alpha) {
  for (int64_t j = 0; j < p; ++j) d[j] = 1.0 / (static_cast<double>(sp[j]) + alpha);
#pragma omp parallel for schedule(static) if (p * t >= 65536)
  for (int64_t j = 0; j < p; ++j) {
    const scalar_t dj = static_cast<scalar_t>(d[j]);
    for (int64_t c = 0; c < t; ++c) dzp[j * t + c] = dj * zp[j * t + c];
  }
}

template <typename scalar_t>
void kfold_typed(const at::Tensor& s, const at::Tensor& z, const at::Tensor& b, const at::Tensor& yy,
                 const at::Tensor& quad, at::Tensor& prod, at::Tensor& dz, const std::vector<double>& al, bool rows,
                 int64_t threads, at::Tensor& scores) {
  const int64_t p = z.size(0), t = z.size(1), m = quad.size(0), na = static_cast<int64_t>(al.size());
  const scalar_t* sp = s.data_ptr<scalar_t>();
  const scalar_t* zp = z.data_ptr<scalar_t>();
  const scalar_t* bp = b.data_ptr<scalar_t>();
  const double* yyp = yy.data_ptr<double>();
  scalar_t* dzp = dz.data_ptr<scalar_t>();
  double* out = scores.data_ptr<double>();
  std::vector<double> d(p);
  for (int64_t a = 0; a < na; ++a) {
    spectral_weights<scalar_t>(sp, zp, dzp, d.data(), p, t, al[a]);
    at::mm_out(prod, quad, dz);  // the one GEMM per alpha: the floor of exact k-fold scoring
    const scalar_t* pp = prod.data_ptr<scalar_t>();
    double* row = out + a * t;
    for_each_block(t, threads, [&](int64_t col0, int64_t nc) {
      for (int64_t c = 0; c < nc; ++c) row[col0 + c] = yyp[col0 + c];
      ridge_kfold_block<scalar_t>(d.data(), zp, bp, rows ? nullptr : pp, p, t, col0, nc, row + col0);
      if (rows) ridge_sumsq_block<scalar_t>(pp, m, t, col0, nc, row + col0);
    });
  }
}

// k-fold / group scores: SSE(a, t) of one validation fold for every alpha and target. Per alpha one BLAS
// product (gram: G (d*z), p x p x t; rows: (Xv V)(d*z), n_val x p x t), then the fused per-target reduction;
// no (n_alphas, p, t) intermediate exists, only one (p|n_val, t) buffer reused across alphas.
at::Tensor kfold_impl(const at::Tensor& s_, const at::Tensor& z_, const at::Tensor& b_, const at::Tensor& yy_,
                      const at::Tensor& quad_, const at::Tensor& alphas, bool rows, int64_t threads) {
  ridge_check_kfold(s_, z_, b_, yy_, quad_, alphas, rows);
  const int64_t p = z_.size(0), t = z_.size(1);
  auto s = s_.contiguous(), z = z_.contiguous(), b = b_.contiguous(), quad = quad_.contiguous();
  auto yy = yy_.to(at::kDouble).contiguous();
  const auto al = ridge_alpha_values(alphas);
  auto scores = at::empty({static_cast<int64_t>(al.size()), t}, z.options().dtype(at::kDouble));
  auto dz = at::empty({p, t}, z.options());
  auto prod = at::empty({quad.size(0), t}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ridge_score_kfold_cpu", [&] {
    kfold_typed<scalar_t>(s, z, b, yy, quad, prod, dz, al, rows, threads, scores);
  });
  return scores;
}

template <typename scalar_t>
void loo_typed(const at::Tensor& xr, const at::Tensor& y, const double* base, const at::Tensor& z,
               const at::Tensor& v, const at::Tensor& g, at::Tensor& prod, at::Tensor& dz, int64_t cr,
               int64_t threads, at::Tensor& scores, at::Tensor& best) {
  const int64_t n = xr.size(0), p = z.size(0), t = z.size(1), na = g.size(1);
  std::vector<double> best_score(t, 0.0), w(n), ga(p);
  const double* vp = v.data_ptr<double>();
  const double* gp = g.data_ptr<double>();
  const scalar_t* zp = z.data_ptr<scalar_t>();
  const scalar_t* xp = xr.data_ptr<scalar_t>();
  const scalar_t* yp = y.data_ptr<scalar_t>();
  scalar_t* dzp = dz.data_ptr<scalar_t>();
  double* out = scores.data_ptr<double>();
  int64_t* bi = best.data_ptr<int64_t>();
  double* wp = w.data();
  const double* gap = ga.data();
  for (int64_t a = 0; a < na; ++a) {
    for (int64_t j = 0; j < p; ++j) ga[j] = gp[j * na + a];
#pragma omp parallel for schedule(static) if (p * t >= 65536)
    for (int64_t j = 0; j < p; ++j) {
      const scalar_t vj = static_cast<scalar_t>(vp[j * na + a]);
      for (int64_t c = 0; c < t; ++c) dzp[j * t + c] = vj * zp[j * t + c];
    }
#pragma omp parallel for schedule(static) if (n * p >= 65536)
    for (int64_t i = 0; i < n; ++i) wp[i] = ridge_loo_weight<scalar_t>(xp + i * p, gap, p, base[i]);
    double* row = out + a * t;
    for (int64_t r0 = 0; r0 < n; r0 += cr) {
      const int64_t m = std::min(cr, n - r0);
      auto pv = prod.narrow(0, 0, m);
      at::mm_out(pv, xr.narrow(0, r0, m), dz);
      const scalar_t* pp = pv.data_ptr<scalar_t>();
      for_each_block(t, threads, [&](int64_t col0, int64_t nc) {
        ridge_loo_block<scalar_t>(yp + r0 * t, pp, wp + r0, m, t, t, col0, nc, row + col0);
      });
    }
    for_each_block(t, threads, [&](int64_t col0, int64_t nc) {
      for (int64_t c = col0; c < col0 + nc; ++c) {
        row[c] /= static_cast<double>(n);
        ridge_argmin_update(row[c], a, &best_score[c], &bi[c]);
      }
    });
  }
}

// Exact leave-one-out: mean squared LOO error (n_alphas, t) and the running argmin per target, without
// cancellation (ridge_loo_parts). Per alpha: leverages (O(n p)), then per chunk of rows one BLAS product
// P = Xr[chunk] (v z) and the fused weighted residual sum; P never exceeds (chunk_rows, t).
std::tuple<at::Tensor, at::Tensor> loo_impl(const at::Tensor& xr_, const at::Tensor& y_, const at::Tensor& s_,
                                            const at::Tensor& z_, const at::Tensor& alphas, double h0,
                                            int64_t chunk_rows, int64_t threads) {
  ridge_check_loo(xr_, y_, s_, z_, alphas, chunk_rows);
  const int64_t p = z_.size(0), t = z_.size(1), n = xr_.size(0);
  auto z = z_.contiguous(), xr = xr_.contiguous();
  at::Tensor y, base, spans, v, g;
  std::tie(y, base, spans) = ridge_loo_parts(xr, y_, s_, h0);
  std::tie(v, g) = ridge_loo_weights(s_, alphas, spans);
  const int64_t na = g.size(1);
  auto scores = at::zeros({na, t}, z.options().dtype(at::kDouble));
  auto best = at::zeros({t}, z.options().dtype(at::kLong));
  const int64_t cr = std::min(chunk_rows, n);
  auto dz = at::empty({p, t}, z.options());
  auto prod = at::empty({cr, t}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ridge_score_loo_cpu", [&] {
    loo_typed<scalar_t>(xr, y, base.data_ptr<double>(), z, v, g, prod, dz, cr, threads, scores, best);
  });
  return {scores, best};
}

template <typename scalar_t>
void loo_basis_typed(const at::Tensor& xr, const at::Tensor& y, const at::Tensor& basis, const at::Tensor& z,
                     const double* wp, const double* coefp, int64_t na, int64_t cr, int64_t tt, int64_t threads,
                     at::Tensor& scores) {
  const int64_t n = xr.size(0), p = z.size(0), t = z.size(1), r = basis.size(1);
  const scalar_t* up = basis.data_ptr<scalar_t>();
  const scalar_t* zp = z.data_ptr<scalar_t>();
  const scalar_t* yp = y.data_ptr<scalar_t>();
  double* out = scores.data_ptr<double>();
  auto zcat = at::empty({p, r * tt}, z.options());  // [U_1 * z_tile | ... | U_r * z_tile]
  auto q = at::empty({cr, r * tt}, z.options());
  for (int64_t c0 = 0; c0 < t; c0 += tt) {
    const int64_t w_t = std::min(tt, t - c0);
    scalar_t* zc = zcat.data_ptr<scalar_t>();
#pragma omp parallel for schedule(static) if (p * r * w_t >= 65536)
    for (int64_t j = 0; j < p; ++j)
      for (int64_t m = 0; m < r; ++m)
        for (int64_t c = 0; c < tt; ++c) zc[j * r * tt + m * tt + c] = c < w_t ? up[j * r + m] * zp[j * t + c0 + c] : 0;
    for (int64_t r0 = 0; r0 < n; r0 += cr) {
      const int64_t m_rows = std::min(cr, n - r0);
      auto qv = q.narrow(0, 0, m_rows);
      at::mm_out(qv, xr.narrow(0, r0, m_rows), zcat);  // the r basis GEMMs of this tile, as one
      const scalar_t* qp = qv.data_ptr<scalar_t>();
      for_each_block(w_t, threads, [&](int64_t col0, int64_t nc) {
        for (int64_t i = 0; i < m_rows; ++i)
          for (int64_t a = 0; a < na; ++a)
            ridge_loo_basis_block<scalar_t>(qp + i * r * tt, r, tt, coefp + a * r, yp + (r0 + i) * t + c0,
                                            wp[(r0 + i) * na + a], col0, nc, out + a * t + c0 + col0);
      });
    }
  }
}

// LOO through the alpha basis (see ridge_loo_basis_block): exact leverages (one (n, p) x (p, n_alphas) float64
// product), r GEMMs per tile of targets, and a fused pass over rows x alphas x targets; no cancellation
// (ridge_loo_parts).
std::tuple<at::Tensor, at::Tensor> loo_basis_impl(const at::Tensor& xr_, const at::Tensor& y_, const at::Tensor& s_,
                                                  const at::Tensor& z_, const at::Tensor& alphas, double h0,
                                                  const at::Tensor& basis_, const at::Tensor& coef_,
                                                  int64_t chunk_rows, int64_t threads) {
  ridge_check_loo(xr_, y_, s_, z_, alphas, chunk_rows);
  const int64_t t = z_.size(1), n = xr_.size(0);
  const auto al = ridge_alpha_values(alphas);
  const int64_t na = static_cast<int64_t>(al.size());
  ridge_check_basis(basis_, coef_, z_, na);
  auto xr = xr_.contiguous(), z = z_.contiguous();
  at::Tensor y, base, spans, v, g;
  std::tie(y, base, spans) = ridge_loo_parts(xr, y_, s_, h0);
  std::tie(v, g) = ridge_loo_weights(s_, alphas, spans);
  // when the rows are interpolated the residual weights are -g(a) = -a d(a) / s: the basis rows scaled by 1/s
  // and the coefficients by -a (per-entry relative accuracy unchanged); else d(a) itself
  auto sd = s_.to(at::kDouble);
  auto inv_s = at::where(sd > 0.0, at::reciprocal(sd), at::zeros_like(sd));
  auto b64 = basis_.to(at::kDouble), c64 = coef_.to(at::kDouble);
  auto al_t = at::tensor(al, c64.options()).unsqueeze(1);
  auto basis = at::where(spans, b64 * inv_s.unsqueeze(1), b64).to(z.scalar_type()).contiguous();
  auto coef = at::where(spans, (c64 * al_t).neg(), c64).contiguous();
  // exact leverages for every alpha: 1 - h = base + xr^2 g, in float64
  auto omh = at::mm(xr.to(at::kDouble).square(), g) + base.unsqueeze(1);  // (n, n_alphas)
  auto w = at::where(omh > 0.0, at::reciprocal(omh * omh), at::full({}, 1.0 / 0.0, omh.options())).contiguous();
  auto scores = at::zeros({na, t}, z.options().dtype(at::kDouble));
  auto best = at::zeros({t}, z.options().dtype(at::kLong));
  const int64_t cr = std::min(chunk_rows, n), tt = std::min<int64_t>(t, 256);
  if (t > 0) {
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ridge_score_loo_basis_cpu", [&] {
      loo_basis_typed<scalar_t>(xr, y, basis, z, w.data_ptr<double>(), coef.data_ptr<double>(), na, cr, tt, threads,
                                scores);
    });
  }
  double* out = scores.data_ptr<double>();
  int64_t* bi = best.data_ptr<int64_t>();
  for_each_block(t, threads, [&](int64_t col0, int64_t nc) {
    for (int64_t c = col0; c < col0 + nc; ++c) {
      double bs = 0.0;
      for (int64_t a = 0; a < na; ++a) {
        out[a * t + c] /= static_cast<double>(n);
        ridge_argmin_update(out[a * t + c], a, &bs, &bi[c]);
      }
    }
  });
  return {scores, best};
}

// Generalised CV for every alpha and target from ridge_gcv_parts (two float64 products, no cancellation: see
// ridge_checks.h), then the fused per-target ratio and argmin.
std::tuple<at::Tensor, at::Tensor> gcv_impl(const at::Tensor& s_, const at::Tensor& z_, const at::Tensor& yy_,
                                            const at::Tensor& alphas, double n, double df0, int64_t threads) {
  ridge_check_gcv(s_, z_, yy_, alphas, n, df0);
  const int64_t t = z_.size(1);
  auto [sse_in, rest, den] = ridge_gcv_parts(s_, z_, yy_, alphas, n, df0);
  const int64_t na = sse_in.size(0);
  auto scores = at::empty({na, t}, sse_in.options());
  auto best = at::zeros({t}, z_.options().dtype(at::kLong));
  const double* sp = sse_in.data_ptr<double>();
  const double* rp = rest.data_ptr<double>();
  const double* dp = den.data_ptr<double>();
  double* out = scores.data_ptr<double>();
  int64_t* bi = best.data_ptr<int64_t>();
  for_each_block(t, threads, [&](int64_t col0, int64_t nc) {
    for (int64_t c = col0; c < col0 + nc; ++c) {
      double bs = 0.0;
      for (int64_t a = 0; a < na; ++a) {
        const double g = ridge_gcv_score(sp[a * t + c], rp[c], dp[a], n);
        out[a * t + c] = g;
        ridge_argmin_update(g, a, &bs, &bi[c]);
      }
    }
  });
  return {scores, best};
}

// k-fold / group scores through the alpha basis: the same SSE(a, t) as ridge_score_kfold with the quadratic
// form's spectral weights d(a) = 1/(s + a) replaced by sum_m U_m coef_am (ridge_alpha_basis). With uz_m = U_m * z
// and G the rotated validation Gram,
//   quad(a) = (d z)' G (d z) = sum_{m,m'} coef_am coef_am' M_mm',  M_mm' = sum_j U_jm z_j (G uz_m')_j,
// so every step is a GEMM: P = G [uz_1 | ... | uz_r] (r p x p x t, the cost that replaces one GEMM per alpha),
// M = U' (z * P) (r x p x r t: r/p of that), quad = C2 M with C2_a = coef_a (x) coef_a (float64), and the
// linear term b'(d z) = D (z * b) exact in float64. Only ATen calls, so one implementation serves every
// device (the CPU registration here, the CUDA one in ridge_cuda.cu: MKL/OpenBLAS or cuBLAS).
at::Tensor kfold_basis_impl(const at::Tensor& s_, const at::Tensor& z_, const at::Tensor& b_, const at::Tensor& yy_,
                            const at::Tensor& quad_, const at::Tensor& alphas, bool rows, const at::Tensor& basis_,
                            const at::Tensor& coef_) {
  ridge_check_kfold(s_, z_, b_, yy_, quad_, alphas, rows);
  const int64_t p = z_.size(0), t = z_.size(1);
  const auto al = ridge_alpha_values(alphas);
  const int64_t na = static_cast<int64_t>(al.size());
  const int64_t r = ridge_check_basis(basis_, coef_, z_, na);
  const auto f64 = z_.options().dtype(at::kDouble);
  auto z = z_.contiguous(), b = b_.contiguous();
  auto G = rows ? at::mm(quad_.t(), quad_) : quad_.contiguous();  // (p, p): the form the U' fold needs
  auto U = basis_.to(z.device(), z.scalar_type());
  auto coef = coef_.to(z.device(), at::kDouble);
  auto C2 = (coef.unsqueeze(2) * coef.unsqueeze(1)).reshape({na, r * r});  // (n_alphas, r^2)
  auto D = at::reciprocal(at::tensor(al, f64).unsqueeze(1) + s_.to(at::kDouble).unsqueeze(0));  // (n_alphas, p)
  auto yy = yy_.to(f64);
  auto scores = at::empty({na, t}, f64);
  // tiles of targets: the (p, r * tt) buffers stay below 8M elements and are reused (fresh large allocations
  // page-fault on every tile: measured 0.6 s of 1.5 s at p = 1000, t = 3000, r = 11); equal tiles whose width is
  // a multiple of 64 (MKL sgemm ran at 28 GMAC/s with N = 4191 against 40-48 with N = 4096 or 7040)
  const int64_t n_tiles = std::max<int64_t>(1, (t * p * r + (int64_t{1} << 23) - 1) >> 23);
  const int64_t tt = std::min<int64_t>(t, ((t + n_tiles - 1) / n_tiles + 63) / 64 * 64);
  at::Tensor zcat, P, E, M, zd, zb, L, Q;
  for (int64_t c0 = 0; c0 < t; c0 += tt) {
    const int64_t w = std::min(tt, t - c0);
    if (!zcat.defined() || w != zcat.size(2)) {
      zcat = at::empty({p, r, w}, z.options());
      P = at::empty({p, r * w}, z.options());
      E = at::empty({p, r, w}, z.options());
      M = at::empty({r, r * w}, z.options());
      zd = at::empty({p, w}, f64);
      zb = at::empty({p, w}, f64);
      L = at::empty({na, w}, f64);
      Q = at::empty({na, w}, f64);
    }
    auto zt = z.narrow(1, c0, w);                                                  // (p, w)
    at::mul_out(zcat, U.unsqueeze(2), zt.unsqueeze(1));                            // [uz_1 | ... | uz_r]
    at::mm_out(P, G, zcat.view({p, r * w}));                                       // the r basis GEMMs, as one
    // z_j (G uz_m')_j and M = U'(...) in the compute dtype: a float64 product here costs 14% of the basis GEMMs
    // (mixed-dtype multiply, skinny DGEMM) for no measured change in the chosen alphas
    at::mul_out(E, P.view({p, r, w}), zt.unsqueeze(1));
    at::mm_out(M, U.t(), E.view({p, r * w}));                                      // M[m, m' w + c]
    zd.copy_(zt);
    at::mul_out(zb, zd, b.narrow(1, c0, w));
    at::mm_out(L, D, zb);                                                          // (n_alphas, w), exact
    at::mm_out(Q, C2, M.view({r * r, w}).to(at::kDouble));
    scores.narrow(1, c0, w).copy_(yy.narrow(0, c0, w).unsqueeze(0) - 2.0 * L + Q);
  }
  return scores;
}

at::Tensor ridge_score_kfold_cpu(const at::Tensor& s, const at::Tensor& z, const at::Tensor& b, const at::Tensor& yy,
                                 const at::Tensor& quad, const at::Tensor& alphas, bool rows) {
  return kfold_impl(s, z, b, yy, quad, alphas, rows, 0);
}
at::Tensor ridge_score_kfold_grid_cpu(const at::Tensor& s, const at::Tensor& z, const at::Tensor& b,
                                      const at::Tensor& yy, const at::Tensor& quad, const at::Tensor& alphas, bool rows,
                                      int64_t threads) {
  check_threads(threads);
  return kfold_impl(s, z, b, yy, quad, alphas, rows, threads);
}
std::tuple<at::Tensor, at::Tensor> ridge_score_loo_cpu(const at::Tensor& xr, const at::Tensor& y, const at::Tensor& s,
                                                       const at::Tensor& z, const at::Tensor& alphas, double h0,
                                                       int64_t chunk_rows) {
  return loo_impl(xr, y, s, z, alphas, h0, chunk_rows, 0);
}
std::tuple<at::Tensor, at::Tensor> ridge_score_loo_grid_cpu(const at::Tensor& xr, const at::Tensor& y,
                                                            const at::Tensor& s, const at::Tensor& z,
                                                            const at::Tensor& alphas, double h0, int64_t chunk_rows,
                                                            int64_t threads) {
  check_threads(threads);
  return loo_impl(xr, y, s, z, alphas, h0, chunk_rows, threads);
}
std::tuple<at::Tensor, at::Tensor> ridge_score_loo_basis_cpu(const at::Tensor& xr, const at::Tensor& y,
                                                             const at::Tensor& s, const at::Tensor& z,
                                                             const at::Tensor& alphas, double h0,
                                                             const at::Tensor& basis, const at::Tensor& coef,
                                                             int64_t chunk_rows) {
  return loo_basis_impl(xr, y, s, z, alphas, h0, basis, coef, chunk_rows, 0);
}
std::tuple<at::Tensor, at::Tensor> ridge_score_loo_basis_grid_cpu(const at::Tensor& xr, const at::Tensor& y,
                                                                  const at::Tensor& s, const at::Tensor& z,
                                                                  const at::Tensor& alphas, double h0,
                                                                  const at::Tensor& basis, const at::Tensor& coef,
                                                                  int64_t chunk_rows, int64_t threads) {
  check_threads(threads);
  return loo_basis_impl(xr, y, s, z, alphas, h0, basis, coef, chunk_rows, threads);
}
std::tuple<at::Tensor, at::Tensor> ridge_score_gcv_cpu(const at::Tensor& s, const at::Tensor& z, const at::Tensor& yy,
                                                       const at::Tensor& alphas, double n, double df0) {
  return gcv_impl(s, z, yy, alphas, n, df0, 0);
}
std::tuple<at::Tensor, at::Tensor> ridge_score_gcv_grid_cpu(const at::Tensor& s, const at::Tensor& z,
                                                            const at::Tensor& yy, const at::Tensor& alphas, double n,
                                                            double df0, int64_t threads) {
  check_threads(threads);
  return gcv_impl(s, z, yy, alphas, n, df0, threads);
}

}  // namespace

// ATen calls only: the same function is the CPU and the CUDA kernel (declared in ridge_checks.h)
at::Tensor ridge_score_kfold_basis_aten(const at::Tensor& s, const at::Tensor& z, const at::Tensor& b,
                                        const at::Tensor& yy, const at::Tensor& quad, const at::Tensor& alphas,
                                        bool rows, const at::Tensor& basis, const at::Tensor& coef) {
  return kfold_basis_impl(s, z, b, yy, quad, alphas, rows, basis, coef);
}

TORCH_LIBRARY_FRAGMENT(metalign_ops, m) {
  // Validation SSE of one k-fold / group fold for every alpha (rows) and target (columns), float64:
  //   SSE(a, t) = yy_t - 2 sum_j b_jt z_jt / (s_j + a) + quad(a, t)
  // s (p,) training eigenvalues, z = V'X'y (p, t) training, b = V'Xv'yv (p, t) validation (both centred by
  // the training means), yy (t,) = |yv|^2; quad from `quad` = V'Xv'XvV (p, p) (rows=False) or Xv V
  // (n_val, p) (rows=True).
  m.def("ridge_score_kfold(Tensor s, Tensor z, Tensor b, Tensor yy, Tensor quad, Tensor alphas, bool rows) -> Tensor");
  // Exact leave-one-out (sklearn RidgeCV semantics): mean squared LOO error (n_alphas, t) float64 and the
  // first argmin per target (t,) int64. xr = Xc V (n, p), y (n, t) centred, h0 = 1/n with an intercept (0
  // without). Directions with s_j = 0 are outside the fit (xr and z zero there). Computed without
  // cancellation (ridge_loo_parts), so p >= n (interpolation at small alpha) scores right.
  m.def("ridge_score_loo(Tensor xr, Tensor y, Tensor s, Tensor z, Tensor alphas, float h0, int chunk_rows) -> "
        "(Tensor scores, Tensor best)");
  // LOO with the spectral weights 1/(s + alpha) replaced by basis (p, r) x coef(n_alphas, r)' (a truncated
  // SVD, see ridge_kernel.h): r GEMMs instead of one per alpha; leverages exact. Same outputs as ridge_score_loo.
  m.def("ridge_score_loo_basis(Tensor xr, Tensor y, Tensor s, Tensor z, Tensor alphas, float h0, Tensor basis, "
        "Tensor coef, int chunk_rows) -> (Tensor scores, Tensor best)");
  m.def("ridge_score_loo_basis_grid(Tensor xr, Tensor y, Tensor s, Tensor z, Tensor alphas, float h0, Tensor basis, "
        "Tensor coef, int chunk_rows, int threads) -> (Tensor scores, Tensor best)");
  // Generalised CV (n_alphas, t) float64 and its argmin (t,) int64; yy = |y|^2 (y centred when df0 = 1, with an
  // intercept). Directions with s_j = 0 are outside the fit (their z must be 0): ridge_cv zeroes the directions
  // below its rank tolerance. Computed without cancellation (ridge_gcv_parts), so p >= n (interpolation at small
  // alpha) scores right.
  m.def("ridge_score_gcv(Tensor s, Tensor z, Tensor yy, Tensor alphas, float n, float df0) -> "
        "(Tensor scores, Tensor best)");
  // k-fold scores with the quadratic form through the alpha basis (basis (p, r), coef (n_alphas, r) from
  // ridge_alpha_basis): same output as ridge_score_kfold, r GEMMs instead of one per alpha; linear term exact.
  m.def("ridge_score_kfold_basis(Tensor s, Tensor z, Tensor b, Tensor yy, Tensor quad, Tensor alphas, bool rows, "
        "Tensor basis, Tensor coef) -> Tensor");
  // CPU emulations of the CUDA launch grids (one thread per target, `threads` per block), same functions.
  m.def("ridge_score_kfold_grid(Tensor s, Tensor z, Tensor b, Tensor yy, Tensor quad, Tensor alphas, bool rows, "
        "int threads) -> Tensor");
  m.def("ridge_score_loo_grid(Tensor xr, Tensor y, Tensor s, Tensor z, Tensor alphas, float h0, int chunk_rows, "
        "int threads) -> (Tensor scores, Tensor best)");
  m.def("ridge_score_gcv_grid(Tensor s, Tensor z, Tensor yy, Tensor alphas, float n, float df0, int threads) -> "
        "(Tensor scores, Tensor best)");
}

TORCH_LIBRARY_IMPL(metalign_ops, CPU, m) {
  m.impl("ridge_score_kfold", &ridge_score_kfold_cpu);
  m.impl("ridge_score_loo", &ridge_score_loo_cpu);
  m.impl("ridge_score_gcv", &ridge_score_gcv_cpu);
  m.impl("ridge_score_loo_basis", &ridge_score_loo_basis_cpu);
  m.impl("ridge_score_loo_basis_grid", &ridge_score_loo_basis_grid_cpu);
  m.impl("ridge_score_kfold_grid", &ridge_score_kfold_grid_cpu);
  m.impl("ridge_score_kfold_basis", &ridge_score_kfold_basis_aten);
  m.impl("ridge_score_loo_grid", &ridge_score_loo_grid_cpu);
  m.impl("ridge_score_gcv_grid", &ridge_score_gcv_grid_cpu);
}

}  // namespace metalign

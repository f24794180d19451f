// Per-target logic of the streaming-ridge scoring kernels, shared by the CPU path (C++/OpenMP), the CUDA
// kernels and the CPU emulation of the CUDA launch grid (ridge_score_*_grid), so the GPU arithmetic and
// indexing are checked on machines without a GPU.
//
// Notation (targets are the columns of row-major (rows, n_targets) matrices with leading dimension ld):
//   s (p,)    eigenvalues of the centred training Gram X'X (clamped at 0), V its eigenvectors
//   z (p, t)  V' X'y of the training rows (the eigen-rotated cross-product)
//   d (p,)    d_j = 1 / (s_j + alpha), precomputed once per alpha; the ridge solution is w = V (d * z)
// Each function handles a block of ncols consecutive targets [col0, col0 + ncols) and adds into acc[0..ncols):
// the CPU calls it with blocks of 64 targets (the inner loop over targets vectorises, the rows stream once),
// a CUDA thread with ncols = 1. Sums are accumulated in double.
#pragma once
#include <cstdint>

#include "hd.h"

namespace metalign {

constexpr int64_t kRidgeBlock = 64;  // targets per CPU work item (a CUDA thread takes 1)

// k-fold / leave-one-group-out validation error, SSE(a) = |yv|^2 - 2 b'(d z) + quad, with
// b = V' Xv'yv (validation cross-product, both sides centred by the training means).
// Gram mode (m = G (d z), G = V' Xv'Xv V, cheaper when n_val > p): quad = (d z)' m, so
//   acc += sum_j d_j z_j (m_j - 2 b_j).
// Rows mode (m == nullptr; quad = |Xv V (d z)|^2 from ridge_sumsq_block): acc += -2 sum_j d_j z_j b_j.
template <typename T>
METALIGN_HD void ridge_kfold_block(const double* d, const T* z, const T* b, const T* m, int64_t p, int64_t ld,
                                   int64_t col0, int64_t ncols, double* acc) {
  for (int64_t j = 0; j < p; ++j) {
    const T* zr = z + j * ld + col0;
    const T* br = b + j * ld + col0;
    const double dj = d[j];
    if (m != nullptr) {
      const T* mr = m + j * ld + col0;
      for (int64_t c = 0; c < ncols; ++c)
        acc[c] += dj * static_cast<double>(zr[c]) * (static_cast<double>(mr[c]) - 2.0 * static_cast<double>(br[c]));
    } else {
      for (int64_t c = 0; c < ncols; ++c) acc[c] -= 2.0 * dj * static_cast<double>(zr[c]) * static_cast<double>(br[c]);
    }
  }
}

// acc += sum_i P_i^2 over rows [0, m) (rows-mode quadratic form, P = (Xv V)(d z)).
template <typename T>
METALIGN_HD void ridge_sumsq_block(const T* pred, int64_t m, int64_t ld, int64_t col0, int64_t ncols, double* acc) {
  for (int64_t i = 0; i < m; ++i) {
    const T* pr = pred + i * ld + col0;
    for (int64_t c = 0; c < ncols; ++c) acc[c] += static_cast<double>(pr[c]) * static_cast<double>(pr[c]);
  }
}

// LOO weight of one row for one alpha, 1 / (1 - h)^2, with 1 - h = base + sum_j xr_j^2 g_j written without
// cancellation: g_j = a / (s_j (s_j + a)) (0 off the fit) and base = 1 - h0 - sum_j xr_j^2 / s_j, the leverage
// left outside the span (exactly 0 when the rows are interpolated: p >= n). 1 - h <= 0 (a row interpolated
// exactly) has no LOO error: an infinite weight makes that alpha lose unless every alpha does.
template <typename T>
METALIGN_HD double ridge_loo_weight(const T* xr_row, const double* g, int64_t p, double base) {
  double q = base;
  for (int64_t j = 0; j < p; ++j) {
    const double x = static_cast<double>(xr_row[j]);
    q += x * x * g[j];
  }
  return q > 0.0 ? 1.0 / (q * q) : 1.0 / 0.0;
}

// Exact leave-one-out squared errors over rows [0, m) of a chunk (Allen 1974; the identity sklearn RidgeCV
// uses): r_i = e_i / (1 - h_i) with w_i = 1 / (1 - h_i)^2, e = y - P. When the rows are interpolated (p >= n)
// the caller passes y = 0 and P = -Xr (g z) (ridge_loo_parts), so e = Xr (g z) is computed as the small
// number it is, not as y minus a fit equal to y in every digit; otherwise y and P = Xr (d z).
template <typename T>
METALIGN_HD void ridge_loo_block(const T* y, const T* pred, const double* w, int64_t m, int64_t ld_y, int64_t ld_p,
                                 int64_t col0, int64_t ncols, double* acc) {
  for (int64_t i = 0; i < m; ++i) {
    const T* yr = y + i * ld_y + col0;
    const T* pr = pred + i * ld_p + col0;
    const double wi = w[i];
    for (int64_t c = 0; c < ncols; ++c) {
      const double e = static_cast<double>(yr[c]) - static_cast<double>(pr[c]);
      acc[c] += wi * e * e;
    }
  }
}

// LOO with the spectral weights expanded in a few alpha-basis functions: d(a) = 1/(s + a) ~ sum_m U_m coef_am
// (a truncated SVD of the (p, n_alphas) matrix of spectral weights; its rank is ~5-10 at 1e-10 because
// 1/(s_j + a) is a smooth Cauchy kernel), so the fit of every alpha is P(a) = sum_m coef_am Q_m with
// Q_m = Xr (U_m * z): r GEMMs in all instead of one per alpha. When the rows are interpolated the residual
// weights -g_j(a) = -a d_j(a) / s_j take the same expansion with rows scaled by 1/s_j and coefficients by -a
// (per-entry relative accuracy unchanged) and y = 0 (see ridge_loo_block). For one row i, one alpha a and a
// block of targets: acc_c += w_i(a) (y_ic - sum_m coef_am Q_m,ic)^2 (w from the exact leverages).
template <typename T>
METALIGN_HD void ridge_loo_basis_block(const T* q_row, int64_t r, int64_t ldq, const double* coef_a, const T* y_row,
                                       double w, int64_t col0, int64_t ncols, double* acc) {
  double pred[kRidgeBlock];  // ncols <= kRidgeBlock: the m-outer order keeps the loop over targets contiguous
  for (int64_t c = 0; c < ncols; ++c) pred[c] = 0.0;
  for (int64_t m = 0; m < r; ++m) {
    const double cm = coef_a[m];
    const T* qm = q_row + m * ldq + col0;
    for (int64_t c = 0; c < ncols; ++c) pred[c] += cm * static_cast<double>(qm[c]);
  }
  for (int64_t c = 0; c < ncols; ++c) {
    const double e = static_cast<double>(y_row[col0 + c]) - pred[c];
    acc[c] += w * e * e;
  }
}

// Generalised CV (Golub, Heath & Wahba 1979) of one target for one alpha, GCV = (SSE / n) / (1 - df / n)^2,
// from pieces computed without cancellation (ridge_gcv_parts in ridge_cpu.cpp): SSE = sse_in + rest with
// sse_in = sum_j (a d_j)^2 z_j^2 / s_j (the residual inside the span of X) and rest = |y outside the span|^2,
// and den = n - df = (n - df0 - rank) + sum_j a d_j. The textbook |y|^2 - fit and n - df lose every digit when
// p >= n and alpha is small (the fit interpolates: both are O(alpha) differences of O(1) numbers).
METALIGN_HD double ridge_gcv_score(double sse_in, double rest, double den, double n) {
  return n * (sse_in + rest) / (den * den);
}

// Running argmin over alphas: strict <, so ties keep the first (smallest-index) alpha as sklearn does.
METALIGN_HD void ridge_argmin_update(double score, int64_t a, double* best_score, int64_t* best_idx) {
  if (a == 0 || score < *best_score) {
    *best_score = score;
    *best_idx = a;
  }
}

}  // namespace metalign

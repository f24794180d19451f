// CPU (C++/OpenMP) implementation of the streaming-CKA ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "checks.h"
#include "cka_kernel.h"

namespace metalign {

void cka_check_pair(const at::Tensor& x, const at::Tensor& shift, const char* xname, const char* sname) {
  TORCH_CHECK(x.dim() == 2, xname, " must be 2-D (n_rows, d), got ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), xname, " must be floating point, got ", x.scalar_type());
  TORCH_CHECK(shift.dim() == 1 && shift.size(0) == x.size(1), sname, " must be 1-D of length ", x.size(1),
              " (the columns of ", xname, "), got ", shift.sizes());
  TORCH_CHECK(shift.is_floating_point(), sname, " must be floating point, got ", shift.scalar_type());
  TORCH_CHECK(shift.device() == x.device(), sname, " must be on the device of ", xname, " (", x.device(), "), got ",
              shift.device());
}

void cka_check_moments(const at::Tensor& x, const at::Tensor& y, const at::Tensor& shift_x,
                       const at::Tensor& shift_y) {
  cka_check_pair(x, shift_x, "x", "shift_x");
  cka_check_pair(y, shift_y, "y", "shift_y");
  TORCH_CHECK(x.size(0) == y.size(0), "x and y must have the same number of rows, got ", x.size(0), " and ",
              y.size(0));
  TORCH_CHECK(x.device() == y.device(), "x and y must be on the same device, got ", x.device(), " and ",
              y.device());
}

void cka_check_rbf_tile(const at::Tensor& gx, const at::Tensor& gy, const at::Tensor& nxi, const at::Tensor& nxj,
                        const at::Tensor& nyi, const at::Tensor& nyj) {
  TORCH_CHECK(gx.dim() == 2 && gx.sizes() == gy.sizes(), "gx and gy must be 2-D tiles of one shape, got ",
              gx.sizes(), " and ", gy.sizes());
  TORCH_CHECK(gx.scalar_type() == at::kDouble && gy.scalar_type() == at::kDouble, "gx and gy must be float64, got ",
              gx.scalar_type(), " and ", gy.scalar_type());
  const int64_t ti = gx.size(0), tj = gx.size(1);
  for (auto [t, name, len] : {std::tuple{&nxi, "nxi", ti}, {&nxj, "nxj", tj}, {&nyi, "nyi", ti}, {&nyj, "nyj", tj}})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == len && t->scalar_type() == at::kDouble, name,
                " must be float64 of length ", len, ", got ", t->sizes(), " ", t->scalar_type());
  for (const at::Tensor* t : {&gy, &nxi, &nxj, &nyi, &nyj})
    TORCH_CHECK(t->device() == gx.device(), "gx, gy, nxi, nxj, nyi and nyj must be on one device, got ",
                gx.device(), " and ", t->device());
}

void rbf_check_kernel_tile(const at::Tensor& g, const at::Tensor& ni, const at::Tensor& nj) {
  TORCH_CHECK(g.dim() == 2 && g.scalar_type() == at::kDouble, "g must be a 2-D float64 Gram tile, got ",
              g.sizes(), " ", g.scalar_type());
  for (auto [t, name, len] : {std::tuple{&ni, "ni", g.size(0)}, {&nj, "nj", g.size(1)}})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == len && t->scalar_type() == at::kDouble, name,
                " must be float64 of length ", len, ", got ", t->sizes(), " ", t->scalar_type());
  TORCH_CHECK(ni.device() == g.device() && nj.device() == g.device(), "g, ni and nj must be on one device, got ",
              g.device(), ", ", ni.device(), " and ", nj.device());
}

namespace {

at::ScalarType compute_dtype(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

template <typename T, typename C>
void shift_rows_loop(const T* xp, int64_t n, int64_t d, int64_t rs, int64_t cs, const C* sh, C* out, double* sq) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) sq[i] = cka_shift_row_partial<T, C>(xp + i * rs, cs, sh, out + i * d, d, 0, 1);
}

// Shift every row of x (any float dtype, any strides) into a contiguous matrix of dtype C, returning the
// squared row norms in double: the fused first pass of cka_moments.
template <typename C>
void shift_rows_into(const at::Tensor& x, const at::Tensor& shift, at::Tensor& xs, double* sq) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cka_shift_rows_cpu", [&] {
    shift_rows_loop<scalar_t, C>(x.data_ptr<scalar_t>(), x.size(0), x.size(1), x.stride(0), x.stride(1),
                                 shift.data_ptr<C>(), xs.data_ptr<C>(), sq);
  });
}

// Row-weighted column sums in double (sum xs, sum q xs, sum p xs; the same for ys with p, q swapped) and
// the scalar sums, one private buffer per thread, summed in thread order (deterministic for a fixed
// thread count).
template <typename C>
void weighted_sums(const C* xsp, const C* ysp, const double* pp, const double* qp, int64_t m, int64_t d1,
                   int64_t d2, double* vxp, double* vyp, double* sp) {
  int n_threads = 1;
#ifdef _OPENMP
  n_threads = omp_get_max_threads();
#endif
  const int64_t width = 3 * d1 + 3 * d2 + 5;
  std::vector<double> priv(static_cast<size_t>(n_threads) * width, 0.0);
#pragma omp parallel num_threads(n_threads)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    double* b = priv.data() + static_cast<size_t>(tid) * width;
    double *bx = b, *by = b + 3 * d1, *bs = b + 3 * d1 + 3 * d2;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
      const double pi = pp[i], qi = qp[i];
      const C* xr = xsp + i * d1;
      const C* yr = ysp + i * d2;
      for (int64_t k = 0; k < d1; ++k) {
        const double v = xr[k];
        bx[k] += v;
        bx[d1 + k] += qi * v;
        bx[2 * d1 + k] += pi * v;
      }
      for (int64_t k = 0; k < d2; ++k) {
        const double v = yr[k];
        by[k] += v;
        by[d2 + k] += pi * v;
        by[2 * d2 + k] += qi * v;
      }
      bs[0] += pi; bs[1] += qi; bs[2] += pi * qi; bs[3] += pi * pi; bs[4] += qi * qi;
    }
  }
  sp[0] = static_cast<double>(m);
  for (int t = 0; t < n_threads; ++t) {
    const double* b = priv.data() + static_cast<size_t>(t) * width;
    for (int64_t k = 0; k < 3 * d1; ++k) vxp[k] += b[k];
    for (int64_t k = 0; k < 3 * d2; ++k) vyp[k] += b[3 * d1 + k];
    for (int j = 0; j < 5; ++j) sp[1 + j] += b[3 * d1 + 3 * d2 + j];
  }
}

std::tuple<at::Tensor, at::Tensor> cka_shift_rows_cpu(const at::Tensor& x, const at::Tensor& shift) {
  cka_check_pair(x, shift, "x", "shift");
  const auto ct = compute_dtype(x, shift);
  auto sh = shift.to(ct).contiguous();
  auto xs = at::empty({x.size(0), x.size(1)}, x.options().dtype(ct));
  auto sq = at::empty({x.size(0)}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(ct, "cka_shift_rows_cpu", [&] {
    shift_rows_into<scalar_t>(x, sh, xs, sq.data_ptr<double>());
  });
  return {xs, sq};
}

// Runs the CUDA launch grid of cka_shift_rows_kernel (csrc/cka_cuda.cu) on the CPU: block b = row b,
// threads t = 0..threads-1 each call cka_shift_row_partial, then the same shared-memory tree reduction.
std::tuple<at::Tensor, at::Tensor> cka_shift_rows_grid_cpu(const at::Tensor& x, const at::Tensor& shift,
                                                           int64_t threads) {
  cka_check_pair(x, shift, "x", "shift");
  TORCH_CHECK(threads > 0 && (threads & (threads - 1)) == 0, "threads must be a power of two, got ", threads);
  const auto ct = compute_dtype(x, shift);
  auto sh = shift.to(ct).contiguous();
  const int64_t n = x.size(0), d = x.size(1), rs = x.stride(0), cs = x.stride(1);
  auto xs = at::empty({n, d}, x.options().dtype(ct));
  auto sq = at::empty({n}, x.options().dtype(at::kDouble));
  double* sqp = sq.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(ct, "cka_shift_rows_grid", [&] {
    using C = scalar_t;
    const C* shp = sh.data_ptr<C>();
    C* out = xs.data_ptr<C>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cka_shift_rows_grid_x", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      std::vector<double> buf(threads);
      for (int64_t block = 0; block < n; ++block) {
        for (int64_t t = 0; t < threads; ++t)
          buf[t] = cka_shift_row_partial<scalar_t, C>(xp + block * rs, cs, shp, out + block * d, d, t, threads);
        for (int64_t s = threads / 2; s > 0; s >>= 1)
          for (int64_t t = 0; t < threads; ++t) cka_tree_step(buf.data(), t, s);
        sqp[block] = buf[0];
      }
    });
  });
  return {xs, sq};
}

// A'A for a contiguous (m, d) matrix, computing only the lower triangle by column panels (each panel a
// BLAS call on the rows below it: about half the flops of a full GEMM, ~30% faster at d = 768..1024 on
// 2 cores; BLAS has syrk but ATen does not expose it), then mirrored. Returned in float64.
at::Tensor gram_by_panels(const at::Tensor& a) {
  constexpr int64_t kPanel = 128;
  const int64_t d = a.size(1);
  if (d <= 2 * kPanel) return at::mm(a.t(), a).to(at::kDouble);
  auto out = at::empty({d, d}, a.options());
  for (int64_t i = 0; i < d; i += kPanel) {
    const int64_t w = std::min(kPanel, d - i);
    auto dst = out.narrow(0, i, d - i).narrow(1, i, w);  // rows i.., columns i..i+w: the panel and below
    at::mm_out(dst, a.narrow(1, i, d - i).t(), a.narrow(1, i, w));
  }
  auto g = out.to(at::kDouble);
  double* gp = g.data_ptr<double>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < d; ++r)
    for (int64_t c = r + 1; c < d; ++c) gp[r * d + c] = gp[c * d + r];
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cka_moments_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& shift_x, const at::Tensor& shift_y) {
  cka_check_moments(x, y, shift_x, shift_y);
  const auto ct = compute_dtype(x, y);
  const int64_t m = x.size(0), d1 = x.size(1), d2 = y.size(1);
  auto f64 = x.options().dtype(at::kDouble);
  auto xs = at::empty({m, d1}, x.options().dtype(ct));
  auto ys = at::empty({m, d2}, x.options().dtype(ct));
  auto p = at::empty({m}, f64), q = at::empty({m}, f64);
  auto vx = at::zeros({3, d1}, f64), vy = at::zeros({3, d2}, f64), s = at::zeros({6}, f64);

  AT_DISPATCH_FLOATING_TYPES(ct, "cka_moments_cpu", [&] {
    using C = scalar_t;
    shift_rows_into<C>(x, shift_x.to(ct).contiguous(), xs, p.data_ptr<double>());
    shift_rows_into<C>(y, shift_y.to(ct).contiguous(), ys, q.data_ptr<double>());
    weighted_sums<C>(xs.data_ptr<C>(), ys.data_ptr<C>(), p.data_ptr<double>(), q.data_ptr<double>(), m, d1, d2,
                     vx.data_ptr<double>(), vy.data_ptr<double>(), s.data_ptr<double>());
  });
  // The O(m d^2) products go to the BLAS ATen links (MKL/OpenBLAS) in the compute dtype; each chunk's
  // product is promoted to double before it is added to the running totals by the caller.
  auto xx = gram_by_panels(xs);
  auto yy = gram_by_panels(ys);
  auto xy = at::mm(xs.t(), ys).to(at::kDouble);
  return {xx, yy, xy, vx, vy, s};
}

// ---- RBF CKA: one Gram tile of X and of Y -> kernel values, consumed on the fly --------------------------

template <typename F>
void rbf_tile_loop(int64_t ti, int64_t tj, F&& element, double* row_k, double* row_l, double* col_k,
                   double* col_l, double* sums) {
  int n_threads = 1;
#ifdef _OPENMP
  n_threads = omp_get_max_threads();
#endif
  std::vector<double> priv(static_cast<size_t>(n_threads) * (2 * tj + 3), 0.0);
#pragma omp parallel num_threads(n_threads)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    double* ck = priv.data() + static_cast<size_t>(tid) * (2 * tj + 3);
    double *cl = ck + tj, *sm = ck + 2 * tj;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < ti; ++r) {
      double rk = 0, rl = 0;
      for (int64_t c = 0; c < tj; ++c) {
        double k, l;
        element(r, c, k, l);
        rk += k; rl += l; ck[c] += k; cl[c] += l;
        sm[0] += k * l; sm[1] += k * k; sm[2] += l * l;
      }
      row_k[r] = rk; row_l[r] = rl;
    }
  }
  for (int t = 0; t < n_threads; ++t) {
    const double* b = priv.data() + static_cast<size_t>(t) * (2 * tj + 3);
    for (int64_t c = 0; c < tj; ++c) { col_k[c] += b[c]; col_l[c] += b[tj + c]; }
    for (int j = 0; j < 3; ++j) sums[j] += b[2 * tj + j];
  }
}

// One RBF tile's inputs (made contiguous and kept alive for the raw pointers) and zeroed outputs.
struct RbfTile {
  at::Tensor gx, gy, nxi, nxj, nyi, nyj, row_k, col_k, row_l, col_l, sums;
  const double *pgx, *pgy, *pxi, *pxj, *pyi, *pyj;  // raw pointers: data_ptr() per element cost ~3x the op
  int64_t ti, tj;
  double gamma_x, gamma_y;
  bool diagonal;
  RbfTile(const at::Tensor& gx_, const at::Tensor& gy_, const at::Tensor& nxi_, const at::Tensor& nxj_,
          const at::Tensor& nyi_, const at::Tensor& nyj_, double gamma_x_, double gamma_y_, bool diagonal_)
      : gamma_x(gamma_x_), gamma_y(gamma_y_), diagonal(diagonal_) {
    cka_check_rbf_tile(gx_, gy_, nxi_, nxj_, nyi_, nyj_);
    gx = gx_.contiguous(); gy = gy_.contiguous();
    nxi = nxi_.contiguous(); nxj = nxj_.contiguous(); nyi = nyi_.contiguous(); nyj = nyj_.contiguous();
    ti = gx.size(0); tj = gx.size(1);
    auto f64 = gx.options();
    row_k = at::zeros({ti}, f64); row_l = at::zeros({ti}, f64);
    col_k = at::zeros({tj}, f64); col_l = at::zeros({tj}, f64); sums = at::zeros({3}, f64);
    pgx = gx.data_ptr<double>(); pgy = gy.data_ptr<double>();
    pxi = nxi.data_ptr<double>(); pxj = nxj.data_ptr<double>();
    pyi = nyi.data_ptr<double>(); pyj = nyj.data_ptr<double>();
  }
  // the kernel values of element (r, c) of the X and the Y tile
  void element(int64_t r, int64_t c, double& k, double& l) const {
    const bool self = diagonal && r == c;
    k = rbf_from_gram(pgx[r * tj + c], pxi[r], pxj[c], gamma_x, self);
    l = rbf_from_gram(pgy[r * tj + c], pyi[r], pyj[c], gamma_y, self);
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> result() const {
    return {row_k, col_k, row_l, col_l, sums};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cka_rbf_tile_cpu(
    const at::Tensor& gx, const at::Tensor& gy, const at::Tensor& nxi, const at::Tensor& nxj,
    const at::Tensor& nyi, const at::Tensor& nyj, double gamma_x, double gamma_y, bool diagonal) {
  const RbfTile t(gx, gy, nxi, nxj, nyi, nyj, gamma_x, gamma_y, diagonal);
  rbf_tile_loop(t.ti, t.tj, [&](int64_t r, int64_t c, double& k, double& l) { t.element(r, c, k, l); },
                t.row_k.data_ptr<double>(), t.row_l.data_ptr<double>(), t.col_k.data_ptr<double>(),
                t.col_l.data_ptr<double>(), t.sums.data_ptr<double>());
  return t.result();
}

// The CUDA launch grid of cka_rbf_tile_kernel on the CPU: 2-D blocks of (block x block) threads, one tile
// element each, calling rbf_from_gram; the kernel's atomic adds become plain adds in block order.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cka_rbf_tile_grid_cpu(
    const at::Tensor& gx, const at::Tensor& gy, const at::Tensor& nxi, const at::Tensor& nxj,
    const at::Tensor& nyi, const at::Tensor& nyj, double gamma_x, double gamma_y, bool diagonal, int64_t block) {
  const RbfTile t(gx, gy, nxi, nxj, nyi, nyj, gamma_x, gamma_y, diagonal);
  const int64_t ti = t.ti, tj = t.tj;
  double *rk = t.row_k.data_ptr<double>(), *rl = t.row_l.data_ptr<double>(), *ck = t.col_k.data_ptr<double>(),
         *cl = t.col_l.data_ptr<double>(), *sm = t.sums.data_ptr<double>();
  for (int64_t by = 0; by < (ti + block - 1) / block; ++by)
    for (int64_t bx = 0; bx < (tj + block - 1) / block; ++bx)
      for (int64_t ty = 0; ty < block; ++ty)
        for (int64_t tx = 0; tx < block; ++tx) {
          const int64_t r = by * block + ty, c = bx * block + tx;  // as in the kernel: blockIdx * blockDim + threadIdx
          if (r >= ti || c >= tj) continue;
          double k, l;
          t.element(r, c, k, l);
          rk[r] += k; rl[r] += l; ck[c] += k; cl[c] += l;
          sm[0] += k * l; sm[1] += k * k; sm[2] += l * l;
        }
  return t.result();
}

// The kernel values themselves: k = exp(-gamma max(ni + nj - 2 g, 0)) element by element, 1 on the diagonal
// of a diagonal tile, for callers that combine many kernels' tiles (geometry.similarity_matrices).
at::Tensor rbf_kernel_tile_cpu(const at::Tensor& g_, const at::Tensor& ni_, const at::Tensor& nj_, double gamma,
                               bool diagonal) {
  rbf_check_kernel_tile(g_, ni_, nj_);
  const auto g = g_.contiguous(), ni = ni_.contiguous(), nj = nj_.contiguous();
  const int64_t ti = g.size(0), tj = g.size(1);
  auto k = at::empty({ti, tj}, g.options());
  const double *gp = g.data_ptr<double>(), *a = ni.data_ptr<double>(), *b = nj.data_ptr<double>();
  double* kp = k.data_ptr<double>();
#pragma omp parallel for schedule(static) if (ti * tj > 16384)
  for (int64_t r = 0; r < ti; ++r)
    for (int64_t c = 0; c < tj; ++c)
      kp[r * tj + c] = rbf_from_gram(gp[r * tj + c], a[r], b[c], gamma, diagonal && r == c);
  return k;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metalign_ops, m) {
  // Moments of one row chunk for streaming CKA, all float64:
  //   xx = Xs'Xs (d1, d1), yy = Ys'Ys (d2, d2), xy = Xs'Ys (d1, d2),
  //   vx = [sum_i xs_i, sum_i q_i xs_i, sum_i p_i xs_i] (3, d1),
  //   vy = [sum_i ys_i, sum_i p_i ys_i, sum_i q_i ys_i] (3, d2),
  //   s  = [m, sum p, sum q, sum p*q, sum p^2, sum q^2] (6,)
  // where Xs = X - shift_x, Ys = Y - shift_y, p_i = |xs_i|^2, q_i = |ys_i|^2.
  m.def("cka_moments(Tensor x, Tensor y, Tensor shift_x, Tensor shift_y) -> "
        "(Tensor xx, Tensor yy, Tensor xy, Tensor vx, Tensor vy, Tensor s)");
  // Shifted rows and their squared norms: (x - shift, |x - shift|^2 per row); the building block of
  // cka_moments on both devices.
  m.def("cka_shift_rows(Tensor x, Tensor shift) -> (Tensor xs, Tensor sq)");
  // CPU emulation of the CUDA launch grid of cka_shift_rows (one block per row, `threads` threads per
  // block, shared-memory tree reduction), calling the same __host__ __device__ functions.
  m.def("cka_shift_rows_grid(Tensor x, Tensor shift, int threads) -> (Tensor xs, Tensor sq)");
  // RBF CKA from one pair of Gram tiles gx = Xi Xj', gy = Yi Yj' (float64, (ti, tj)) and squared row norms:
  // k = exp(-gamma_x d2), l = exp(-gamma_y d2) element by element (never stored), returning row and column
  // sums of the K and L tiles and [sum k l, sum k^2, sum l^2]; `diagonal` marks a tile on the diagonal
  // (element (r, r) is a point with itself: distance 0).
  m.def("cka_rbf_tile(Tensor gx, Tensor gy, Tensor nxi, Tensor nxj, Tensor nyi, Tensor nyj, float gamma_x, "
        "float gamma_y, bool diagonal) -> (Tensor row_k, Tensor col_k, Tensor row_l, Tensor col_l, Tensor sums)");
  m.def("cka_rbf_tile_grid(Tensor gx, Tensor gy, Tensor nxi, Tensor nxj, Tensor nyi, Tensor nyj, float gamma_x, "
        "float gamma_y, bool diagonal, int block) -> (Tensor row_k, Tensor col_k, Tensor row_l, Tensor col_l, "
        "Tensor sums)");
  // One RBF kernel tile from its Gram tile g = Ai Aj' (float64, (ti, tj)) and squared row norms ni, nj:
  // k = exp(-gamma d2), d2 = max(ni + nj - 2 g, 0) (0 on the diagonal of a `diagonal` tile) -> (ti, tj) float64.
  m.def("rbf_kernel_tile(Tensor g, Tensor ni, Tensor nj, float gamma, bool diagonal) -> Tensor");
}

TORCH_LIBRARY_IMPL(metalign_ops, CPU, m) {
  m.impl("cka_moments", &cka_moments_cpu);
  m.impl("cka_shift_rows", &cka_shift_rows_cpu);
  m.impl("cka_shift_rows_grid", &cka_shift_rows_grid_cpu);
  m.impl("cka_rbf_tile", &cka_rbf_tile_cpu);
  m.impl("cka_rbf_tile_grid", &cka_rbf_tile_grid_cpu);
  m.impl("rbf_kernel_tile", &rbf_kernel_tile_cpu);
}

}  // namespace metalign

// CPU (C++/OpenMP) implementation of the fused SAE top-k encode:
//   values, indices = top-k over latents of relu((x - b_pre) @ W_enc + b_enc), per row,
// sorted by value (descending), ties to the lower latent index, never storing the (n, n_latents)
// pre-activations. Schema, CPU kernel and the CPU emulation of the CUDA launch grid live here.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "checks.h"
#include "topk_kernel.h"

namespace metalign {

void topk_check_args(const at::Tensor& x, const at::Tensor& W, const at::Tensor& b, int64_t k,
                     const c10::optional<at::Tensor>& b_pre) {
  TORCH_CHECK(x.dim() == 2, "topk_encode: x must be 2-D (n_rows, d), got shape ", x.sizes());
  TORCH_CHECK(W.dim() == 2, "topk_encode: W_enc must be 2-D (d, n_latents), got shape ", W.sizes());
  TORCH_CHECK(x.is_floating_point() && W.is_floating_point() && b.is_floating_point(),
              "topk_encode: x, W_enc and b_enc must be floating point, got ", x.scalar_type(), ", ",
              W.scalar_type(), ", ", b.scalar_type());
  TORCH_CHECK(W.size(0) == x.size(1), "topk_encode: W_enc must have d = ", x.size(1),
              " rows (the columns of x), got shape ", W.sizes());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == W.size(1), "topk_encode: b_enc must be 1-D of length n_latents = ",
              W.size(1), ", got shape ", b.sizes());
  TORCH_CHECK(k >= 1 && k <= W.size(1), "topk_encode: k must be in 1..n_latents = ", W.size(1), ", got ", k);
  if (b_pre.has_value()) {
    TORCH_CHECK(b_pre->dim() == 1 && b_pre->size(0) == x.size(1), "topk_encode: b_pre must be 1-D of length d = ",
                x.size(1), ", got shape ", b_pre->sizes());
    TORCH_CHECK(b_pre->is_floating_point(), "topk_encode: b_pre must be floating point, got ", b_pre->scalar_type());
  }
  TORCH_CHECK(W.device() == x.device() && b.device() == x.device() &&
                  (!b_pre.has_value() || b_pre->device() == x.device()),
              "topk_encode: x, W_enc, b_enc and b_pre must be on one device");
}

namespace {

// Tile sizes of the CPU path. Each thread owns blocks of kBlockRows rows and walks the latents in tiles of
// kTileLatents columns: the (rows x latents) pre-activation tile (512 x 512 float32 = 1 MiB) stays in the
// thread's L2 while its top-k lists are updated; W_enc is streamed once per row block, so a taller block
// means fewer passes over W (each pass is d * n_latents values) and a bigger tile means fewer BLAS calls.
// METALIGN_TOPK_ROWS / METALIGN_TOPK_TILE override them (tuning on other machines).
constexpr int64_t kBlockRows = 512;
constexpr int64_t kTileLatents = 512;
constexpr int64_t kScanChunk = 32;  // columns tested at once against the row's threshold (vectorised OR)

int64_t env_or(const char* name, int64_t dflt) {
  const char* s = std::getenv(name);
  return s ? std::atoll(s) : dflt;
}

at::ScalarType compute_dtype(const at::Tensor& x, const at::Tensor& W, const at::Tensor& b,
                             const c10::optional<at::Tensor>& b_pre) {
  bool dbl = x.scalar_type() == at::kDouble || W.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble ||
             (b_pre.has_value() && b_pre->scalar_type() == at::kDouble);
  return dbl ? at::kDouble : at::kFloat;
}

// W_enc in the compute dtype with one unit stride (row- or column-major), so every tile is a plain BLAS call.
at::Tensor blas_ready(const at::Tensor& W, at::ScalarType ct) {
  auto w = W.to(ct);
  return (w.stride(0) == 1 || w.stride(1) == 1) ? w : w.contiguous();
}

// Rows r0..r0+rows of x (any float dtype, any strides) minus b_pre, into a contiguous (rows, d) buffer.
template <typename C>
void load_rows(const at::Tensor& x, int64_t r0, int64_t rows, const C* bp, C* dst) {
  const int64_t d = x.size(1), rs = x.stride(0), cs = x.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_load_rows", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>() + r0 * rs;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t e = 0; e < d; ++e)
        dst[r * d + e] = static_cast<C>(xp[r * rs + e * cs]) - (bp ? bp[e] : C(0));
  });
}

// Bias + ReLU + running top-k over one (rows, cols) pre-activation tile whose first column is latent j0.
// Most values fall below the row's threshold once its list is full, so a chunk of columns is first tested
// with a branch-free OR and only chunks holding a candidate are walked one by one. The OR test vectorises
// only with AVX2 (the baseline x86-64 build leaves it scalar: 2.2-2.7x slower on 512 x 12,288 tiles, which
// made the scan ~20% of the op), so the function is also compiled for AVX2, picked at load time (GCC ifunc).
template <typename C>
__attribute__((target_clones("avx2", "default")))
void update_tile(const C* tile, int64_t ldt, int64_t rows, int64_t cols, int64_t j0, const C* b, C* vals,
                 int64_t* idx, int64_t* counts, int64_t k) {
  for (int64_t r = 0; r < rows; ++r) {
    C* rv = vals + r * k;
    int64_t* ri = idx + r * k;
    int64_t cnt = counts[r];
    C thr = topk_threshold(rv, cnt, k);
    const C* t = tile + r * ldt;
    for (int64_t c0 = 0; c0 < cols; c0 += kScanChunk) {
      const int64_t c1 = std::min(c0 + kScanChunk, cols);
      int hit = 0;
      for (int64_t c = c0; c < c1; ++c) hit |= (topk_relu_bias(t[c], b[j0 + c]) > thr);
      if (!hit) continue;
      for (int64_t c = c0; c < c1; ++c) {
        const C v = topk_relu_bias(t[c], b[j0 + c]);
        if (v > thr) {
          cnt = topk_insert(rv, ri, cnt, k, v, j0 + c);
          thr = topk_threshold(rv, cnt, k);
        }
      }
    }
    counts[r] = cnt;
  }
}

// The CPU kernel proper (outside AT_DISPATCH: OpenMP pragmas cannot sit inside a macro argument).
template <typename C>
void topk_encode_impl(const at::Tensor& x, const at::Tensor& W, const at::Tensor& b, const at::Tensor& bp,
                      int64_t k, at::Tensor& values, at::Tensor& indices) {
  const int64_t n = x.size(0), d = x.size(1), L = W.size(1);
  const auto ct = values.scalar_type();
  int64_t R = env_or("METALIGN_TOPK_ROWS", kBlockRows), T = std::min(env_or("METALIGN_TOPK_TILE", kTileLatents), L);
  int n_threads = 1;
#ifdef _OPENMP
  n_threads = omp_get_max_threads();
#endif
  const C* bptr = b.data_ptr<C>();
  const C* bpp = bp.defined() ? bp.data_ptr<C>() : nullptr;
  C* vp = values.data_ptr<C>();
  int64_t* ip = indices.data_ptr<int64_t>();
  // Every thread takes whole row blocks (dynamic schedule: robust when cores are shared) and calls BLAS on
  // its own tiles; inside the parallel region MKL/OpenBLAS run single-threaded, so threads never wait on
  // each other. (A multi-threaded GEMM per tile followed by a parallel top-k update was tried: it needs two
  // barriers per tile and measured up to 2x slower than this while another process held a core.)
  R = std::max<int64_t>(1, std::min(R, (n + n_threads - 1) / n_threads));
  const int64_t n_blocks = (n + R - 1) / R;
  std::exception_ptr error = nullptr;  // an exception must not leave an OpenMP region: kept, rethrown after
#pragma omp parallel num_threads(n_threads)
  {
    auto xb = at::empty({R, d}, x.options().dtype(ct));
    auto tile = at::empty({R, T}, x.options().dtype(ct));
    std::vector<int64_t> counts(R);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      try {
      const int64_t r0 = blk * R, rows = std::min(R, n - r0);
      load_rows<C>(x, r0, rows, bpp, xb.data_ptr<C>());
      std::fill(counts.begin(), counts.end(), 0);
      auto xr = xb.narrow(0, 0, rows);
      for (int64_t j0 = 0; j0 < L; j0 += T) {
        const int64_t cols = std::min(T, L - j0);
        auto t = tile.narrow(0, 0, rows).narrow(1, 0, cols);
        at::mm_out(t, xr, W.narrow(1, j0, cols));
        update_tile<C>(tile.data_ptr<C>(), T, rows, cols, j0, bptr, vp + r0 * k, ip + r0 * k, counts.data(), k);
      }
      } catch (...) {
#pragma omp critical(metalign_topk_error)
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

std::tuple<at::Tensor, at::Tensor> topk_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc,
                                                   const at::Tensor& b_enc, int64_t k,
                                                   const c10::optional<at::Tensor>& b_pre) {
  topk_check_args(x, W_enc, b_enc, k, b_pre);
  const auto ct = compute_dtype(x, W_enc, b_enc, b_pre);
  const int64_t n = x.size(0), k_ = k;
  // detached: the worker threads' BLAS calls write into buffers (out= ops), which autograd refuses for
  // inputs that require grad; the op has no backward anyway (codes are read-outs, not trained through)
  auto W = blas_ready(W_enc.detach(), ct);
  auto b = b_enc.detach().to(ct).contiguous();
  auto bp = b_pre.has_value() ? b_pre->detach().to(ct).contiguous() : at::Tensor();
  auto values = at::empty({n, k_}, x.options().dtype(ct));
  auto indices = at::empty({n, k_}, x.options().dtype(at::kLong));
  if (n == 0) return {values, indices};
  auto xd = x.detach();
  AT_DISPATCH_FLOATING_TYPES(ct, "topk_encode_cpu", [&] {
    topk_encode_impl<scalar_t>(xd, W, b, bp, k, values, indices);
  });
  return {values, indices};
}

// Runs the CUDA launch grid of topk_encode_kernel (csrc/topk_cuda.cu) on the CPU with the same
// __host__ __device__ functions: block = rows_per_block rows held in "shared memory"; per latent tile,
// thread t computes the post-activation of latent j0 + t for each of the block's rows into the candidate
// buffer; then thread r < rows merges row r's candidates, in latent order, into its top-k list.
std::tuple<at::Tensor, at::Tensor> topk_encode_grid_cpu(const at::Tensor& x, const at::Tensor& W_enc,
                                                        const at::Tensor& b_enc, int64_t k,
                                                        const c10::optional<at::Tensor>& b_pre,
                                                        int64_t rows_per_block, int64_t threads) {
  topk_check_args(x, W_enc, b_enc, k, b_pre);
  TORCH_CHECK(rows_per_block >= 1 && threads >= rows_per_block, "topk_encode_grid: need 1 <= rows_per_block <= ",
              "threads, got rows_per_block = ", rows_per_block, ", threads = ", threads);
  const auto ct = compute_dtype(x, W_enc, b_enc, b_pre);
  const int64_t n = x.size(0), d = x.size(1), L = W_enc.size(1);
  auto W = W_enc.detach().to(ct);  // any strides: the kernel indexes W by its strides
  auto b = b_enc.detach().to(ct).contiguous();
  auto bp = b_pre.has_value() ? b_pre->detach().to(ct).contiguous() : at::Tensor();
  auto values = at::empty({n, k}, x.options().dtype(ct));
  auto indices = at::empty({n, k}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(ct, "topk_encode_grid", [&] {
    using C = scalar_t;
    const C* wp = W.data_ptr<C>();
    const C* bptr = b.data_ptr<C>();
    std::vector<C> xs(rows_per_block * d), cand(rows_per_block * threads);
    std::vector<int64_t> counts(rows_per_block);
    const int64_t n_blocks = (n + rows_per_block - 1) / rows_per_block;
    for (int64_t block = 0; block < n_blocks; ++block) {
      const int64_t row0 = block * rows_per_block, rows = std::min(rows_per_block, n - row0);
      load_rows<C>(x, row0, rows, bp.defined() ? bp.data_ptr<C>() : nullptr, xs.data());
      std::fill(counts.begin(), counts.end(), 0);
      C* vals = values.data_ptr<C>() + row0 * k;
      int64_t* idx = indices.data_ptr<int64_t>() + row0 * k;
      for (int64_t j0 = 0; j0 < L; j0 += threads) {
        for (int64_t t = 0; t < threads; ++t)  // the threads of the block, then __syncthreads
          for (int64_t r = 0; r < rows; ++r)
            cand[r * threads + t] = j0 + t < L ? topk_relu_bias(topk_dot_column(xs.data() + r * d, wp, W.stride(0),
                                                                                W.stride(1), d, j0 + t),
                                                                bptr[j0 + t])
                                               : C(-1);
        for (int64_t r = 0; r < rows; ++r)  // thread r merges row r, then __syncthreads
          for (int64_t t = 0; t < threads && j0 + t < L; ++t)
            counts[r] = topk_insert(vals + r * k, idx + r * k, counts[r], k, cand[r * threads + t], j0 + t);
      }
    }
  });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metalign_ops, m) {
  // Fused SAE top-k encode: per row of x (n, d), the k largest of relu((x - b_pre) @ W_enc + b_enc) over
  // the n_latents columns of W_enc (d, n_latents) -> values (n, k) float32|64 sorted descending, indices
  // (n, k) int64; ties go to the lower latent index. The (n, n_latents) pre-activations are never stored.
  m.def("topk_encode(Tensor x, Tensor W_enc, Tensor b_enc, int k, Tensor? b_pre=None) -> "
        "(Tensor values, Tensor indices)");
  // CPU emulation of the CUDA launch grid of topk_encode (rows_per_block rows per block, `threads`
  // threads), calling the same __host__ __device__ functions.
  m.def("topk_encode_grid(Tensor x, Tensor W_enc, Tensor b_enc, int k, Tensor? b_pre, int rows_per_block, "
        "int threads) -> (Tensor values, Tensor indices)");
}

TORCH_LIBRARY_IMPL(metalign_ops, CPU, m) {
  m.impl("topk_encode", &topk_encode_cpu);
  m.impl("topk_encode_grid", &topk_encode_grid_cpu);
}

}  // namespace metalign

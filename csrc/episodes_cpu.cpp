// CPU (C++/OpenMP) implementation of the fused episode-construction op (see csrc/episodes_kernel.h for
// the sampling and the RNG contract; kernels.episodes for the Python entry point).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "checks.h"
#include "episodes_kernel.h"
#include "hugepage.h"

namespace metalign {

// Shared by the CPU, CUDA and grid ops (csrc/checks.h): every shape, dtype and device assumption. The CSR
// contents are checked by ep_check_* (csrc/episodes_kernel.h) on each device and reported by episodes_csr_raise.
void episodes_check(const at::Tensor& features, const at::Tensor& pos_ptr, const at::Tensor& pos_idx,
                    const at::Tensor& pos_val, const at::Tensor& neg_ptr, const at::Tensor& neg_idx,
                    const at::Tensor& neg_val, const at::Tensor& mag_scale, int64_t n_episodes, int64_t length) {
  TORCH_CHECK(features.dim() == 2, "features must be 2-D (n_rows, d), got ", features.sizes());
  TORCH_CHECK(features.is_floating_point(), "features must be floating point, got ", features.scalar_type());
  TORCH_CHECK(n_episodes >= 0, "n_episodes must be >= 0, got ", n_episodes);
  TORCH_CHECK(length >= 1, "length (L) must be >= 1, got ", length);
  TORCH_CHECK(pos_ptr.dim() == 1 && pos_ptr.size(0) >= 2 && pos_ptr.scalar_type() == at::kLong,
              "pos_ptr must be 1-D int64 of length n_functions + 1 >= 2, got ", pos_ptr.sizes(), " ",
              pos_ptr.scalar_type());
  const int64_t F = pos_ptr.size(0) - 1;
  TORCH_CHECK(pos_idx.dim() == 1 && pos_idx.scalar_type() == at::kLong, "pos_idx must be 1-D int64, got ",
              pos_idx.sizes(), " ", pos_idx.scalar_type());
  TORCH_CHECK(pos_val.dim() == 1 && pos_val.size(0) == pos_idx.size(0), "pos_val must be 1-D of length ",
              pos_idx.size(0), " (pos_idx), got ", pos_val.sizes());
  TORCH_CHECK(pos_val.is_floating_point(), "pos_val must be floating point, got ", pos_val.scalar_type());
  TORCH_CHECK(mag_scale.dim() == 1 && mag_scale.size(0) == F, "mag_scale must be 1-D of length ", F,
              " (n_functions), got ", mag_scale.sizes());
  TORCH_CHECK(pos_val.scalar_type() == mag_scale.scalar_type(), "pos_val and mag_scale must share a dtype, got ",
              pos_val.scalar_type(), " and ", mag_scale.scalar_type());
  const bool has_neg = neg_ptr.numel() > 0;
  if (has_neg) {
    TORCH_CHECK(neg_ptr.dim() == 1 && neg_ptr.size(0) == F + 1 && neg_ptr.scalar_type() == at::kLong,
                "neg_ptr must be empty (negatives = complement of the positives) or 1-D int64 of length ", F + 1,
                ", got ", neg_ptr.sizes(), " ", neg_ptr.scalar_type());
    TORCH_CHECK(neg_idx.dim() == 1 && neg_idx.scalar_type() == at::kLong, "neg_idx must be 1-D int64");
    TORCH_CHECK(neg_val.dim() == 1 && neg_val.size(0) == neg_idx.size(0) &&
                neg_val.scalar_type() == pos_val.scalar_type(),
                "neg_val must be 1-D of length ", neg_idx.size(0), " with the dtype of pos_val");
  }
  for (const at::Tensor* t : {&pos_ptr, &pos_idx, &pos_val, &neg_ptr, &neg_idx, &neg_val, &mag_scale})
    TORCH_CHECK(t->numel() == 0 || t->device() == features.device(),
                "the function tensors must be on the device of features (", features.device(), ")");
}

void episodes_csr_raise(uint64_t key, const at::Tensor& features, const at::Tensor& pos_ptr,
                        const at::Tensor& pos_idx, const at::Tensor& neg_ptr, const at::Tensor& neg_idx,
                        int64_t length) {
  if (key == kEpValid) return;
  const int64_t list = static_cast<int64_t>(key >> 62), stage = static_cast<int64_t>((key >> 60) & 3);
  const int64_t f = static_cast<int64_t>((key & ((uint64_t(1) << 60) - 1)) >> 1), sub = static_cast<int64_t>(key & 1);
  const bool has_neg = neg_ptr.numel() > 0, complement = list == 1 && !has_neg;
  const at::Tensor& ptr = list == 1 && has_neg ? neg_ptr : pos_ptr;
  const at::Tensor& idx = list == 1 && has_neg ? neg_idx : pos_idx;
  const char* name = list == 1 && has_neg ? "neg" : "pos";
  auto at_ = [&](int64_t i) { return ptr.select(0, i).item<int64_t>(); };  // any device: error path only
  const int64_t F = ptr.size(0) - 1, n = features.size(0);
  TORCH_CHECK(stage != 0, name, "_ptr must start at 0 and end at ", idx.size(0), " (the length of ", name,
              "_idx), got ", at_(0), " .. ", at_(F));
  TORCH_CHECK(!(stage == 1 && sub == 0), name, "_ptr must be non-decreasing (function ", f, ")");
  if (stage == 1) {
    const int64_t c = at_(f + 1) - at_(f);
    const char* what = complement ? "negatives (rows not positive)" : (list == 0 ? "positives" : "negatives");
    TORCH_CHECK(false, "function ", f, " has ", complement ? n - c : c, " ", what,
                ", fewer than the episode length L = ", length, "; drop it (raise --min-nonzero) or shorten L");
  }
  TORCH_CHECK(false, name, "_idx of function ", f, " must be strictly increasing row indices in [0, ", n, ")");
}

namespace {

// The smallest validation key of one CSR list on the CPU (same checks and keys as the CUDA kernel).
uint64_t csr_key_cpu(const at::Tensor& ptr_, const at::Tensor& idx_, int64_t n, int64_t L, bool complement,
                     int64_t list) {
  const at::Tensor ptr = ptr_.contiguous(), idx = idx_.contiguous();
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t* ix = idx.data_ptr<int64_t>();
  const int64_t F = ptr.size(0) - 1;
  uint64_t key = ep_check_ends(p, F, idx.size(0), list);
  for (int64_t f = 0; f < F && key == kEpValid; ++f) key = ep_check_function(p, f, n, L, complement, list);
  if (key != kEpValid || complement) return key;  // pointers bad: the index loop below would leave the list
#pragma omp parallel for schedule(static) reduction(min : key)
  for (int64_t f = 0; f < F; ++f)
    for (int64_t q = p[f]; q < p[f + 1]; ++q)
      if (!ep_entry_ok(ix, q, p[f], n)) {
        key = std::min(key, ep_error_key(list, 2, f, 0));
        break;
      }
  return key;
}

// The CSR contents of CPU tensors, with the messages of csrc/checks.h episodes_csr_raise.
void episodes_check_csr_cpu(const at::Tensor& features, const at::Tensor& pos_ptr, const at::Tensor& pos_idx,
                            const at::Tensor& neg_ptr, const at::Tensor& neg_idx, int64_t L) {
  const int64_t n = features.size(0);
  const bool has_neg = neg_ptr.numel() > 0;
  uint64_t key = csr_key_cpu(pos_ptr, pos_idx, n, L, false, 0);
  if (key == kEpValid)
    key = has_neg ? csr_key_cpu(neg_ptr, neg_idx, n, L, false, 1) : csr_key_cpu(pos_ptr, pos_idx, n, L, true, 1);
  episodes_csr_raise(key, features, pos_ptr, pos_idx, neg_ptr, neg_idx, L);
}

}  // namespace

namespace {

using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Out alloc(const at::Tensor& features, int64_t B, int64_t L) {
  auto o = features.options();
  return {at::empty({B, L, features.size(1) + 1}, o), at::empty({B, L}, o), at::empty({B, L}, o),
          at::empty({B}, o.dtype(at::kLong)), at::empty({B, L}, o.dtype(at::kLong))};
}

template <typename T, typename V>
void episodes_loop(uint64_t seed, int64_t F, int64_t n, int64_t d, int64_t B, int64_t L, const T* fp, int64_t rs,
                   int64_t cs, const int64_t* pp, const int64_t* pi, const V* pv, bool has_neg, const int64_t* np,
                   const int64_t* ni, const V* nv, const V* scale, T* xp, T* yp, T* mp, int64_t* fnp, int64_t* rp,
                   int64_t grid_threads, int64_t first) {
  auto sample = [&](int64_t b) {  // output episode b is episode first + b of the seed's stream
    fnp[b] = ep_sample<V, T>(ep_key(seed, first + b), F, n, L, pp, pi, pv, has_neg, np, ni, nv, scale, rp + b * L,
                             yp + b * L, mp + b * L);
  };
  if (grid_threads > 0) {  // the CUDA launch grid, serially: block b samples (thread 0), then every thread writes
    for (int64_t b = 0; b < B; ++b) {
      sample(b);
      for (int64_t t = 0; t < grid_threads; ++t)
        ep_write<T, T>(fp, rs, cs, d, L, rp + b * L, mp + b * L, xp + b * L * (d + 1), t, grid_threads);
    }
    return;
  }
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t b = 0; b < B; ++b) {
    sample(b);
    const int64_t* r = rp + b * L;
    const T* m = mp + b * L;
    T* xb = xp + b * L * (d + 1);
    for (int64_t t = 0; t < L; ++t) {  // one row copy per item: the output is written once, in order
      T* dst = xb + t * (d + 1);
      dst[0] = t == 0 ? T(0) : m[t - 1];
      const T* src = fp + r[t] * rs;
      if (cs == 1 && t + 1 < L) {  // random rows: fetch the next one while this one is copied
        const char* nxt = reinterpret_cast<const char*>(fp + r[t + 1] * rs);
        for (int64_t o = 0; o < d * int64_t(sizeof(T)); o += 64) __builtin_prefetch(nxt + o, 0, 0);
      }
      if (cs == 1) {
        std::memcpy(dst + 1, src, d * sizeof(T));
      } else {
        for (int64_t k = 0; k < d; ++k) dst[1 + k] = src[k * cs];
      }
    }
  }
}

// grid_threads == 0: the CPU kernel (OpenMP over episodes, row copies); > 0: the CUDA launch grid run
// serially, block b = episode b, thread 0 sampling, then `grid_threads` threads each calling ep_write.
Out episodes_impl(const at::Tensor& features, const at::Tensor& pos_ptr_, const at::Tensor& pos_idx_,
                  const at::Tensor& pos_val_, const at::Tensor& neg_ptr_, const at::Tensor& neg_idx_,
                  const at::Tensor& neg_val_, const at::Tensor& mag_scale_, int64_t B, int64_t L, int64_t seed,
                  int64_t grid_threads, int64_t first) {
  episodes_check(features, pos_ptr_, pos_idx_, pos_val_, neg_ptr_, neg_idx_, neg_val_, mag_scale_, B, L);
  episodes_check_csr_cpu(features, pos_ptr_, pos_idx_, neg_ptr_, neg_idx_, L);
  TORCH_CHECK(first >= 0, "first (index of the first episode) must be >= 0, got ", first);
  auto pos_ptr = pos_ptr_.contiguous(), pos_idx = pos_idx_.contiguous(), pos_val = pos_val_.contiguous();
  auto neg_ptr = neg_ptr_.contiguous(), neg_idx = neg_idx_.contiguous(), neg_val = neg_val_.contiguous();
  auto mag_scale = mag_scale_.contiguous();
  auto [x, y, mag, fn, rows] = alloc(features, B, L);
  if (grid_threads == 0) hugepage_hint(x);
  const bool has_neg = neg_ptr.numel() > 0;
  const int64_t F = pos_ptr.size(0) - 1, n = features.size(0), d = features.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "episodes_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos_val.scalar_type(), "episodes_cpu_val", [&] {
      using V = scalar_t;
      episodes_loop<T, V>(static_cast<uint64_t>(seed), F, n, d, B, L, features.data_ptr<T>(), features.stride(0),
                          features.stride(1), pos_ptr.data_ptr<int64_t>(), pos_idx.data_ptr<int64_t>(),
                          pos_val.data_ptr<V>(), has_neg, has_neg ? neg_ptr.data_ptr<int64_t>() : nullptr,
                          has_neg ? neg_idx.data_ptr<int64_t>() : nullptr, has_neg ? neg_val.data_ptr<V>() : nullptr,
                          mag_scale.data_ptr<V>(), x.data_ptr<T>(), y.data_ptr<T>(), mag.data_ptr<T>(),
                          fn.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), grid_threads, first);
    });
  });
  return {x, y, mag, fn, rows};
}

Out episodes_cpu(const at::Tensor& features, const at::Tensor& pos_ptr, const at::Tensor& pos_idx,
                 const at::Tensor& pos_val, const at::Tensor& neg_ptr, const at::Tensor& neg_idx,
                 const at::Tensor& neg_val, const at::Tensor& mag_scale, int64_t n_episodes, int64_t length,
                 int64_t seed, int64_t first) {
  return episodes_impl(features, pos_ptr, pos_idx, pos_val, neg_ptr, neg_idx, neg_val, mag_scale, n_episodes,
                       length, seed, 0, first);
}

Out episodes_grid_cpu(const at::Tensor& features, const at::Tensor& pos_ptr, const at::Tensor& pos_idx,
                      const at::Tensor& pos_val, const at::Tensor& neg_ptr, const at::Tensor& neg_idx,
                      const at::Tensor& neg_val, const at::Tensor& mag_scale, int64_t n_episodes, int64_t length,
                      int64_t seed, int64_t threads, int64_t first) {
  TORCH_CHECK(threads > 0, "threads must be > 0, got ", threads);
  return episodes_impl(features, pos_ptr, pos_idx, pos_val, neg_ptr, neg_idx, neg_val, mag_scale, n_episodes,
                       length, seed, threads, first);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metalign_ops, m) {
  // B episodes of length L from F binary functions given as CSR lists of positive image rows (pos_ptr
  // (F+1,), pos_idx (nnz,) strictly increasing per function, pos_val (nnz,) magnitudes); negatives are the
  // explicit lists neg_* (same layout) or, when neg_ptr is empty, the complement of the positives with
  // magnitude 0. Returns x (B, L, 1+d) [previous item's magnitude * mag_scale[f], features of the item],
  // y (B, L) 1/0, mag (B, L) magnitude * mag_scale[f], fn (B,) int64 function, rows (B, L) int64 image rows.
  // Output episode b is episode first + b of the seed's stream, so a DDP rank builds only its slice of a batch.
  m.def("episodes(Tensor features, Tensor pos_ptr, Tensor pos_idx, Tensor pos_val, Tensor neg_ptr, "
        "Tensor neg_idx, Tensor neg_val, Tensor mag_scale, int n_episodes, int length, int seed, int first=0) -> "
        "(Tensor x, Tensor y, Tensor mag, Tensor fn, Tensor rows)");
  // CPU emulation of the CUDA launch grid (block = episode, thread 0 samples, `threads` threads write x).
  m.def("episodes_grid(Tensor features, Tensor pos_ptr, Tensor pos_idx, Tensor pos_val, Tensor neg_ptr, "
        "Tensor neg_idx, Tensor neg_val, Tensor mag_scale, int n_episodes, int length, int seed, int threads, "
        "int first=0) -> "
        "(Tensor x, Tensor y, Tensor mag, Tensor fn, Tensor rows)");
}

TORCH_LIBRARY_IMPL(metalign_ops, CPU, m) {
  m.impl("episodes", &episodes_cpu);
  m.impl("episodes_grid", &episodes_grid_cpu);
}

}  // namespace metalign

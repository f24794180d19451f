// Per-episode logic of the fused episode-construction op, shared by the CPU kernel (OpenMP over
// episodes), the CUDA kernel (one block per episode) and the CPU emulation of the CUDA launch grid.
//
// RNG contract (kernels.episodes_ref reproduces it bit for bit in Python integers): episode b has the key
//   key_b = mix(seed ^ mix(b)),   draw i = mix(key_b + i * 0xD1B54A32D192ED03)   (mix = splitmix64 finalizer)
// and consumes draws in this order: 0 the function, 1-2 Box-Muller for n_pos, then n_pos draws for the
// positives and L - n_pos for the negatives (Floyd's sampling without replacement, ranks into the
// function's list), then L - 1 draws for the Fisher-Yates shuffle. Counter-based draws need no state, so
// every episode is independent of thread count and device, and the same seed gives the same batch.
#pragma once
#include <cmath>
#include <cstdint>

#include "hd.h"

namespace metalign {

METALIGN_HD uint64_t ep_mix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

METALIGN_HD uint64_t ep_key(uint64_t seed, int64_t b) { return ep_mix(seed ^ ep_mix(static_cast<uint64_t>(b))); }

METALIGN_HD uint64_t ep_draw(uint64_t key, int64_t i) {
  return ep_mix(key + static_cast<uint64_t>(i) * 0xD1B54A32D192ED03ull);
}

// Uniform integer in [0, m) from a 64-bit draw: the high word of u * m (Lemire), no division.
METALIGN_HD int64_t ep_below(uint64_t u, int64_t m) {
#if defined(__CUDA_ARCH__)
  return static_cast<int64_t>(__umul64hi(u, static_cast<uint64_t>(m)));
#else
  return static_cast<int64_t>((static_cast<unsigned __int128>(u) * static_cast<uint64_t>(m)) >> 64);
#endif
}

// n_pos ~ round(Normal(L/2, L/20)) clamped to [0, L]; round half up (floor(v + 0.5)) on every device.
METALIGN_HD int64_t ep_n_pos(uint64_t key, int64_t L) {
  const double u1 = (static_cast<double>(ep_draw(key, 1) >> 11) + 0.5) * 0x1.0p-53;  // (0, 1)
  const double u2 = static_cast<double>(ep_draw(key, 2) >> 11) * 0x1.0p-53;          // [0, 1)
  const double z = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
  double v = floor(0.5 * L + 0.05 * L * z + 0.5);
  v = v < 0 ? 0 : (v > L ? L : v);
  return static_cast<int64_t>(v);
}

// Row of the rank-th image NOT in the sorted positives P[0..m): rank + #{p : P[p] - p <= rank}
// (P[p] - p is non-decreasing for strictly increasing P, so a binary search finds the count).
METALIGN_HD int64_t ep_complement_row(const int64_t* P, int64_t m, int64_t rank) {
  int64_t lo = 0, hi = m;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (P[mid] - mid <= rank) lo = mid + 1; else hi = mid;
  }
  return rank + lo;
}

// Floyd's algorithm: k distinct ranks of [0, m) into out[0..k), consuming draws first .. first + k - 1.
// Membership is a scan of what is drawn so far (k <= L, a few hundred at most).
METALIGN_HD void ep_floyd(uint64_t key, int64_t first, int64_t k, int64_t m, int64_t* out) {
  for (int64_t c = 0; c < k; ++c) {
    const int64_t j = m - k + c;
    const int64_t t = ep_below(ep_draw(key, first + c), j + 1);
    bool seen = false;
    for (int64_t q = 0; q < c; ++q) seen = seen || (out[q] == t);
    out[c] = seen ? j : t;
  }
}

// Samples one episode into rows[0..L) (int64 image rows), y[0..L) (1 positive / 0 negative) and
// mag[0..L) (magnitude times mag_scale[f]); returns the function f. Negatives come from the explicit list
// neg_idx[neg_ptr[f]..] when has_neg, else from the complement of the positives (magnitude 0).
template <typename V, typename O>
METALIGN_HD int64_t ep_sample(uint64_t key, int64_t n_functions, int64_t n_rows, int64_t L,
                              const int64_t* pos_ptr, const int64_t* pos_idx, const V* pos_val, bool has_neg,
                              const int64_t* neg_ptr, const int64_t* neg_idx, const V* neg_val,
                              const V* mag_scale, int64_t* rows, O* y, O* mag) {
  const int64_t f = ep_below(ep_draw(key, 0), n_functions);
  const int64_t np = ep_n_pos(key, L), nn = L - np;
  const int64_t p0 = pos_ptr[f], pc = pos_ptr[f + 1] - p0;
  const double scale = static_cast<double>(mag_scale[f]);
  ep_floyd(key, 3, np, pc, rows);  // ranks first, replaced in place by rows
  for (int64_t t = 0; t < np; ++t) {
    const int64_t r = rows[t];
    rows[t] = pos_idx[p0 + r];
    y[t] = O(1);
    mag[t] = static_cast<O>(static_cast<double>(pos_val[p0 + r]) * scale);
  }
  const int64_t n0 = has_neg ? neg_ptr[f] : 0;
  const int64_t nc = has_neg ? neg_ptr[f + 1] - n0 : n_rows - pc;
  ep_floyd(key, 3 + np, nn, nc, rows + np);
  for (int64_t t = np; t < L; ++t) {
    const int64_t r = rows[t];
    y[t] = O(0);
    if (has_neg) {
      rows[t] = neg_idx[n0 + r];
      mag[t] = static_cast<O>(static_cast<double>(neg_val[n0 + r]) * scale);
    } else {
      rows[t] = ep_complement_row(pos_idx + p0, pc, r);
      mag[t] = O(0);
    }
  }
  for (int64_t i = L - 1; i > 0; --i) {  // Fisher-Yates, draws 3 + L .. 3 + 2L - 2
    const int64_t j = ep_below(ep_draw(key, 3 + L + (L - 1 - i)), i + 1);
    const int64_t tr = rows[i]; rows[i] = rows[j]; rows[j] = tr;
    const O ty = y[i]; y[i] = y[j]; y[j] = ty;
    const O tm = mag[i]; mag[i] = mag[j]; mag[j] = tm;
  }
  return f;
}

// One thread's share of an episode's model input x (L, 1 + d), elements e = tid, tid + n_threads, ...:
// channel 0 = the previous item's scaled magnitude (0 at t = 0), channels 1.. = the item's features.
template <typename T, typename O>
METALIGN_HD void ep_write(const T* features, int64_t row_stride, int64_t col_stride, int64_t d, int64_t L,
                          const int64_t* rows, const O* mag, O* x, int64_t tid, int64_t n_threads) {
  const int64_t w = d + 1;
  for (int64_t e = tid; e < L * w; e += n_threads) {
    const int64_t t = e / w, k = e - t * w;
    x[e] = k == 0 ? (t == 0 ? O(0) : mag[t - 1]) : static_cast<O>(features[rows[t] * row_stride + (k - 1) * col_stride]);
  }
}

// ---- validation of the CSR function lists (before any episode reads them) -----------------------------------
// Every check returns a key, kEpValid when it passes. The smallest key over all checks is the error reported,
// so the CPU (loops) and the CUDA kernel (one thread per check, atomicMin) report the same error, in the order
// the checks read: the positives' pointers (both ends, then per function: non-decreasing, then the count), the
// positives' row indices, then the same for the explicit negatives, or the counts of the complement.
//   key = list << 62 | stage << 60 | f << 1 | sub   (list 0 positives, 1 negatives; stage 0 ends, 1 per
//   function (sub 0 decreasing pointers, 1 too few members), 2 row indices)
// csrc/checks.h episodes_csr_raise turns a key into its message.
constexpr uint64_t kEpValid = ~uint64_t(0);

METALIGN_HD uint64_t ep_error_key(int64_t list, int64_t stage, int64_t f, int64_t sub) {
  return (static_cast<uint64_t>(list) << 62) | (static_cast<uint64_t>(stage) << 60) |
         (static_cast<uint64_t>(f) << 1) | static_cast<uint64_t>(sub);
}

// ptr[0] == 0 and ptr[F] == nnz (the length of the index list)
METALIGN_HD uint64_t ep_check_ends(const int64_t* ptr, int64_t F, int64_t nnz, int64_t list) {
  return ptr[0] == 0 && ptr[F] == nnz ? kEpValid : ep_error_key(list, 0, 0, 0);
}

// Function f: non-decreasing pointers and at least L members (complement: at least L rows outside its list).
METALIGN_HD uint64_t ep_check_function(const int64_t* ptr, int64_t f, int64_t n_rows, int64_t L, bool complement,
                                       int64_t list) {
  const int64_t c = ptr[f + 1] - ptr[f];
  if (c < 0) return ep_error_key(list, 1, f, 0);
  return (complement ? n_rows - c : c) >= L ? kEpValid : ep_error_key(list, 1, f, 1);
}

// Entry q of the function whose list starts at `first`: a row in [0, n_rows), above the entry before it.
// (q <= first rather than ==: with invalid pointers, first may exceed q, and idx[q - 1] must not be read.)
METALIGN_HD bool ep_entry_ok(const int64_t* idx, int64_t q, int64_t first, int64_t n_rows) {
  return idx[q] >= 0 && idx[q] < n_rows && (q <= first || idx[q] > idx[q - 1]);
}

// The function holding entry q: the largest f in [0, F) with ptr[f] <= q, by bisection (reads ptr[0..F) only,
// so it stays in bounds whatever ptr holds; meaningful once the pointer checks pass).
METALIGN_HD int64_t ep_function_of(const int64_t* ptr, int64_t F, int64_t q) {
  int64_t lo = 0, hi = F - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (ptr[mid] <= q) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace metalign

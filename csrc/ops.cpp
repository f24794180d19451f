// The one operator namespace of metalign. Schemas live here; CPU and CUDA implementations register
// themselves in their own files with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

TORCH_LIBRARY(metalign_ops, m) {
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
}

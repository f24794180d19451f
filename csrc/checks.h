// Host-side argument checks shared by the CPU and the CUDA implementation of each op (defined beside the op's
// CPU kernel, in <op>_cpu.cpp), so that both devices reject bad input with the same messages.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace metalign {

// x (n, d) floating point and shift (d,) on x's device.
void cka_check_pair(const at::Tensor& x, const at::Tensor& shift, const char* xname, const char* sname);
// cka_moments: both pairs, and x, y with the same rows on one device.
void cka_check_moments(const at::Tensor& x, const at::Tensor& y, const at::Tensor& shift_x,
                       const at::Tensor& shift_y);
// cka_rbf_tile: two float64 (ti, tj) Gram tiles and four float64 squared-norm vectors, all on gx's device.
void cka_check_rbf_tile(const at::Tensor& gx, const at::Tensor& gy, const at::Tensor& nxi, const at::Tensor& nxj,
                        const at::Tensor& nyi, const at::Tensor& nyj);
// rbf_kernel_tile: one float64 (ti, tj) Gram tile and its two float64 squared-norm vectors on its device.
void rbf_check_kernel_tile(const at::Tensor& g, const at::Tensor& ni, const at::Tensor& nj);
// topk_encode: x (n, d), W_enc (d, n_latents), b_enc (n_latents,), 1 <= k <= n_latents, b_pre (d,) or none.
void topk_check_args(const at::Tensor& x, const at::Tensor& W, const at::Tensor& b, int64_t k,
                     const c10::optional<at::Tensor>& b_pre);
// fwht: x float32|float64 with a power-of-two last dimension; returns that dimension. `name` prefixes messages.
int64_t fwht_check(const at::Tensor& x, const char* name);
// episodes: every shape, dtype and device assumption (not the CSR contents: episodes_csr_raise).
void episodes_check(const at::Tensor& features, const at::Tensor& pos_ptr, const at::Tensor& pos_idx,
                    const at::Tensor& pos_val, const at::Tensor& neg_ptr, const at::Tensor& neg_idx,
                    const at::Tensor& neg_val, const at::Tensor& mag_scale, int64_t n_episodes, int64_t length);
// episodes: raises the error that a CSR validation key (csrc/episodes_kernel.h, ep_check_*) stands for, reading
// the few pointer values its message quotes from the tensors (on any device); returns if the key is kEpValid.
void episodes_csr_raise(uint64_t key, const at::Tensor& features, const at::Tensor& pos_ptr,
                        const at::Tensor& pos_idx, const at::Tensor& neg_ptr, const at::Tensor& neg_idx,
                        int64_t length);

}  // namespace metalign

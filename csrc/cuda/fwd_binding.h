// kda_ext CUDA: the forward binding's entry for the backward's recompute (no ATen dispatch).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace kda_ext {

using FwdTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor>;

// The forward's intermediates for the backward, in chunk_kda_fwd's output order (o, final_state,
// Aqk, Akk, g_cum, w, u, qg, kg, v_new, h), from the Akk the forward saved: Aqk, L and the
// inverse are not computed again and o is not produced (o, final_state, Aqk and Akk come back
// empty). w, u, qg, kg, g_cum, v_new and h are bit-identical to what the forward would save.
// Akk must be contiguous, [B, T, HV, BT], in q's dtype, on q's device (the backward checked it).
// rstd_qk (optional, [2, B*T, H] fp32 on q's device): receives the l2norm rstd of every q row,
// then every k row, as the recompute used them (with use_qk_l2norm).
FwdTensors chunk_kda_recompute_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
    const at::Tensor& beta, double scale, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& A_log, const std::optional<at::Tensor>& dt_bias,
    const std::optional<at::Tensor>& cu_seqlens, bool use_qk_l2norm, bool use_gate_in_kernel,
    bool use_beta_sigmoid, bool allow_neg_eigval, bool safe_gate,
    std::optional<double> lower_bound, bool state_v_first, int64_t chunk_size,
    const at::Tensor& Akk, float* rstd_qk = nullptr);

}  // namespace kda_ext

// kda_ext CUDA: ATen binding of kda_ext::fused_recurrent_kda_fwd and
// kda_ext::fused_recurrent_kda_inplace (validation, allocation, params; the kernel is launched by
// launch_fused_recurrent.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/binding_common.h"
#include "cuda/fused_recurrent_params.h"
#include "cuda/launch_fused_recurrent.h"

namespace kda_ext {

namespace {

using cuda::dtype_tag;

// Runs the recurrence. `state_in`: the initial state (or pool), dense in its last three dims;
// `state_out`: where the final state goes (undefined: nowhere), by slot when `out_by_slot`.
at::Tensor run_recurrent(const RecurrentDims& d, const at::Tensor& q_in, const at::Tensor& k_in,
                         const at::Tensor& v_in, const at::Tensor& g_in,
                         const at::Tensor& beta_in, double scale, const at::Tensor& state_in,
                         const at::Tensor& state_out, bool out_by_slot,
                         const std::optional<at::Tensor>& A_log,
                         const std::optional<at::Tensor>& dt_bias,
                         const std::optional<at::Tensor>& cu_seqlens,
                         const std::optional<at::Tensor>& ssm_state_indices, bool use_qk_l2norm,
                         bool use_gate_in_kernel, bool use_beta_sigmoid, bool allow_neg_eigval,
                         std::optional<double> lower_bound, bool state_v_first) {
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const at::Tensor g = g_in.contiguous();
  const at::Tensor beta = beta_in.contiguous();
  at::Tensor alog, bias, cu, slots;
  if (use_gate_in_kernel && A_log.has_value()) alog = A_log->to(at::kFloat).contiguous();
  if (use_gate_in_kernel && dt_bias.has_value()) bias = dt_bias->to(at::kFloat).contiguous();
  if (d.varlen) cu = cu_seqlens->contiguous();
  if (d.indexed) slots = ssm_state_indices->contiguous();

  // With cu_seqlens the offsets are not read on the host (that would be a sync); the kernel
  // clamps them, and tokens no sequence covers must read as zero, not uninitialised memory.
  at::Tensor o = d.varlen ? at::zeros({d.B, d.T, d.HV, d.V}, q.options())
                          : at::empty({d.B, d.T, d.HV, d.V}, q.options());

  cuda::FusedRecurrentParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.g = g.data_ptr();
  p.beta = beta.data_ptr();
  p.A_log = alog.defined() ? alog.data_ptr<float>() : nullptr;
  p.dt_bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.cu_seqlens = d.varlen ? cu.data_ptr() : nullptr;
  p.cu_seqlens_int64 = d.varlen ? cu.scalar_type() == at::kLong : true;
  p.slots = d.indexed ? slots.data_ptr() : nullptr;
  p.slots_int64 = d.indexed ? slots.scalar_type() == at::kLong : true;
  p.num_slots = d.P;
  p.state_in = state_in.defined() ? state_in.data_ptr<float>() : nullptr;
  p.state_in_stride = state_in.defined() ? state_in.stride(0) : 0;
  p.state_out = state_out.defined() ? state_out.data_ptr<float>() : nullptr;
  p.state_out_stride = state_out.defined() ? state_out.stride(0) : 0;
  p.out_by_slot = out_by_slot;
  p.o = o.data_ptr();
  p.B = d.B;
  p.T = d.T;
  p.H = d.H;
  p.HV = d.HV;
  p.K = d.K;
  p.V = d.V;
  p.N = d.N;
  p.scale = static_cast<float>(scale);
  p.lower_bound = lower_bound.has_value() ? static_cast<float>(*lower_bound) : 0.f;
  p.dtype = dtype_tag(q, "q");
  p.g_dtype = dtype_tag(g, "g");
  p.beta_dtype = dtype_tag(beta, "beta");
  p.use_qk_l2norm = use_qk_l2norm;
  p.use_gate_in_kernel = use_gate_in_kernel;
  p.use_lower_bound_gate = use_gate_in_kernel && lower_bound.has_value();
  p.use_beta_sigmoid = use_beta_sigmoid;
  p.allow_neg_eigval = allow_neg_eigval;
  p.state_v_first = state_v_first;
  cuda::launch_fused_recurrent_kda(p, c10::cuda::getCurrentCUDAStream().stream());
  return o;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fused_recurrent_kda_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
    const at::Tensor& beta, double scale, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& A_log, const std::optional<at::Tensor>& dt_bias,
    const std::optional<at::Tensor>& cu_seqlens,
    const std::optional<at::Tensor>& ssm_state_indices, bool use_qk_l2norm,
    bool use_gate_in_kernel, bool use_beta_sigmoid, bool allow_neg_eigval,
    std::optional<double> lower_bound, bool state_v_first, bool output_final_state) {
  const RecurrentDims d = check_fused_recurrent_args(
      q, k, v, g, beta, initial_state, A_log, dt_bias, cu_seqlens, ssm_state_indices,
      use_gate_in_kernel, lower_bound, state_v_first, /*inplace=*/false);
  cuda::check_cuda_inputs(q, "fused_recurrent_kda_fwd");
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor state_in;
  if (initial_state.has_value())
    state_in = state_inner_dense(*initial_state) ? *initial_state : initial_state->contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t r = state_v_first ? d.V : d.K, c = state_v_first ? d.K : d.V;
  at::Tensor final_state =
      output_final_state ? at::empty({d.N, d.HV, r, c}, f32) : at::empty({0}, f32);
  at::Tensor o = run_recurrent(d, q, k, v, g, beta, scale, state_in,
                               output_final_state ? final_state : at::Tensor(),
                               /*out_by_slot=*/false, A_log, dt_bias, cu_seqlens,
                               ssm_state_indices, use_qk_l2norm, use_gate_in_kernel,
                               use_beta_sigmoid, allow_neg_eigval, lower_bound, state_v_first);
  return {o, final_state};
}

at::Tensor fused_recurrent_kda_inplace_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
    const at::Tensor& beta, double scale, const at::Tensor& state,
    const std::optional<at::Tensor>& A_log, const std::optional<at::Tensor>& dt_bias,
    const std::optional<at::Tensor>& cu_seqlens,
    const std::optional<at::Tensor>& ssm_state_indices, bool use_qk_l2norm,
    bool use_gate_in_kernel, bool use_beta_sigmoid, bool allow_neg_eigval,
    std::optional<double> lower_bound, bool state_v_first) {
  const RecurrentDims d = check_fused_recurrent_args(
      q, k, v, g, beta, state, A_log, dt_bias, cu_seqlens, ssm_state_indices,
      use_gate_in_kernel, lower_bound, state_v_first, /*inplace=*/true);
  cuda::check_cuda_inputs(q, "fused_recurrent_kda_inplace");
  c10::cuda::CUDAGuard guard(q.device());
  // Each CTA reads its tile of a slot before writing the same tile, and no two CTAs share a
  // tile (sequences name distinct slots: the caller's contract), so in == out is safe.
  return run_recurrent(d, q, k, v, g, beta, scale, state, state, /*out_by_slot=*/true, A_log,
                       dt_bias, cu_seqlens, ssm_state_indices, use_qk_l2norm, use_gate_in_kernel,
                       use_beta_sigmoid, allow_neg_eigval, lower_bound, state_v_first);
}

TORCH_LIBRARY_IMPL(kda_ext, CUDA, m) {
  m.impl("fused_recurrent_kda_fwd", &fused_recurrent_kda_fwd_cuda);
  m.impl("fused_recurrent_kda_inplace", &fused_recurrent_kda_inplace_cuda);
}

}  // namespace kda_ext

// kda_ext CUDA: ATen binding of kda_ext::chunk_kda_fwd (validation, allocation, dispatch).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/binding_common.h"
#include "cuda/fwd_binding.h"
#include "cuda/launch_fwd.h"
#include "cuda/params.h"

namespace kda_ext {

namespace {

using cuda::dtype_tag;

// What the caller wants beyond the op's flags: the op itself uses the defaults; the backward's
// recompute passes the saved Akk and no output.
struct FwdOptions {
  const at::Tensor* Akk_saved = nullptr;
  bool want_output = true;
  float* rstd_qk = nullptr;  // [2, B*T, H] fp32 or null: receives the l2norm rstd of the q/k rows
};

FwdTensors run_forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                       const at::Tensor& g_in, const at::Tensor& beta_in, double scale,
                       const std::optional<at::Tensor>& initial_state,
                       const std::optional<at::Tensor>& A_log,
                       const std::optional<at::Tensor>& dt_bias,
                       const std::optional<at::Tensor>& cu_seqlens, bool use_qk_l2norm,
                       bool use_gate_in_kernel, bool use_beta_sigmoid, bool allow_neg_eigval,
                       bool safe_gate, std::optional<double> lower_bound, bool state_v_first,
                       int64_t chunk_size, bool output_final_state, bool save_intermediates,
                       bool return_states, const FwdOptions& opt) {
  const KdaDims d = check_chunk_kda_args(q_in, k_in, v_in, g_in, beta_in, initial_state, A_log,
                                         dt_bias, cu_seqlens, use_gate_in_kernel, lower_bound,
                                         state_v_first, chunk_size);
  cuda::check_cuda_inputs(q_in, "chunk_kda_fwd");
  c10::cuda::CUDAGuard guard(q_in.device());

  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const at::Tensor g = g_in.contiguous();
  const at::Tensor beta = beta_in.contiguous();
  at::Tensor h0, alog, bias, cu;
  if (initial_state.has_value()) h0 = initial_state->contiguous();
  if (use_gate_in_kernel && A_log.has_value()) alog = A_log->to(at::kFloat).contiguous();
  if (use_gate_in_kernel && dt_bias.has_value()) bias = dt_bias->to(at::kFloat).contiguous();
  if (d.varlen) cu = cu_seqlens->contiguous();

  const auto f32 = q.options().dtype(at::kFloat);
  const auto kdt = k.options();
  const auto vdt = v.options();
  const int64_t B = d.B, T = d.T, HV = d.HV, K = d.K, V = d.V, N = d.N, BT = d.BT, NT = d.NT;

  // Written by the kernels for every row of every real chunk, upper triangles included. With
  // cu_seqlens on the device and no host copy, the offsets are not validated on the host (that
  // would need a sync): tokens no sequence covers then read as zeros rather than uninitialised
  // memory, as the backward's dv/dg do. The fill runs only when the device check finds offsets
  // that do not cover every token exactly once (VarlenFillGuard).
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  std::optional<cuda::VarlenFillGuard> fill_guard;
  if (d.varlen) fill_guard.emplace(cu, N, T, stream);
  const auto alloc = [&](at::IntArrayRef shape, const at::TensorOptions& opt) {
    at::Tensor t = at::empty(shape, opt);
    if (fill_guard) fill_guard->zero_unless_valid(t);
    return t;
  };
  at::Tensor o = opt.want_output ? alloc({B, T, HV, V}, q.options()) : q.new_empty({0});
  const bool reuse_akk = opt.Akk_saved != nullptr;
  if (reuse_akk) {  // the backward validated it already; the kernels also need it contiguous
    check_like(*opt.Akk_saved, "Akk", {B, T, HV, BT}, k.scalar_type(), q);
    TORCH_CHECK(opt.Akk_saved->is_contiguous(), "kda_ext: the saved Akk must be contiguous");
  }
  at::Tensor Aqk = reuse_akk ? k.new_empty({0}) : alloc({B, T, HV, BT}, kdt);
  at::Tensor Akk = reuse_akk ? k.new_empty({0}) : alloc({B, T, HV, BT}, kdt);
  // Workspaces the state pass needs; returned only with save_intermediates.
  at::Tensor g_cum = at::empty({B, T, HV, K}, f32);
  at::Tensor w = at::empty({B, T, HV, K}, kdt);
  at::Tensor u = at::empty({B, T, HV, V}, vdt);
  at::Tensor qg = at::empty({B, T, HV, K}, kdt);
  at::Tensor kg = at::empty({B, T, HV, K}, kdt);
  at::Tensor v_new = save_intermediates ? at::empty({B, T, HV, V}, vdt) : v.new_empty({0});
  const bool want_h = save_intermediates || return_states;
  at::Tensor h;
  if (want_h) {
    const std::vector<int64_t> hs = state_v_first ? std::vector<int64_t>{B, NT, HV, V, K}
                                                  : std::vector<int64_t>{B, NT, HV, K, V};
    // With cu_seqlens the slots past the last real chunk belong to no chunk: zero them here.
    h = d.varlen ? at::zeros(hs, kdt) : at::empty(hs, kdt);
  } else {
    h = k.new_empty({0});
  }
  at::Tensor final_state;
  if (output_final_state) {
    final_state = state_v_first ? at::empty({N, HV, V, K}, f32) : at::empty({N, HV, K, V}, f32);
  } else {
    final_state = q.new_empty({0}, f32);
  }
  at::Tensor offsets;
  if (d.varlen) offsets = at::empty({N + 1}, q.options().dtype(at::kLong));

  cuda::ChunkKdaFwdParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.g = g.data_ptr();
  p.beta = beta.data_ptr();
  p.h0 = h0.defined() ? h0.data_ptr<float>() : nullptr;
  p.A_log = alog.defined() ? alog.data_ptr<float>() : nullptr;
  p.dt_bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.cu_seqlens = d.varlen ? cu.data_ptr() : nullptr;
  p.cu_seqlens_int64 = d.varlen ? cu.scalar_type() == at::kLong : true;
  p.o = opt.want_output ? o.data_ptr() : nullptr;
  p.Akk_saved = reuse_akk ? opt.Akk_saved->data_ptr() : nullptr;
  p.final_state = output_final_state ? final_state.data_ptr<float>() : nullptr;
  p.Aqk = reuse_akk ? nullptr : Aqk.data_ptr();
  p.Akk = reuse_akk ? nullptr : Akk.data_ptr();
  p.g_cum = g_cum.data_ptr<float>();
  p.w = w.data_ptr();
  p.u = u.data_ptr();
  p.qg = qg.data_ptr();
  p.kg = kg.data_ptr();
  p.v_new = save_intermediates ? v_new.data_ptr() : nullptr;
  p.h = want_h ? h.data_ptr() : nullptr;
  p.rstd_qk = opt.rstd_qk;
  p.chunk_offsets = d.varlen ? offsets.data_ptr<int64_t>() : nullptr;
  p.B = B;
  p.T = T;
  p.H = d.H;
  p.HV = HV;
  p.K = K;
  p.V = V;
  p.N = N;
  p.NT = NT;
  p.BT = static_cast<int>(BT);
  p.scale = static_cast<float>(scale);
  p.dtype = dtype_tag(q, "q");
  p.g_dtype = dtype_tag(g, "g");
  p.beta_dtype = dtype_tag(beta, "beta");
  p.varlen = d.varlen;
  p.use_qk_l2norm = use_qk_l2norm;
  p.use_gate_in_kernel = use_gate_in_kernel;
  p.use_lower_bound_gate = use_gate_in_kernel && lower_bound.has_value();
  p.lower_bound = lower_bound.has_value() ? static_cast<float>(*lower_bound) : 0.f;
  p.use_beta_sigmoid = use_beta_sigmoid;
  p.allow_neg_eigval = allow_neg_eigval;
  p.safe_gate = safe_gate;
  p.state_v_first = state_v_first;
  TORCH_CHECK(!p.use_gate_in_kernel || p.use_lower_bound_gate || p.A_log != nullptr,
              "kda_ext: the in-kernel softplus gate needs A_log");

  if (N > 0 && HV > 0) cuda::launch_chunk_kda_fwd(p, stream);

  if (!save_intermediates) {
    g_cum = q.new_empty({0}, f32);
    w = k.new_empty({0});
    u = v.new_empty({0});
    qg = k.new_empty({0});
    kg = k.new_empty({0});
  }
  return {o, final_state, Aqk, Akk, g_cum, w, u, qg, kg, v_new, h};
}

}  // namespace

FwdTensors chunk_kda_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& g, const at::Tensor& beta, double scale,
                              const std::optional<at::Tensor>& initial_state,
                              const std::optional<at::Tensor>& A_log,
                              const std::optional<at::Tensor>& dt_bias,
                              const std::optional<at::Tensor>& cu_seqlens, bool use_qk_l2norm,
                              bool use_gate_in_kernel, bool use_beta_sigmoid,
                              bool allow_neg_eigval, bool safe_gate,
                              std::optional<double> lower_bound, bool state_v_first,
                              int64_t chunk_size, bool output_final_state,
                              bool save_intermediates, bool return_states) {
  return run_forward(q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens,
                     use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval,
                     safe_gate, lower_bound, state_v_first, chunk_size, output_final_state,
                     save_intermediates, return_states, FwdOptions{});
}

FwdTensors chunk_kda_recompute_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
    const at::Tensor& beta, double scale, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& A_log, const std::optional<at::Tensor>& dt_bias,
    const std::optional<at::Tensor>& cu_seqlens, bool use_qk_l2norm, bool use_gate_in_kernel,
    bool use_beta_sigmoid, bool allow_neg_eigval, bool safe_gate,
    std::optional<double> lower_bound, bool state_v_first, int64_t chunk_size,
    const at::Tensor& Akk, float* rstd_qk) {
  FwdOptions opt;
  opt.Akk_saved = &Akk;
  opt.want_output = false;
  opt.rstd_qk = rstd_qk;
  return run_forward(q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens,
                     use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval,
                     safe_gate, lower_bound, state_v_first, chunk_size,
                     /*output_final_state=*/false, /*save_intermediates=*/true,
                     /*return_states=*/false, opt);
}

TORCH_LIBRARY_IMPL(kda_ext, CUDA, m) { m.impl("chunk_kda_fwd", &chunk_kda_fwd_cuda); }

}  // namespace kda_ext

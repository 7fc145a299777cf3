// kda_ext CUDA: ATen binding of kda_ext::chunk_kda_bwd (validation, recompute, allocation, dispatch).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/binding_common.h"
#include "cuda/bwd_launch.cuh"
#include "cuda/bwd_params.cuh"
#include "cuda/fwd_binding.h"

namespace kda_ext {

namespace {

using Tensors8 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor, at::Tensor>;
using OptT = std::optional<at::Tensor>;

using cuda::dtype_tag;


}  // namespace

Tensors8 chunk_kda_bwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const at::Tensor& g_in, const at::Tensor& beta_in, double scale,
                            const OptT& initial_state, const OptT& A_log, const OptT& dt_bias,
                            const OptT& cu_seqlens, const at::Tensor& Aqk_in,
                            const at::Tensor& Akk_in, const OptT& g_cum_in, const OptT& w_in,
                            const OptT& u_in, const OptT& qg_in, const OptT& kg_in,
                            const OptT& v_new_in, const OptT& h_in, const at::Tensor& do_in,
                            const OptT& dht_in, bool use_qk_l2norm, bool use_gate_in_kernel,
                            bool use_beta_sigmoid, bool allow_neg_eigval, bool safe_gate,
                            std::optional<double> lower_bound, bool state_v_first,
                            int64_t chunk_size) {
  const KdaDims d = check_chunk_kda_args(q_in, k_in, v_in, g_in, beta_in, initial_state, A_log,
                                         dt_bias, cu_seqlens, use_gate_in_kernel, lower_bound,
                                         state_v_first, chunk_size);
  cuda::check_cuda_inputs(q_in, "chunk_kda_bwd");
  c10::cuda::CUDAGuard guard(q_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const int64_t B = d.B, T = d.T, H = d.H, HV = d.HV, K = d.K, V = d.V, N = d.N, BT = d.BT,
                NT = d.NT;
  const at::ScalarType io = q_in.scalar_type();
  const int64_t sr = state_v_first ? V : K, sc = state_v_first ? K : V;

  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const at::Tensor g = g_in.contiguous();
  const at::Tensor beta = beta_in.contiguous();
  check_like(Aqk_in, "Aqk", {B, T, HV, BT}, io, q);
  check_like(Akk_in, "Akk", {B, T, HV, BT}, io, q);
  const at::Tensor Aqk = Aqk_in.contiguous();
  const at::Tensor Akk = Akk_in.contiguous();
  TORCH_CHECK(do_in.sizes() == at::IntArrayRef({B, T, HV, V}), "kda_ext: do must have shape [",
              B, ", ", T, ", ", HV, ", ", V, "], got ", do_in.sizes());
  check_same_device(q, do_in, "do");
  const at::Tensor dout = do_in.to(io).contiguous();
  at::Tensor dht;
  if (dht_in.has_value()) {
    TORCH_CHECK(dht_in->sizes() == at::IntArrayRef({N, HV, sr, sc}),
                "kda_ext: dht must have the final state's shape [", N, ", ", HV, ", ", sr, ", ",
                sc, "], got ", dht_in->sizes());
    check_same_device(q, *dht_in, "dht");
    dht = dht_in->to(at::kFloat).contiguous();
  }
  at::Tensor alog, bias, cu;
  if (use_gate_in_kernel && A_log.has_value()) alog = A_log->contiguous();
  if (use_gate_in_kernel && dt_bias.has_value()) bias = dt_bias->contiguous();
  if (d.varlen) cu = cu_seqlens->contiguous();

  // Forward intermediates: all saved, or none (recomputed here).
  const int given = g_cum_in.has_value() + w_in.has_value() + u_in.has_value() +
                    qg_in.has_value() + kg_in.has_value() + v_new_in.has_value() +
                    h_in.has_value();
  TORCH_CHECK(given == 0 || given == 7,
              "kda_ext: g_cum, w, u, qg, kg, v_new and h must be given together or not at all, "
              "got ", given, " of 7");
  at::Tensor g_cum, w, qg, kg, v_new, h;
  // The l2norm rstd of every q/k row ([2, B*T, H] fp32; rows no chunk covers are never read):
  // handed over by the recompute when it runs, else written by kernel A for kernel C.
  at::Tensor w_rstd;
  if (use_qk_l2norm) w_rstd = at::empty({2 * B * T * H}, q.options().dtype(at::kFloat));
  if (given == 7) {
    check_like(*g_cum_in, "g_cum", {B, T, HV, K}, at::kFloat, q);
    check_like(*w_in, "w", {B, T, HV, K}, io, q);
    check_like(*u_in, "u", {B, T, HV, V}, io, q);
    check_like(*qg_in, "qg", {B, T, HV, K}, io, q);
    check_like(*kg_in, "kg", {B, T, HV, K}, io, q);
    check_like(*v_new_in, "v_new", {B, T, HV, V}, io, q);
    check_like(*h_in, "h", {B, NT, HV, sr, sc}, io, q);
    g_cum = g_cum_in->contiguous();
    w = w_in->contiguous();
    qg = qg_in->contiguous();
    kg = kg_in->contiguous();
    v_new = v_new_in->contiguous();
    h = h_in->contiguous();
  } else {
    // The forward's own kernels, from the saved Akk and without o: bit-identical to what a
    // disable_recompute forward would have saved, at less than the forward's cost.
    auto r = chunk_kda_recompute_cuda(q, k, v, g, beta, scale, initial_state, A_log, dt_bias,
                                      cu_seqlens, use_qk_l2norm, use_gate_in_kernel,
                                      use_beta_sigmoid, allow_neg_eigval, safe_gate, lower_bound,
                                      state_v_first, chunk_size, Akk,
                                      w_rstd.defined() ? w_rstd.data_ptr<float>() : nullptr);
    g_cum = std::get<4>(r).contiguous();
    w = std::get<5>(r).contiguous();
    qg = std::get<7>(r).contiguous();
    kg = std::get<8>(r).contiguous();
    v_new = std::get<9>(r).contiguous();
    h = std::get<10>(r).contiguous();
    TORCH_CHECK(g_cum.sizes() == at::IntArrayRef({B, T, HV, K}) &&
                    g_cum.scalar_type() == at::kFloat && w.numel() == B * T * HV * K &&
                    qg.numel() == B * T * HV * K && kg.numel() == B * T * HV * K &&
                    v_new.numel() == B * T * HV * V && h.numel() == B * NT * HV * K * V &&
                    w.scalar_type() == io && qg.scalar_type() == io && kg.scalar_type() == io &&
                    v_new.scalar_type() == io && h.scalar_type() == io,
                "kda_ext: the forward's recomputed intermediates do not match the backward's "
                "expectations (shapes/dtypes)");
  }

  // Outputs (dq, dk, dv, dg, dbeta are allocated below, right before the stage that writes them).
  // Empty gradients keep the dtype of the argument when it was given (matching the fake).
  const auto f32opt = q.options().dtype(at::kFloat);
  at::Tensor dA_log = alog.defined()    ? at::empty(alog.sizes(), alog.options())
                      : A_log.has_value() ? at::empty({0}, f32opt.dtype(A_log->scalar_type()))
                                          : at::empty({0}, f32opt);
  at::Tensor ddt_bias = bias.defined()      ? at::empty(bias.sizes(), bias.options())
                        : dt_bias.has_value() ? at::empty({0}, f32opt.dtype(dt_bias->scalar_type()))
                                              : at::empty({0}, f32opt);
  at::Tensor dh0 = initial_state.has_value()
                       ? at::empty(initial_state->sizes(), initial_state->options())
                       : at::empty({0}, q.options().dtype(at::kFloat));

  cuda::ChunkKdaBwdParams p;
  p.B = B;
  p.T = T;
  p.H = H;
  p.HV = HV;
  p.K = K;
  p.V = V;
  p.N = N;
  p.NT = NT;
  p.BT = static_cast<int>(BT);
  p.NKS = static_cast<int>((K + cuda::kBwdKSlice - 1) / cuda::kBwdKSlice);
  p.scale = static_cast<float>(scale);
  p.varlen = d.varlen;
  p.use_qk_l2norm = use_qk_l2norm;
  p.use_gate_in_kernel = use_gate_in_kernel;
  p.use_lower_bound_gate = lower_bound.has_value();
  p.lower_bound = lower_bound.has_value() ? static_cast<float>(*lower_bound) : 0.f;
  p.use_beta_sigmoid = use_beta_sigmoid;
  p.allow_neg_eigval = allow_neg_eigval;
  p.state_v_first = state_v_first;
  p.dtype = dtype_tag(q, "q");
  p.g_dtype = dtype_tag(g, "g");
  p.beta_dtype = dtype_tag(beta, "beta");

  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.g = g.data_ptr();
  p.beta = beta.data_ptr();
  if (alog.defined()) {
    p.A_log = alog.data_ptr();
    p.a_log_dtype = dtype_tag(alog, "A_log");
    p.dA_log = dA_log.data_ptr();
  }
  if (bias.defined()) {
    p.dt_bias = bias.data_ptr();
    p.dt_bias_dtype = dtype_tag(bias, "dt_bias");
    p.ddt_bias = ddt_bias.data_ptr();
  }
  if (d.varlen) {
    p.cu_seqlens = cu.data_ptr();
    p.cu_seqlens_int64 = cu.scalar_type() == at::kLong;
  }
  p.Aqk = Aqk.data_ptr();
  p.Akk = Akk.data_ptr();
  p.g_cum = g_cum.data_ptr<float>();
  p.w = w.data_ptr();
  p.qg = qg.data_ptr();
  p.kg = kg.data_ptr();
  p.v_new = v_new.data_ptr();
  p.h = h.data_ptr();
  p.dout = dout.data_ptr();
  p.dht = dht.defined() ? dht.data_ptr<float>() : nullptr;
  p.dh0 = initial_state.has_value() ? dh0.data_ptr<float>() : nullptr;

  // Workspaces (float32, except dh and dvn: the dtype of q, i.e. fp16/bf16 rounded copies for
  // half inputs, as FLA stores dh and dv_new; the caching allocator keeps this graph-capturable),
  // each allocated right before the stage that first writes it and released after the last stage
  // that reads it, the recomputed intermediates likewise (see BwdStage for who reads what); on one
  // stream the allocator hands released memory to later stages only after the earlier kernels.
  // Peak at (2, 8192, 32, 128): the sum of everything live at kChunkA instead of the sum of
  // everything. dh (B*NT*HV*K*V) and dvn (B*T*HV*V) are the two largest of those: 256 + 128 MiB
  // in bf16 there, 512 + 256 MiB when they were float32 (2706 MiB peak then).
  // With cu_seqlens, buffers that are read or returned for every token are zero-filled when
  // the device check finds offsets that do not cover every token exactly once (they are not
  // validated on the host: no sync), so that such tokens read as 0, not as garbage
  // (VarlenFillGuard). Without cu_seqlens every token belongs to exactly one chunk and every
  // element is written.
  const cuda::BwdWorkspaceSizes ws = cuda::bwd_workspace_sizes(p);
  const auto f32 = q.options().dtype(at::kFloat);
  std::optional<cuda::VarlenFillGuard> fill_guard;
  if (d.varlen) fill_guard.emplace(cu, N, T, stream);
  auto guarded = [&](at::Tensor t, bool read_per_token) {
    if (read_per_token && fill_guard) fill_guard->zero_unless_valid(t);
    return t;
  };
  auto workspace = [&](int64_t n, bool read_per_token) {
    return guarded(at::empty({n}, f32), read_per_token);
  };
  // dh and dvn, in q's dtype: A and B read only chunks bwd_state wrote (no fill, as before).
  auto workspace_io = [&](int64_t n) { return at::empty({n}, q.options()); };
  auto output = [&](at::IntArrayRef shape, const at::TensorOptions& opt) {
    return guarded(at::empty(shape, opt), true);
  };
  auto run = [&](cuda::BwdStage stage) {
    if (HV > 0) cuda::launch_chunk_kda_bwd_stage(p, stage, stream);
  };

  at::Tensor bounds = at::empty({2 * ws.bounds}, q.options().dtype(at::kLong));
  at::Tensor w_dh = workspace_io(ws.dh);
  at::Tensor w_dvn = workspace_io(ws.dvn);
  p.seq_bounds = bounds.data_ptr<int64_t>();
  p.chunk_offsets = p.seq_bounds + ws.bounds;
  p.dh = w_dh.data_ptr();
  p.dvn = w_dvn.data_ptr();
  run(cuda::BwdStage::kState);
  w.reset(), qg.reset(), kg.reset();
  p.w = p.qg = p.kg = nullptr;

  at::Tensor w_dakk = workspace(ws.dAkk_part, false);
  at::Tensor w_dq = workspace(ws.dq_hv, true);
  at::Tensor w_dk = workspace(ws.dq_hv, true);
  at::Tensor w_dG = workspace(ws.dq_hv, false);
  at::Tensor w_db = workspace(ws.dbeta_part, true);
  p.dAkk_part = w_dakk.data_ptr<float>();
  p.dq_hv = w_dq.data_ptr<float>();
  p.dk_hv = w_dk.data_ptr<float>();
  p.dG = w_dG.data_ptr<float>();
  p.dbeta_part = w_db.data_ptr<float>();
  if (w_rstd.defined()) {
    p.rstd_qk = w_rstd.data_ptr<float>();
    p.rstd_ready = given == 0;  // the recompute filled it
  }
  run(cuda::BwdStage::kChunkA);
  w_dh.reset(), h.reset();
  p.dh = nullptr;
  p.h = nullptr;

  at::Tensor dv = output({B, T, HV, V}, v.options());
  at::Tensor w_daqk = workspace(ws.dA, false);
  at::Tensor w_dl = workspace(ws.dA, false);
  p.dv = dv.data_ptr();
  p.dAqk = w_daqk.data_ptr<float>();
  p.dL = w_dl.data_ptr<float>();
  run(cuda::BwdStage::kChunkB);
  w_dvn.reset(), v_new.reset(), w_dakk.reset();
  p.dvn = nullptr;
  p.v_new = nullptr;
  p.dAkk_part = nullptr;

  at::Tensor dg = output({B, T, HV, K}, g.options());
  at::Tensor w_ddt, w_dA;
  if (use_gate_in_kernel) {
    w_ddt = workspace(ws.ddt_part, false);
    w_dA = workspace(ws.dA_part, false);
    p.ddt_part = w_ddt.data_ptr<float>();
    p.dA_part = w_dA.data_ptr<float>();
  }
  p.dg = dg.data_ptr();
  run(cuda::BwdStage::kChunkC);
  g_cum.reset(), w_daqk.reset(), w_dl.reset(), w_dG.reset(), w_rstd.reset();
  p.g_cum = nullptr;
  p.dAqk = p.dL = p.dG = p.rstd_qk = nullptr;

  at::Tensor dq = at::empty({B, T, H, K}, q.options());
  at::Tensor dk = at::empty({B, T, H, K}, k.options());
  at::Tensor dbeta = at::empty({B, T, HV}, beta.options());
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dbeta = dbeta.data_ptr();
  run(cuda::BwdStage::kFinish);
  return {dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dh0};
}

TORCH_LIBRARY_IMPL(kda_ext, CUDA, m) { m.impl("chunk_kda_bwd", &chunk_kda_bwd_cuda); }

}  // namespace kda_ext

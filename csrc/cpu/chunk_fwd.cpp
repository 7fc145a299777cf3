// kda_ext CPU forward op chunk_kda_fwd: binding, dtype dispatch and the per-(sequence, head) pipeline.
#include "cpu/chunk_fwd.h"

#include <torch/library.h>

#include <tuple>

#include "cpu/parallel.h"

namespace kda_ext {
namespace cpu {

namespace {

// Output pointers; nullptr where the output was not asked for. Dtypes: o in qkv_dt; Aqk, Akk, w,
// qg, kg, u, v_new, h in qkv_dt (k's and v's dtype equal q's); g_cum and final in the compute dtype.
struct FwdOutputs {
  void *o, *final_state, *Aqk, *Akk, *g_cum, *w, *u, *qg, *kg, *v_new, *h;
};

template <class T>
void forward_item(const Params& p, const FwdOutputs& out, const WorkItem& wi, ChunkScratch<T>& s,
                  T* S) {
  const int64_t K = p.K, V = p.V, BT = p.BT, HV = p.HV, hv = wi.hv;
  const Dt sdt = sizeof(T) == sizeof(double) ? Dt::Double : Dt::Float;
  const Dt dt = p.qkv_dt;
  const SeqLayout& lay = p.layout;
  if (p.h0)
    state_load(elem_ptr(p.h0, sdt, (wi.n * HV + hv) * K * V), sdt, p.state_v_first, K, V, S);
  else
    std::fill(S, S + K * V, T(0));
  const int64_t nc = lay.num_chunks(wi.n);
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t r0 = lay.bos[wi.n] + c * BT, L = lay.chunk_rows(wi.n, c);
    prepare_chunk(p, wi, r0, L, s);
    if (out.h)
      state_store(S, K, V, p.state_v_first,
                  elem_ptr(out.h, dt, ((lay.slot0[wi.n] + c) * HV + hv) * K * V), dt);
    state_vnew(s.w, s.u, S, L, BT, K, V, dt, s.vnew);
    output_chunk(s.qg, S, s.Aqk, s.vnew, L, BT, K, V, static_cast<T>(p.scale), s.o);
    state_advance(s.kg, s.vnew, s.G + (L - 1) * K, L, K, V, S);

    const int64_t rowK = (r0 * HV + hv) * K, rowV = (r0 * HV + hv) * V, rowA = (r0 * HV + hv) * BT;
    store_rows(s.o, V, L, V, elem_ptr(out.o, dt, rowV), dt, HV * V);
    store_rows(s.Aqk, BT, L, BT, elem_ptr(out.Aqk, dt, rowA), dt, HV * BT);
    store_rows(s.Akk, BT, L, BT, elem_ptr(out.Akk, dt, rowA), dt, HV * BT);
    if (out.g_cum) {
      store_rows(s.G, K, L, K, elem_ptr(out.g_cum, sdt, rowK), sdt, HV * K);
      store_rows(s.w, K, L, K, elem_ptr(out.w, dt, rowK), dt, HV * K);
      store_rows(s.qg, K, L, K, elem_ptr(out.qg, dt, rowK), dt, HV * K);
      store_rows(s.kg, K, L, K, elem_ptr(out.kg, dt, rowK), dt, HV * K);
      store_rows(s.u, V, L, V, elem_ptr(out.u, dt, rowV), dt, HV * V);
      store_rows(s.vnew, V, L, V, elem_ptr(out.v_new, dt, rowV), dt, HV * V);
    }
  }
  if (out.final_state)
    state_store(S, K, V, p.state_v_first,
                elem_ptr(out.final_state, sdt, (wi.n * HV + hv) * K * V), sdt);
}

template <class T>
void forward(const Params& p, const FwdOutputs& out) {
  parallel_for_flush_denormals(0, p.N * p.HV, 1, [&](int64_t begin, int64_t end) {
    ChunkScratch<T> s(p.BT, p.K, p.V);
    std::vector<T> S(p.K * p.V);
    for (int64_t i = begin; i < end; ++i) forward_item(p, out, work_item(i, p.H, p.HV), s, S.data());
  });
}

inline void* ptr_or_null(at::Tensor& t) { return t.numel() ? t.data_ptr() : nullptr; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor>
chunk_kda_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& g, const at::Tensor& beta, double scale,
                  const std::optional<at::Tensor>& initial_state,
                  const std::optional<at::Tensor>& A_log,
                  const std::optional<at::Tensor>& dt_bias,
                  const std::optional<at::Tensor>& cu_seqlens, bool use_qk_l2norm,
                  bool use_gate_in_kernel, bool use_beta_sigmoid, bool allow_neg_eigval,
                  bool safe_gate, std::optional<double> lower_bound, bool state_v_first,
                  int64_t chunk_size, bool output_final_state, bool save_intermediates,
                  bool return_states) {
  const KdaDims d = check_chunk_kda_args(q, k, v, g, beta, initial_state, A_log, dt_bias,
                                         cu_seqlens, use_gate_in_kernel, lower_bound,
                                         state_v_first, chunk_size);
  BoundInputs b = bind_inputs(d, q, k, v, g, beta, scale, initial_state, A_log, dt_bias,
                              cu_seqlens, use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid,
                              allow_neg_eigval, safe_gate, lower_bound, state_v_first);
  const auto sdt = compute_dtype(q);
  const auto kopt = k.options(), vopt = v.options(), sopt = q.options().dtype(sdt);
  const int64_t B = d.B, T = d.T, HV = d.HV, K = d.K, V = d.V;
  const int64_t sr = state_v_first ? V : K, sc = state_v_first ? K : V;

  at::Tensor o = at::empty({B, T, HV, V}, q.options());
  at::Tensor final_state =
      output_final_state ? at::empty({d.N, HV, sr, sc}, sopt) : at::empty({0}, sopt);
  at::Tensor Aqk = at::empty({B, T, HV, d.BT}, kopt);
  at::Tensor Akk = at::empty({B, T, HV, d.BT}, kopt);
  auto inter = [&](int64_t D, const at::TensorOptions& opt) {
    return save_intermediates ? at::empty({B, T, HV, D}, opt) : at::empty({0}, opt);
  };
  at::Tensor g_cum = inter(K, sopt), w = inter(K, kopt), u = inter(V, vopt), qg = inter(K, kopt),
             kg = inter(K, kopt), v_new = inter(V, vopt);
  at::Tensor h;
  if (save_intermediates || return_states)
    // Varlen slots past the real chunks are never written: they must read as zero.
    h = d.varlen ? at::zeros({B, d.NT, HV, sr, sc}, kopt) : at::empty({B, d.NT, HV, sr, sc}, kopt);
  else
    h = at::empty({0}, kopt);

  FwdOutputs out{o.data_ptr(),      ptr_or_null(final_state), Aqk.data_ptr(), Akk.data_ptr(),
                 ptr_or_null(g_cum), ptr_or_null(w),          ptr_or_null(u), ptr_or_null(qg),
                 ptr_or_null(kg),   ptr_or_null(v_new),       ptr_or_null(h)};
  if (B * T > 0) {
    if (sdt == at::kDouble)
      forward<double>(b.p, out);
    else
      forward<float>(b.p, out);
  } else if (output_final_state) {
    // No tokens: the final state is the initial state (or zero).
    if (initial_state.has_value())
      final_state.copy_(*initial_state);
    else
      final_state.zero_();
  }
  return {o, final_state, Aqk, Akk, g_cum, w, u, qg, kg, v_new, h};
}

TORCH_LIBRARY_IMPL(kda_ext, CPU, m) { m.impl("chunk_kda_fwd", &chunk_kda_fwd_cpu); }

}  // namespace cpu
}  // namespace kda_ext

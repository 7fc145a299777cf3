// kda_ext CPU ops fused_recurrent_kda_fwd / fused_recurrent_kda_inplace: the token-by-token
// recurrence (decode), binding and kernel.
//
// One work item is one (sequence, value head): its state is held in a [K, V] buffer of the
// compute dtype (float, or double for float64 inputs) across the sequence's tokens, read once
// and written once whatever the stored layout.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/common.h"
#include "cpu/gate.h"
#include "cpu/parallel.h"
#include "cpu/state.h"

namespace kda_ext {
namespace cpu {

namespace {

// Everything one call needs, ATen-free. q/k/v/g/beta are contiguous.
struct RecurrentParams {
  int64_t T, H, HV, K, V, N;
  const void *q, *k, *v, *g, *beta;
  Dt qkv_dt, g_dt, beta_dt;
  const void* A_log;    // HV elements or nullptr (only with the in-kernel gate)
  const void* dt_bias;  // HV*K elements or nullptr
  Dt A_log_dt, dt_bias_dt;
  // The state read at the start (nullptr: zero) and where the final one goes (nullptr: nowhere),
  // each a slot array with `*_stride` elements between slots. With `slots`, sequence n reads slot
  // slots[n] (negative: padding, the sequence is skipped) and, when out_by_slot, writes it back
  // there; otherwise it writes row n of state_out.
  const void* state_in;
  int64_t state_in_stride;
  void* state_out;
  int64_t state_out_stride;
  bool out_by_slot;
  const int64_t* slots;  // [N] or nullptr
  const int64_t* cu;     // [N + 1] or nullptr (fixed length: sequence n is rows n*T .. n*T+T)
  void* o;               // [B, T, HV, V] in qkv_dt
  double scale;
  bool use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval, has_lower_bound;
  double lower_bound;
  bool state_v_first;
};

// FLA's recurrent kernel normalises in fp32 without rounding back to the input dtype.
template <class T>
void l2normalize(T* x, int64_t K) {
  T ss = T(0);
  for (int64_t c = 0; c < K; ++c) ss += x[c] * x[c];
  const T rstd = T(1) / std::sqrt(ss + T(1e-6));
  for (int64_t c = 0; c < K; ++c) x[c] *= rstd;
}

template <class T>
struct Scratch {
  std::vector<T> S, q, k, decay, v, pred;
  Scratch(int64_t K, int64_t V) : S(K * V), q(K), k(K), decay(K), v(V), pred(V) {}
};

template <class T>
void run_item(const RecurrentParams& p, int64_t n, int64_t hv, Scratch<T>& s) {
  const int64_t K = p.K, V = p.V, H = p.H, HV = p.HV, h = hv / (HV / H);
  const Dt sdt = sizeof(T) == sizeof(double) ? Dt::Double : Dt::Float;
  const int64_t bos = p.cu ? p.cu[n] : n * p.T, eos = p.cu ? p.cu[n + 1] : (n + 1) * p.T;
  const int64_t slot = p.slots ? p.slots[n] : n;
  const int64_t head_off = hv * K * V;
  if (slot < 0) {
    // Padding: nothing is read or written in the pool; outputs (and a returned final state) are 0.
    for (int64_t r = bos; r < eos; ++r)
      std::memset(elem_ptr(p.o, p.qkv_dt, (r * HV + hv) * V), 0, V * elem_size(p.qkv_dt));
    if (p.state_out && !p.out_by_slot)
      std::memset(elem_ptr(p.state_out, sdt, n * p.state_out_stride + head_off), 0,
                  K * V * elem_size(sdt));
    return;
  }
  T* S = s.S.data();
  if (p.state_in)
    state_load(elem_ptr(p.state_in, sdt, slot * p.state_in_stride + head_off), sdt,
               p.state_v_first, K, V, S);
  else
    std::fill(S, S + K * V, T(0));
  const GateFn<T> gate = make_gate_fn<T>(p, hv);
  T *q = s.q.data(), *k = s.k.data(), *decay = s.decay.data(), *v = s.v.data(),
    *pred = s.pred.data();
  for (int64_t r = bos; r < eos; ++r) {
    load_rows(elem_ptr(p.q, p.qkv_dt, (r * H + h) * K), p.qkv_dt, K, 1, K, q, K);
    load_rows(elem_ptr(p.k, p.qkv_dt, (r * H + h) * K), p.qkv_dt, K, 1, K, k, K);
    load_rows(elem_ptr(p.v, p.qkv_dt, (r * HV + hv) * V), p.qkv_dt, V, 1, V, v, V);
    load_rows(elem_ptr(p.g, p.g_dt, (r * HV + hv) * K), p.g_dt, K, 1, K, decay, K);
    if (p.use_qk_l2norm) {
      l2normalize(q, K);
      l2normalize(k, K);
    }
    for (int64_t c = 0; c < K; ++c) {
      q[c] *= static_cast<T>(p.scale);
      decay[c] = std::exp(gate(decay[c], c));
    }
    T beta = read_scalar<T>(p.beta, p.beta_dt, r * HV + hv);
    if (p.use_beta_sigmoid) beta = (p.allow_neg_eigval ? T(2) : T(1)) * sigmoid(beta);

    // S <- Diag(exp(g)) S; pred = S^T k
    std::fill(pred, pred + V, T(0));
    for (int64_t c = 0; c < K; ++c) {
      T* row = S + c * V;
      const T a = decay[c], kc = k[c];
      for (int64_t j = 0; j < V; ++j) {
        row[j] *= a;
        pred[j] += kc * row[j];
      }
    }
    // delta = beta (v - pred); S <- S + k delta^T; o = S^T (scale q)
    for (int64_t j = 0; j < V; ++j) v[j] = beta * (v[j] - pred[j]);
    std::fill(pred, pred + V, T(0));
    for (int64_t c = 0; c < K; ++c) {
      T* row = S + c * V;
      const T kc = k[c], qc = q[c];
      for (int64_t j = 0; j < V; ++j) {
        row[j] += kc * v[j];
        pred[j] += qc * row[j];
      }
    }
    store_rows(pred, V, 1, V, elem_ptr(p.o, p.qkv_dt, (r * HV + hv) * V), p.qkv_dt, V);
  }
  if (p.state_out) {
    const int64_t row = p.out_by_slot ? slot : n;
    state_store(S, K, V, p.state_v_first,
                elem_ptr(p.state_out, sdt, row * p.state_out_stride + head_off), sdt);
  }
}

template <class T>
void run(const RecurrentParams& p) {
  parallel_for_flush_denormals(0, p.N * p.HV, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s(p.K, p.V);
    for (int64_t i = begin; i < end; ++i) run_item<T>(p, i / p.HV, i % p.HV, s);
  });
}

// Contiguous inputs (kept alive for the call) and the params pointing into them. `state` is read
// at its own slot stride; its inner three dims must be dense (the in-place op checked it; the
// functional one passes a dense copy otherwise).
struct Bound {
  at::Tensor q, k, v, g, beta, A_log, dt_bias, state, slots;
  std::vector<int64_t> cu;
  RecurrentParams p{};
};

Bound bind_recurrent(const RecurrentDims& d, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           const at::Tensor& g, const at::Tensor& beta, double scale,
           const std::optional<at::Tensor>& state, const std::optional<at::Tensor>& A_log,
           const std::optional<at::Tensor>& dt_bias, const std::optional<at::Tensor>& cu_seqlens,
           const std::optional<at::Tensor>& ssm_state_indices, bool use_qk_l2norm,
           bool use_gate_in_kernel, bool use_beta_sigmoid, bool allow_neg_eigval,
           std::optional<double> lower_bound, bool state_v_first) {
  Bound b;
  b.q = q.contiguous();
  b.k = k.contiguous();
  b.v = v.contiguous();
  b.g = g.contiguous();
  b.beta = beta.contiguous();
  RecurrentParams& p = b.p;
  p.T = d.T;
  p.H = d.H;
  p.HV = d.HV;
  p.K = d.K;
  p.V = d.V;
  p.N = d.N;
  p.q = b.q.data_ptr();
  p.k = b.k.data_ptr();
  p.v = b.v.data_ptr();
  p.g = b.g.data_ptr();
  p.beta = b.beta.data_ptr();
  p.qkv_dt = to_dt(q.scalar_type());
  p.g_dt = to_dt(g.scalar_type());
  p.beta_dt = to_dt(beta.scalar_type());
  p.A_log = p.dt_bias = nullptr;
  p.A_log_dt = p.dt_bias_dt = Dt::Float;
  if (use_gate_in_kernel && A_log.has_value()) {
    b.A_log = A_log->contiguous();
    p.A_log = b.A_log.data_ptr();
    p.A_log_dt = to_dt(b.A_log.scalar_type());
  }
  if (use_gate_in_kernel && dt_bias.has_value()) {
    b.dt_bias = dt_bias->contiguous();
    p.dt_bias = b.dt_bias.data_ptr();
    p.dt_bias_dt = to_dt(b.dt_bias.scalar_type());
  }
  p.state_in = nullptr;
  p.state_in_stride = 0;
  if (state.has_value()) {
    b.state = state_inner_dense(*state) ? *state : state->contiguous();
    p.state_in = b.state.data_ptr();
    p.state_in_stride = b.state.stride(0);
  }
  p.cu = nullptr;
  if (cu_seqlens.has_value()) {
    b.cu = read_cu_seqlens(*cu_seqlens, d.T);
    p.cu = b.cu.data();
  }
  p.slots = nullptr;
  if (ssm_state_indices.has_value()) {
    b.slots = ssm_state_indices->to(at::kLong).contiguous();
    p.slots = b.slots.data_ptr<int64_t>();
    for (int64_t i = 0; i < d.N; ++i)
      TORCH_CHECK_INDEX(p.slots[i] < d.P, "kda_ext: ssm_state_indices[", i, "] = ", p.slots[i],
                        " is out of range for a state pool of ", d.P,
                        " slots (negative values mark padding)");
  }
  p.scale = scale;
  p.use_qk_l2norm = use_qk_l2norm;
  p.use_gate_in_kernel = use_gate_in_kernel;
  p.use_beta_sigmoid = use_beta_sigmoid;
  p.allow_neg_eigval = allow_neg_eigval;
  p.has_lower_bound = lower_bound.has_value();
  p.lower_bound = lower_bound.value_or(0.0);
  p.state_v_first = state_v_first;
  return b;
}

void dispatch(const at::Tensor& q, const RecurrentParams& p) {
  if (p.N * p.HV == 0) return;
  if (q.scalar_type() == at::kDouble)
    run<double>(p);
  else
    run<float>(p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fused_recurrent_kda_fwd_cpu(
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
  Bound b = bind_recurrent(d, q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens,
                 ssm_state_indices, use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid,
                 allow_neg_eigval, lower_bound, state_v_first);
  const auto sopt = q.options().dtype(compute_dtype(q));
  const int64_t r = state_v_first ? d.V : d.K, c = state_v_first ? d.K : d.V;
  at::Tensor o = at::empty({d.B, d.T, d.HV, d.V}, q.options());
  at::Tensor final_state =
      output_final_state ? at::empty({d.N, d.HV, r, c}, sopt) : at::empty({0}, sopt);
  b.p.o = o.data_ptr();
  b.p.state_out = output_final_state ? final_state.data_ptr() : nullptr;
  b.p.state_out_stride = d.HV * r * c;
  b.p.out_by_slot = false;
  dispatch(q, b.p);
  return {o, final_state};
}

at::Tensor fused_recurrent_kda_inplace_cpu(
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
  Bound b = bind_recurrent(d, q, k, v, g, beta, scale, state, A_log, dt_bias, cu_seqlens,
                 ssm_state_indices, use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid,
                 allow_neg_eigval, lower_bound, state_v_first);
  at::Tensor o = at::empty({d.B, d.T, d.HV, d.V}, q.options());
  b.p.o = o.data_ptr();
  // Every item reads its whole state before writing it, and items own disjoint slots (the
  // caller's contract for ssm_state_indices), so reading and writing the same memory is safe.
  b.p.state_out = state.data_ptr();
  b.p.state_out_stride = state.stride(0);
  b.p.out_by_slot = true;
  dispatch(q, b.p);
  return o;
}

TORCH_LIBRARY_IMPL(kda_ext, CPU, m) {
  m.impl("fused_recurrent_kda_fwd", &fused_recurrent_kda_fwd_cpu);
  m.impl("fused_recurrent_kda_inplace", &fused_recurrent_kda_inplace_cpu);
}

}  // namespace cpu
}  // namespace kda_ext

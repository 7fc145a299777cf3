// kda_ext: the ops' own invariants, checked in the binding layer of both backends.
//
// chunk_kda (Python) already validates user input with friendly ValueError/TypeError messages;
// these TORCH_CHECKs guard direct calls of torch.ops.kda_ext.* so that no backend ever reads out
// of bounds. Every message names the argument, the expectation and what was given.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <optional>
#include <string>

namespace kda_ext {

// Sizes shared by every stage. NT is the number of chunk slots of `h`: ceil(T/BT) for fixed
// length, the shape-only upper bound (T + N*(BT-1)) / BT with cu_seqlens (see docs/design.md).
// What chunk_kda and fused_recurrent_kda read off their inputs alike (check_common_inputs).
struct InputDims {
  int64_t B, T, H, HV, K, V, N;
  bool varlen;
};

struct KdaDims : InputDims {
  int64_t BT, NT;
};

inline int64_t chunk_slots(int64_t T, int64_t N, int64_t BT, bool varlen) {
  return varlen ? (T + N * (BT - 1)) / BT : (T + BT - 1) / BT;
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "kda_ext: ", name, " must be on ", ref.device(),
              " (the device of q), got ", t.device());
}

// A tensor handed back to the backward (a saved intermediate, dht): exact shape and dtype, and
// the device of q. Shared by the CPU and CUDA bindings.
inline void check_like(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                       at::ScalarType dtype, const at::Tensor& q) {
  TORCH_CHECK(t.sizes() == shape, "kda_ext: ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "kda_ext: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  check_same_device(q, t, name);
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// The dtype of states, gate cumsums and every accumulator.
inline at::ScalarType compute_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The sizes both ops read from q and v, and N, the number of sequences (B, or the offsets of
// cu_seqlens).
// What chunk_kda and fused_recurrent_kda check alike: the shapes, dtypes and devices of q, k, v,
// g and beta, and cu_seqlens.
inline InputDims check_common_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& g, const at::Tensor& beta,
                                     const std::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK(q.dim() == 4, "kda_ext: q must be [B, T, H, K], got shape ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "kda_ext: k must have q's shape ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(v.dim() == 4, "kda_ext: v must be [B, T, HV, V], got shape ", v.sizes());
  InputDims d{};
  d.B = q.size(0);
  d.T = q.size(1);
  d.H = q.size(2);
  d.K = q.size(3);
  d.HV = v.size(2);
  d.V = v.size(3);
  TORCH_CHECK(v.size(0) == d.B && v.size(1) == d.T, "kda_ext: v must be [", d.B, ", ", d.T,
              ", HV, V] (B and T of q), got ", v.sizes());
  TORCH_CHECK(d.H > 0 && d.HV > 0 && d.HV % d.H == 0, "kda_ext: the value heads HV=", d.HV,
              " must be a positive multiple of the q/k heads H=", d.H);
  TORCH_CHECK(d.K > 0 && d.K <= 256, "kda_ext: key head dim K must be in [1, 256], got ", d.K);
  TORCH_CHECK(d.V > 0 && d.V <= 256, "kda_ext: value head dim V must be in [1, 256], got ", d.V);
  TORCH_CHECK(g.dim() == 4 && g.size(0) == d.B && g.size(1) == d.T && g.size(2) == d.HV &&
                  g.size(3) == d.K,
              "kda_ext: g must be [", d.B, ", ", d.T, ", ", d.HV, ", ", d.K, "], got ", g.sizes());
  TORCH_CHECK(beta.dim() == 3 && beta.size(0) == d.B && beta.size(1) == d.T &&
                  beta.size(2) == d.HV,
              "kda_ext: beta must be [", d.B, ", ", d.T, ", ", d.HV, "], got ", beta.sizes());
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&q, "q"}, {&k, "k"}, {&v, "v"},
                         {&g, "g"}, {&beta, "beta"}}) {
    TORCH_CHECK(is_float_dtype(t->scalar_type()), "kda_ext: ", name,
                " must be float16, bfloat16, float32 or float64, got ", t->scalar_type());
    check_same_device(q, *t, name);
  }
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "kda_ext: q, k and v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  d.varlen = cu_seqlens.has_value();
  if (d.varlen) {
    const auto& cu = *cu_seqlens;
    TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2,
                "kda_ext: cu_seqlens must be a 1-D tensor of N+1 >= 2 offsets, got shape ",
                cu.sizes());
    TORCH_CHECK(cu.scalar_type() == at::kLong || cu.scalar_type() == at::kInt,
                "kda_ext: cu_seqlens must be int32 or int64, got ", cu.scalar_type());
    check_same_device(q, cu, "cu_seqlens");
    TORCH_CHECK(d.B == 1, "kda_ext: batch size must be 1 with cu_seqlens, got ", d.B);
    d.N = cu.numel() - 1;
  } else {
    d.N = d.B;
  }
  return d;
}

// The in-kernel gate's parameters (both ops): A_log [HV], dt_bias [HV * K], fp32/fp64, q's device.
inline void check_gate_params(const at::Tensor& q, const std::optional<at::Tensor>& A_log,
                              const std::optional<at::Tensor>& dt_bias, bool use_gate_in_kernel,
                              std::optional<double> lower_bound, int64_t HV, int64_t K) {
  if (use_gate_in_kernel) {
    TORCH_CHECK(A_log.has_value() || lower_bound.has_value(),
                "kda_ext: the in-kernel softplus gate needs A_log");
    if (A_log.has_value()) {
      TORCH_CHECK(A_log->numel() == HV, "kda_ext: A_log must have HV=", HV,
                  " elements, got ", A_log->numel());
      TORCH_CHECK(A_log->scalar_type() == at::kFloat || A_log->scalar_type() == at::kDouble,
                  "kda_ext: A_log must be float32 or float64, got ", A_log->scalar_type());
      check_same_device(q, *A_log, "A_log");
    }
    if (dt_bias.has_value()) {
      TORCH_CHECK(dt_bias->numel() == HV * K, "kda_ext: dt_bias must have HV*K=",
                  HV * K, " elements, got ", dt_bias->numel());
      TORCH_CHECK(dt_bias->scalar_type() == at::kFloat || dt_bias->scalar_type() == at::kDouble,
                  "kda_ext: dt_bias must be float32 or float64, got ", dt_bias->scalar_type());
      check_same_device(q, *dt_bias, "dt_bias");
    }
  }
}

inline KdaDims check_chunk_kda_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& g, const at::Tensor& beta,
                                    const std::optional<at::Tensor>& initial_state,
                                    const std::optional<at::Tensor>& A_log,
                                    const std::optional<at::Tensor>& dt_bias,
                                    const std::optional<at::Tensor>& cu_seqlens,
                                    bool use_gate_in_kernel,
                                    std::optional<double> lower_bound, bool state_v_first,
                                    int64_t chunk_size) {
  const InputDims in = check_common_inputs(q, k, v, g, beta, cu_seqlens);
  TORCH_CHECK(chunk_size == 32 || chunk_size == 64, "kda_ext: chunk_size must be 32 or 64, got ",
              chunk_size);
  KdaDims d{};
  static_cast<InputDims&>(d) = in;
  d.BT = chunk_size;
  d.NT = chunk_slots(d.T, d.N, d.BT, d.varlen);
  const auto sdt = compute_dtype(q);
  if (initial_state.has_value()) {
    const auto& h0 = *initial_state;
    const int64_t r = state_v_first ? d.V : d.K, c = state_v_first ? d.K : d.V;
    TORCH_CHECK(h0.dim() == 4 && h0.size(0) == d.N && h0.size(1) == d.HV && h0.size(2) == r &&
                    h0.size(3) == c,
                "kda_ext: initial_state must be [", d.N, ", ", d.HV, ", ", r, ", ", c, "], got ",
                h0.sizes());
    TORCH_CHECK(h0.scalar_type() == sdt, "kda_ext: initial_state must be ", sdt, ", got ",
                h0.scalar_type());
    check_same_device(q, h0, "initial_state");
  }
  check_gate_params(q, A_log, dt_bias, use_gate_in_kernel, lower_bound, d.HV, d.K);
  return d;
}

// Sizes of one fused_recurrent_kda call. P is the number of state slots (rows of the state
// tensor): N without ssm_state_indices, the pool size with them.
struct RecurrentDims : InputDims {
  int64_t P;
  bool indexed;
};

// A state tensor [*, HV, r, c] dense in its last three dims (its slots may be strided).
inline bool state_inner_dense(const at::Tensor& s) {
  return s.stride(3) == 1 && s.stride(2) == s.size(3) && s.stride(1) == s.size(2) * s.size(3);
}

// fused_recurrent_kda_fwd / _inplace: the shapes, dtypes and devices every backend relies on.
// `state` is the initial state (or the state updated in place); `inplace` adds what writing
// into it needs: its three inner dims dense (its slots may be strided: a view into a larger
// cache), and slots that do not overlap.
inline RecurrentDims check_fused_recurrent_args(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
    const at::Tensor& beta, const std::optional<at::Tensor>& state,
    const std::optional<at::Tensor>& A_log, const std::optional<at::Tensor>& dt_bias,
    const std::optional<at::Tensor>& cu_seqlens,
    const std::optional<at::Tensor>& ssm_state_indices, bool use_gate_in_kernel,
    std::optional<double> lower_bound, bool state_v_first, bool inplace) {
  const InputDims in = check_common_inputs(q, k, v, g, beta, cu_seqlens);
  RecurrentDims d{};
  static_cast<InputDims&>(d) = in;
  d.indexed = ssm_state_indices.has_value();
  if (d.indexed) {
    const auto& idx = *ssm_state_indices;
    TORCH_CHECK(idx.dim() == 1 && idx.size(0) == d.N,
                "kda_ext: ssm_state_indices must be [N] = [", d.N, "] (one state slot per "
                "sequence), got shape ", idx.sizes());
    TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
                "kda_ext: ssm_state_indices must be int32 or int64, got ", idx.scalar_type());
    check_same_device(q, idx, "ssm_state_indices");
    TORCH_CHECK(state.has_value(),
                "kda_ext: ssm_state_indices index a state pool, so initial_state must be given");
  }
  TORCH_CHECK(!inplace || state.has_value(), "kda_ext: the in-place update needs a state");
  d.P = d.N;
  if (state.has_value()) {
    const auto& s = *state;
    const int64_t r = state_v_first ? d.V : d.K, c = state_v_first ? d.K : d.V;
    TORCH_CHECK(s.dim() == 4 && s.size(1) == d.HV && s.size(2) == r && s.size(3) == c &&
                    (d.indexed || s.size(0) == d.N),
                "kda_ext: initial_state must be [", d.indexed ? "P" : std::to_string(d.N), ", ",
                d.HV, ", ", r, ", ", c, "]", d.indexed ? " (P state slots)" : "", ", got ",
                s.sizes());
    d.P = s.size(0);
    TORCH_CHECK(s.scalar_type() == compute_dtype(q), "kda_ext: initial_state must be ",
                compute_dtype(q), ", got ", s.scalar_type());
    check_same_device(q, s, "initial_state");
    if (inplace) {
      TORCH_CHECK(state_inner_dense(s),
                  "kda_ext: a state updated in place must be dense in its last three dims "
                  "(strides [*, ", r * c, ", ", c, ", 1]), got strides ", s.strides());
      TORCH_CHECK(d.P <= 1 || s.stride(0) >= d.HV * r * c,
                  "kda_ext: the slots of a state updated in place must not overlap: stride(0) "
                  "must be >= ", d.HV * r * c, ", got ", s.stride(0));
    }
  }
  check_gate_params(q, A_log, dt_bias, use_gate_in_kernel, lower_bound, d.HV, d.K);
  return d;
}

}  // namespace kda_ext

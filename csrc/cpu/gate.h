// kda_ext CPU stage "gate": q/k l2norm, beta sigmoid, in-kernel gates and the chunk-local cumsum.
#pragma once

#include "cpu/common.h"

namespace kda_ext {
namespace cpu {

// Turns raw g into the per-step log decay for value head hv (identity when the gate is not in
// kernel). a = exp(A_log[hv]) (1 without A_log), bias = dt_bias + hv*K (nullptr without dt_bias).
template <class T>
struct GateFn {
  bool in_kernel = false, lower_bound_gate = false;
  T a = T(1), lb = T(0);
  const void* bias = nullptr;
  Dt bias_dt = Dt::Float;

  T bias_at(int64_t k) const { return bias ? read_scalar<T>(bias, bias_dt, k) : T(0); }
  // softplus gate: -a * softplus(x); lower-bound gate: lb * sigmoid(a * x); x = g + bias.
  T operator()(T graw, int64_t k) const {
    if (!in_kernel) return graw;
    const T x = graw + bias_at(k);
    return lower_bound_gate ? lb * sigmoid(a * x) : -a * softplus(x);
  }
};

// The gate of value head hv from any params struct with the gate's fields (Params, and the
// decode op's RecurrentParams).
template <class T, class P>
GateFn<T> make_gate_fn(const P& p, int64_t hv) {
  GateFn<T> f;
  f.in_kernel = p.use_gate_in_kernel;
  if (!f.in_kernel) return f;
  f.lower_bound_gate = p.has_lower_bound;
  f.lb = static_cast<T>(p.lower_bound);
  f.a = p.A_log ? std::exp(read_scalar<T>(p.A_log, p.A_log_dt, hv)) : T(1);
  if (p.dt_bias) {
    f.bias = elem_ptr(p.dt_bias, p.dt_bias_dt, hv * p.K);
    f.bias_dt = p.dt_bias_dt;
  }
  return f;
}

// y = round(x * rstd, dt) with rstd = 1/sqrt(sum x^2 + 1e-6); returns rstd.
template <class T>
T l2norm_row(const T* x, int64_t K, T* y, Dt dt);

// beta as the recurrence uses it: raw, or s*sigmoid(raw) (s = 2 with allow_neg_eigval).
template <class T>
T beta_value(const Params& p, T raw);

// Rows [r0, r0+L) of work item wi into [BT,K] q̂/k̂ (after the optional l2norm, in q's dtype's
// precision), [BT,V] v and [BT] beta; rows L..BT are zero.
template <class T>
void load_chunk_inputs(const Params& p, const WorkItem& wi, int64_t r0, int64_t L, T* qh, T* kh,
                       T* v, T* beta);

// G = inclusive cumsum over the chunk's rows of the (in-kernel) gate, [BT,K] in natural-log
// units; rows L..BT repeat row L-1 so that exp(G_i - G_j) stays finite on padding rows.
template <class T>
void gate_cumsum_chunk(const Params& p, const WorkItem& wi, int64_t r0, int64_t L, T* G);

}  // namespace cpu
}  // namespace kda_ext

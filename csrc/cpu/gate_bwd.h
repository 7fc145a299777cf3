// kda_ext CPU backend: backward of the per-token preprocessing (in-kernel gate, beta sigmoid, l2norm).
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu/common.h"

namespace kda_ext {
namespace cpu {

// The in-kernel gate of one element, x = g + dt_bias: given dgate = dLoss/dgate, returns
// dLoss/dx (which is also the element's dt_bias gradient) and adds the element's A_log gradient
// to *dA_log.
//   softplus:    gate = -a softplus(x),  a = exp(A_log)   => dx = -dgate a softplus'(x), dA = dgate gate
//   lower bound: gate = lb sigmoid(a x), a = exp(A_log) or 1 => dx = dgate lb s(1-s) a, dA = dx x
template <class T>
inline T gate_bwd_elem(T x, T dgate, bool lower_bound_gate, T lb, bool has_A_log, T A_log,
                       T* dA_log) {
  const T a = has_A_log ? std::exp(A_log) : T(1);
  if (lower_bound_gate) {
    const T s = sigmoid(a * x);
    const T dx = dgate * lb * s * (T(1) - s) * a;
    if (has_A_log) *dA_log += dx * x;
    return dx;
  }
  // softplus'(x) = sigmoid(x), and exactly 1 above the threshold where softplus(x) = x.
  const T dsp = x > T(20) ? T(1) : sigmoid(x);
  *dA_log += dgate * (-a * softplus(x));
  return -dgate * a * dsp;
}

// beta = s sigmoid(raw): dLoss/draw = dbeta s sigmoid(raw) (1 - sigmoid(raw)).
template <class T>
inline T beta_sigmoid_bwd(T raw, T dbeta, T s) {
  const T sg = sigmoid(raw);
  return dbeta * s * sg * (T(1) - sg);
}

// y = x rstd, rstd = 1/sqrt(sum x^2 + 1e-6): dx = rstd (dy - (dy . y) y), in place on dy. The
// normalised y is recomputed unrounded from x.
template <class T>
inline void l2norm_bwd_row(const T* x, T* dy, int64_t K) {
  T ss = T(0);
  for (int64_t c = 0; c < K; ++c) ss += x[c] * x[c];
  const T rstd = T(1) / std::sqrt(ss + T(1e-6));
  T dot = T(0);
  for (int64_t c = 0; c < K; ++c) dot += dy[c] * x[c] * rstd;
  for (int64_t c = 0; c < K; ++c) dy[c] = rstd * (dy[c] - dot * x[c] * rstd);
}

}  // namespace cpu
}  // namespace kda_ext

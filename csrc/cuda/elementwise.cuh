// kda_ext CUDA: element-wise device helpers shared by the forward kernels (chunk_prepare,
// chunk_prepare_lean, the fused sm90 forward): the in-kernel gate, beta, a fast exponential.
// Header-only and free of kernels, so any translation unit may include it.
#pragma once

#include <cuda_runtime.h>

#include "cuda/params.h"

namespace kda_ext {
namespace cuda {

// The gate's form, for kernels that decide it once per launch or loop instead of per element (a
// branch per element keeps a row loop from interleaving its rows).
enum class GateKind { kGiven, kLowerBound, kSoftplus };

__device__ __forceinline__ GateKind gate_kind(const ChunkKdaFwdParams& p) {
  if (!p.use_gate_in_kernel) return GateKind::kGiven;
  return p.use_lower_bound_gate ? GateKind::kLowerBound : GateKind::kSoftplus;
}

// a = exp(A_log) or, without A_log, 1 (for the lower-bound gate the factor is then skipped, which
// is the same as a factor of 1).
template <GateKind kKind>
__device__ __forceinline__ float gate_as(float graw, float bias, float a, float lower_bound) {
  if constexpr (kKind == GateKind::kGiven) {
    return graw;
  } else if constexpr (kKind == GateKind::kLowerBound) {
    return __fdividef(lower_bound, 1.f + __expf(-((graw + bias) * a)));
  } else {
    const float x = graw + bias;
    const float sp = x > 20.f ? x : log1pf(__expf(x));
    return -a * sp;
  }
}

// The in-kernel gate of one element: lower_bound * sigmoid(a (g + bias)) (the a factor only with
// A_log) or -a softplus(g + bias). bias = dt_bias[hv, col] (0 without one) and a = exp(A_log[hv])
// (1 without) are computed by the caller once per slice / block.
// __expf and __fdividef (a few ulp) instead of expf and IEEE division: those cost ~20 more
// instructions per element in a loop that is issue-bound, and a relative error of a few ulp in a
// gate is far below what the bf16/fp16 rounding of qg/kg/w introduces downstream. sigmoid still
// tends to 0 as x -> -inf (__fdividef by an infinite denominator gives 0). softplus keeps log1pf:
// __logf near 1 has an absolute error (~4e-7) that is large relative to softplus of x << 0.
__device__ __forceinline__ float gate_of(const ChunkKdaFwdParams& p, float graw, float bias,
                                        float a) {
  switch (gate_kind(p)) {
    case GateKind::kGiven: return gate_as<GateKind::kGiven>(graw, bias, a, p.lower_bound);
    case GateKind::kLowerBound:
      return gate_as<GateKind::kLowerBound>(graw, bias, p.A_log != nullptr ? a : 1.f, p.lower_bound);
    default: return gate_as<GateKind::kSoftplus>(graw, bias, a, p.lower_bound);
  }
}

__device__ __forceinline__ float beta_of(const ChunkKdaFwdParams& p, float raw) {
  if (!p.use_beta_sigmoid) return raw;
  const float s = p.allow_neg_eigval ? 2.f : 1.f;
  return s / (1.f + expf(-raw));
}

// e^x as ex2.approx.ftz(x log2e): __expf without its subnormal fix-ups (three instructions of
// five): results below 2^-126 flush to 0, and every product such a factor enters is negligible
// next to the row's other terms (the factors are ratios e^{G_a - G_b} of one chunk).
__device__ __forceinline__ float exp_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}

}  // namespace cuda
}  // namespace kda_ext

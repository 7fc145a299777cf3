// kda_ext CUDA backward: sequence bookkeeping, GVA/l2norm reduction of dq/dk, dbeta, and the deterministic dA_log/ddt_bias reduction.
#pragma once

#include "cuda/bwd_common.cuh"

namespace kda_ext {
namespace cuda {
namespace bwd {

// One thread: clamped token offsets and chunk prefix sums of the N sequences (device-side, so the
// host never syncs on cu_seqlens). Fixed length: sequence n is batch row n.
__global__ void bwd_prep_kernel(const ChunkKdaBwdParams p) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const int64_t BT = p.BT;
  int64_t prev = 0;
  p.chunk_offsets[0] = 0;
  for (int64_t n = 0; n <= p.N; ++n) {
    int64_t x;
    if (p.varlen) {
      x = p.cu_seqlens_int64 ? static_cast<const int64_t*>(p.cu_seqlens)[n]
                             : static_cast<int64_t>(static_cast<const int32_t*>(p.cu_seqlens)[n]);
      x = x < prev ? prev : (x > p.T ? p.T : x);  // monotone and inside [0, T]
    } else {
      x = n * p.T;
    }
    p.seq_bounds[n] = x;
    if (n > 0) {
      int64_t off = p.chunk_offsets[n - 1] + (x - prev + BT - 1) / BT;
      const int64_t cap = p.B * p.NT;
      p.chunk_offsets[n] = off > cap ? cap : off;
    }
    prev = x;
  }
}

// One warp per (token, q/k head, which): sums dq_hat (dk_hat) over the head's GVA group in a fixed
// order, applies the l2norm backward dx = rstd (dy - (dy . y) y) with y the rounded normalized
// row, and casts to the input dtype.
template <typename T>
__global__ void __launch_bounds__(kBwdThreads)
bwd_dqk_kernel(const ChunkKdaBwdParams p) {
  const int64_t gw = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t rows = p.B * p.T * p.H;
  if (gw >= 2 * rows) return;
  const bool is_k = gw >= rows;
  const int64_t row = is_k ? gw - rows : gw;  // tok * H + hq
  const int64_t tok = row / p.H, hq = row % p.H;
  const int64_t K = p.K, HV = p.HV, G = p.HV / p.H;
  const T* x = static_cast<const T*>(is_k ? p.k : p.q);
  const float* d = is_k ? p.dk_hv : p.dq_hv;
  T* out = static_cast<T*>(is_k ? p.dk : p.dq);
  constexpr int kPer = 256 / 32;
  float dy[kPer], y[kPer];
  float ss = 0.f;
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const int64_t c = lane + 32 * e;
    float acc = 0.f, xv = 0.f;
    if (c < K) {
      for (int64_t g = 0; g < G; ++g) acc += d[(tok * HV + hq * G + g) * K + c];
      xv = to_float<T>(x[row * K + c]);
    }
    dy[e] = acc;
    y[e] = xv;
    ss += xv * xv;
  }
  if (p.use_qk_l2norm) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float rstd = rsqrtf(ss + 1e-6f);
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      y[e] = round_to<T>(y[e] * rstd);
      dot += dy[e] * y[e];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
#pragma unroll
    for (int e = 0; e < kPer; ++e) dy[e] = rstd * (dy[e] - dot * y[e]);
  }
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const int64_t c = lane + 32 * e;
    if (c < K) out[row * K + c] = from_float<T>(dy[e]);
  }
}

// One thread per (token, value head): dbeta = V part + K-slice partials (fixed order), then the
// sigmoid backward when beta was raw.
__global__ void bwd_dbeta_kernel(const ChunkKdaBwdParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = p.B * p.T * p.HV;
  if (i >= n) return;
  float db = p.dbeta_part[static_cast<int64_t>(p.NKS) * n + i];
  for (int s = 0; s < p.NKS; ++s) db += p.dbeta_part[s * n + i];
  if (p.use_beta_sigmoid) {
    const float sg = sigmoidf_(load_any(p.beta, p.beta_dtype, i));
    db *= (p.allow_neg_eigval ? 2.f : 1.f) * sg * (1.f - sg);
  }
  store_any(p.dbeta, p.beta_dtype, i, db);
}

// One block per value head: dA_log[hv] and ddt_bias[hv, :] from the per-chunk partials, summed in
// a fixed order (strided per thread, then a fixed tree) so the result never depends on timing.
__global__ void __launch_bounds__(kBwdThreads)
bwd_gate_reduce_kernel(const ChunkKdaBwdParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];  // kBwdThreads floats
  float* red = reinterpret_cast<float*>(smem_raw);
  const int64_t hv = blockIdx.x;
  if (hv >= p.HV) return;
  const int64_t slots = p.B * p.NT, K = p.K;
  if (p.ddt_bias != nullptr) {
    for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
      float s = 0.f;
      for (int64_t t = 0; t < slots; ++t) s += p.ddt_part[(t * p.HV + hv) * K + c];
      store_any(p.ddt_bias, p.dt_bias_dtype, hv * K + c, s);
    }
  }
  if (p.dA_log != nullptr) {
    float s = 0.f;
    for (int64_t t = threadIdx.x; t < slots; t += blockDim.x)
      for (int j = 0; j < p.NKS; ++j) s += p.dA_part[(t * p.HV + hv) * p.NKS + j];
    red[threadIdx.x] = s;
    __syncthreads();
    for (int w = kBwdThreads / 2; w > 0; w >>= 1) {
      if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
      __syncthreads();
    }
    if (threadIdx.x == 0) store_any(p.dA_log, p.a_log_dtype, hv, red[0]);
  }
}

}  // namespace bwd
}  // namespace cuda
}  // namespace kda_ext

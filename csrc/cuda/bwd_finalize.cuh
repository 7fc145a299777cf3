// kda_ext CUDA backward: sequence bookkeeping, GVA/l2norm reduction of dq/dk, dbeta, and the deterministic dA_log/ddt_bias reduction.
#pragma once

#include "cuda/bwd_common.cuh"

namespace kda_ext {
namespace cuda {
namespace bwd {

constexpr int kBwdPrepThreads = 1024;

// Exclusive block-wide scan of one int64 per thread (kBwdPrepThreads threads) with max (identity
// `init`) or sum (identity 0): Hillis-Steele over shared memory, deterministic.
template <bool kMax>
__device__ __forceinline__ int64_t block_scan_exclusive(int64_t x, int64_t init, int64_t* buf) {
  const int tid = threadIdx.x;
  buf[tid] = x;
  __syncthreads();
  for (int off = 1; off < kBwdPrepThreads; off *= 2) {
    const int64_t y = tid >= off ? buf[tid - off] : (kMax ? init : 0);
    __syncthreads();
    buf[tid] = kMax ? (buf[tid] > y ? buf[tid] : y) : buf[tid] + y;
    __syncthreads();
  }
  const int64_t r = tid > 0 ? buf[tid - 1] : (kMax ? init : 0);
  __syncthreads();  // buf is reused by the next scan
  return r;
}

// One block: clamped token offsets and chunk prefix sums of the N sequences, on the device so the
// host never syncs on cu_seqlens. Fixed length: sequence n is batch row n.
//   seq_bounds[n]    = min(T, max(0, cu[0], ..., cu[n]))   (monotone and inside [0, T])
//   chunk_offsets[n] = min(B*NT, sum_{m<n} ceil((seq_bounds[m+1] - seq_bounds[m]) / BT))
// (the same values the earlier one-thread loop produced). Each thread owns a contiguous run of
// the N+1 entries and two block scans join the runs, so thousands of sequences cost microseconds;
// the one-thread loop paid a global-memory latency per sequence.
__global__ void __launch_bounds__(kBwdPrepThreads) bwd_prep_kernel(const ChunkKdaBwdParams p) {
  __shared__ int64_t buf[kBwdPrepThreads];
  const int64_t count = p.N + 1, BT = p.BT, cap = p.B * p.NT;
  const int64_t per = (count + kBwdPrepThreads - 1) / kBwdPrepThreads;
  const int64_t i0 = threadIdx.x * per < count ? threadIdx.x * per : count;
  const int64_t i1 = i0 + per < count ? i0 + per : count;
  auto raw = [&](int64_t n) -> int64_t {
    return p.cu_seqlens_int64 ? static_cast<const int64_t*>(p.cu_seqlens)[n]
                              : static_cast<int64_t>(static_cast<const int32_t*>(p.cu_seqlens)[n]);
  };
  // Pass 1: token bounds (a running maximum clamped into [0, T] for varlen).
  if (p.varlen) {
    int64_t own = 0;
    for (int64_t n = i0; n < i1; ++n) own = own > raw(n) ? own : raw(n);
    int64_t run = block_scan_exclusive<true>(own, 0, buf);
    for (int64_t n = i0; n < i1; ++n) {
      run = run > raw(n) ? run : raw(n);
      p.seq_bounds[n] = run < p.T ? run : p.T;
    }
  } else {
    for (int64_t n = i0; n < i1; ++n) p.seq_bounds[n] = n * p.T;
  }
  __syncthreads();  // every bound written before the chunk counts read their neighbours
  // Pass 2: chunk prefix sums, capped at the slot count.
  int64_t own = 0;
  for (int64_t n = (i0 > 0 ? i0 : 1); n < i1; ++n)
    own += (p.seq_bounds[n] - p.seq_bounds[n - 1] + BT - 1) / BT;
  int64_t run = block_scan_exclusive<false>(own, 0, buf);
  for (int64_t n = i0; n < i1; ++n) {
    if (n > 0) run += (p.seq_bounds[n] - p.seq_bounds[n - 1] + BT - 1) / BT;
    p.chunk_offsets[n] = run < cap ? run : cap;
  }
}

// Four consecutive elements of x as floats: one 8-byte load for fp16/bf16, one 16-byte load for
// fp32 (the caller checked the alignment).
template <typename T>
__device__ __forceinline__ float4 load4_as_float(const T* x) {
  if constexpr (sizeof(T) == 2) {
    const uint2 r = *reinterpret_cast<const uint2*>(x);
    const T* e = reinterpret_cast<const T*>(&r);
    return make_float4(to_float<T>(e[0]), to_float<T>(e[1]), to_float<T>(e[2]), to_float<T>(e[3]));
  } else {
    return *reinterpret_cast<const float4*>(x);
  }
}

template <typename T>
__device__ __forceinline__ void store4_from_float(T* out, float a, float b, float c, float d) {
  if constexpr (sizeof(T) == 2) {
    uint2 r;
    T* e = reinterpret_cast<T*>(&r);
    e[0] = from_float<T>(a), e[1] = from_float<T>(b), e[2] = from_float<T>(c), e[3] = from_float<T>(d);
    *reinterpret_cast<uint2*>(out) = r;
  } else {
    *reinterpret_cast<float4*>(out) = make_float4(a, b, c, d);
  }
}

// One warp per (token, q/k head, which): sums dq_hat (dk_hat) over the head's GVA group in a fixed
// order, applies the l2norm backward dx = rstd (dy - (dy . y) y) with y the rounded normalized
// row, and casts to the input dtype. kPer elements per lane: 4 covers K <= 128, 8 covers K <= 256
// (the host picks the smaller that fits: with 8 at K = 128 half of every lane's loads and stores
// were of columns past K, read again and thrown away).
template <typename T, int kPer>
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
  static_assert(kPer == 4 || kPer == 8, "32 lanes x kPer columns cover K <= 128 or K <= 256");
  // Lane element e is column col(e): 4 consecutive columns per vector when the rows allow it
  // (K % 4 == 0, aligned: one vector load of d and of x and one vector store per 4 columns), else
  // lane-strided scalars. Same per-element arithmetic either way.
  const bool vec = K % 4 == 0 && aligned16(d) && reinterpret_cast<uintptr_t>(x) % (4 * sizeof(T)) == 0 &&
                   reinterpret_cast<uintptr_t>(out) % (4 * sizeof(T)) == 0;
  auto col = [&](int e) -> int64_t { return vec ? 4 * lane + 128 * (e >> 2) + (e & 3) : lane + 32 * e; };
  float dy[kPer], y[kPer];
  float ss = 0.f;
  if (vec) {
    // Branch-free: every lane issues all of its loads (columns past K read column 0 and are
    // zeroed after), so a warp's row is one memory round trip; under `if (c0 < K)` each x load
    // was converted inside the branch and waited for memory before the next one issued (ncu:
    // long-scoreboard stalls 6 of this kernel's 13 cycles per instruction).
    float4 acc[kPer / 4], a[kPer / 4], xr[kPer / 4];
#pragma unroll
    for (int h4 = 0; h4 < kPer / 4; ++h4) {
      const int64_t c0 = 4 * lane + 128 * h4, cc = c0 < K ? c0 : 0;
      acc[h4] = *reinterpret_cast<const float4*>(d + (tok * HV + hq * G) * K + cc);
      xr[h4] = load4_as_float<T>(x + row * K + cc);
    }
    for (int64_t g = 1; g < G; ++g) {  // the other value heads of the group, in order
#pragma unroll
      for (int h4 = 0; h4 < kPer / 4; ++h4) {
        const int64_t c0 = 4 * lane + 128 * h4, cc = c0 < K ? c0 : 0;
        a[h4] = *reinterpret_cast<const float4*>(d + (tok * HV + hq * G + g) * K + cc);
      }
#pragma unroll
      for (int h4 = 0; h4 < kPer / 4; ++h4) {
        acc[h4].x += a[h4].x; acc[h4].y += a[h4].y; acc[h4].z += a[h4].z; acc[h4].w += a[h4].w;
      }
    }
#pragma unroll
    for (int h4 = 0; h4 < kPer / 4; ++h4) {
      const bool in = 4 * lane + 128 * h4 < K;
      dy[4 * h4 + 0] = in ? acc[h4].x : 0.f;
      dy[4 * h4 + 1] = in ? acc[h4].y : 0.f;
      dy[4 * h4 + 2] = in ? acc[h4].z : 0.f;
      dy[4 * h4 + 3] = in ? acc[h4].w : 0.f;
      y[4 * h4 + 0] = in ? xr[h4].x : 0.f;
      y[4 * h4 + 1] = in ? xr[h4].y : 0.f;
      y[4 * h4 + 2] = in ? xr[h4].z : 0.f;
      y[4 * h4 + 3] = in ? xr[h4].w : 0.f;
    }
#pragma unroll
    for (int e = 0; e < kPer; ++e) ss += y[e] * y[e];
  } else {
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int64_t c = col(e);
      float acc = 0.f, xv = 0.f;
      if (c < K) {
        for (int64_t g = 0; g < G; ++g) acc += d[(tok * HV + hq * G + g) * K + c];
        xv = to_float<T>(x[row * K + c]);
      }
      dy[e] = acc;
      y[e] = xv;
      ss += xv * xv;
    }
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
  if (vec) {
#pragma unroll
    for (int h4 = 0; h4 < kPer / 4; ++h4) {
      const int64_t c0 = 4 * lane + 128 * h4;  // K % 4 == 0: the vector is whole or past K
      if (c0 < K)
        store4_from_float<T>(out + row * K + c0, dy[4 * h4], dy[4 * h4 + 1], dy[4 * h4 + 2], dy[4 * h4 + 3]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int64_t c = col(e);
      if (c < K) out[row * K + c] = from_float<T>(dy[e]);
    }
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

// kda_ext CUDA: the fused_recurrent_kda (decode) kernel: the token-by-token KDA recurrence with
// the state held in registers across a sequence's tokens.
//
// Design (what decode needs: at T = 1 the kernel only moves states, 64 KiB read + 64 KiB written
// per (sequence, head) at K = V = 128, against a few hundred bytes of q/k/v/g):
// - One CTA of 128 threads per (sequence, value head, slice of kBV = 32 value columns), the whole
//   K in the CTA: 256 x 32 x 4 = 32768 CTAs at the main decode shape, and every k.S and q.S
//   reduction stays inside the CTA. Each state element is read once (at the start) and written
//   once (at the end), with 16-byte streaming accesses (ld/st .cs: the state is touched once)
//   where K and V allow it (kVec = 4), else 4-byte ones; consecutive threads touch consecutive
//   addresses in both layouts, so every warp access is whole 128-byte lines.
// - The tile geometry depends on which dim is contiguous in memory:
//   [K, V] (state_v_first = false): rows are k. A thread owns kVec consecutive columns of
//     kRowsPT rows strided by kRowGroups; the k-reductions go lanes -> shuffles, warps -> shared
//     memory (two barriers a token besides the input one).
//   [V, K] (state_v_first = true): rows are v, warp w owns rows 8w .. 8w+7 whole, a lane kVec
//     consecutive k of each row (kColIters strided chunks). A row's k-reduction is one warp's:
//     the eight rows' sums are reduced together by a transposed butterfly (9 shuffles, not 40),
//     no shared memory and no barrier.
// - Per token the inputs (q, k, g of one head, a 32-column slice of v, beta) are staged in
//   shared memory (double-buffered by token parity: one barrier a token), the in-kernel gate and
//   beta sigmoid applied once, and the next token's inputs are loaded into registers before the
//   current token's state work, so at T > 1 their latency is hidden. The l2norm is folded into
//   scalars (rsqrt of the sums of squares, reduced in the same barrier): k̂.S = r_k (k.S),
//   S += k̂ d^T = k (r_k d)^T, o = scale r_q (q.S).
// - Sequences: fixed length (sequence n = rows n*T ..) or cu_seqlens read on the device, each
//   clamped to [0, T) (no host sync; bad offsets cannot make it read or write out of bounds).
//   State slots (ssm_state_indices) are read per CTA; a negative slot is padding (outputs 0,
//   nothing else touched), one >= num_slots is out of range (outputs NaN, nothing else touched).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/fused_recurrent_params.h"
#include "cuda/mma.cuh"  // to_float, from_float

namespace kda_ext {
namespace cuda {
namespace recurrent {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kBV = 32;  // value columns per CTA
constexpr unsigned kFullMask = 0xffffffffu;

// g and beta come in their own float dtypes (a run-time tag, not more instantiations). The same
// loads as mma.cuh's load_any, kept apart only because load_any's case order compiles this kernel
// to a different branch layout than the one measured on a GPU; fold it in with the next change
// that is measured there.
__device__ __forceinline__ float load_tagged(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kFloat64: return static_cast<float>(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ int64_t load_index(const void* p, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(p)[i]
                  : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// Softplus with the reference kernels' threshold (x > 20 returns x).
__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

// Sums each of a[0..7] over the 32 lanes of the warp. Lane l ends with the total of a[(l >> 2) & 7]:
// three halving exchanges (4 + 2 + 1 shuffles) leave one value per lane summed over 8 lanes,
// then two plain steps finish the sum over the remaining 4 lanes of each group.
__device__ __forceinline__ float warp_sum8_transposed(const float (&a)[8], int lane) {
  float b[4], c[2];
  const bool hi16 = lane & 16, hi8 = lane & 8, hi4 = lane & 4;
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const float send = hi16 ? a[m] : a[m + 4];
    b[m] = (hi16 ? a[m + 4] : a[m]) + __shfl_xor_sync(kFullMask, send, 16);
  }
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    const float send = hi8 ? b[m] : b[m + 2];
    c[m] = (hi8 ? b[m + 2] : b[m]) + __shfl_xor_sync(kFullMask, send, 8);
  }
  float d = (hi4 ? c[1] : c[0]) + __shfl_xor_sync(kFullMask, hi4 ? c[0] : c[1], 4);
  d += __shfl_xor_sync(kFullMask, d, 2);
  d += __shfl_xor_sync(kFullMask, d, 1);
  return d;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

// Which state elements a thread owns. Element (i, c) of a thread is at `row(i) * ld + col(c)` of
// the (sequence, head) tile, where ld is the contiguous dim (V for [K, V], K for [V, K]); c runs
// over kCols = kColIters * kVec columns (kVec consecutive ones per chunk).
template <bool kVFirst, int kVec, int kKMax, int kCtaCols>
struct Tile;

// [K, V]: rows are k (kKMax of them), columns the CTA's kCtaCols value columns.
template <int kVec, int kKMax, int kCtaCols>
struct Tile<false, kVec, kKMax, kCtaCols> {
  static constexpr int kColGroups = kCtaCols / kVec;
  static constexpr int kRowGroups = kThreads / kColGroups;
  static constexpr int kRows = kKMax / kRowGroups;
  static constexpr int kColIters = 1;
  static constexpr int kCols = kVec;
  static_assert(kRows * kRowGroups == kKMax, "rows must tile kKMax");
  __device__ static int row(int tid, int i) { return tid / kColGroups + i * kRowGroups; }
  __device__ static int col(int tid, int c) { return (tid % kColGroups) * kVec + c; }
};

// [V, K]: rows are the CTA's kBV value rows (warp w: rows 8w .. 8w+7), columns k.
template <int kVec, int kKMax, int kCtaCols>
struct Tile<true, kVec, kKMax, kCtaCols> {
  static_assert(kCtaCols == kBV, "the [V, K] tile has 32 value rows");
  static constexpr int kRows = kBV / kWarps;
  static constexpr int kColIters = (kKMax + 32 * kVec - 1) / (32 * kVec);
  static constexpr int kCols = kColIters * kVec;
  static_assert(kRows == 8, "the transposed warp reduction sums eight rows");
  __device__ static int row(int tid, int i) { return (tid / 32) * kRows + i; }
  __device__ static int col(int tid, int c) {
    return (c / kVec) * 32 * kVec + (tid % 32) * kVec + c % kVec;
  }
};

struct GateParams {
  bool in_kernel, lower_bound_gate;
  float a, lb;
};

// The per-head constants of the gate.
__device__ __forceinline__ GateParams gate_params(const FusedRecurrentParams& p, int64_t hv) {
  GateParams gp;
  gp.in_kernel = p.use_gate_in_kernel;
  gp.lower_bound_gate = p.use_lower_bound_gate;
  gp.lb = p.lower_bound;
  gp.a = (p.use_gate_in_kernel && p.A_log != nullptr) ? expf(p.A_log[hv]) : 1.f;
  return gp;
}

// The per-step log decay from g's stored value (identity unless the gate is in the kernel).
__device__ __forceinline__ float gate_value(float graw, float bias, const GateParams& gp) {
  if (!gp.in_kernel) return graw;
  const float x = graw + bias;
  return gp.lower_bound_gate ? gp.lb * sigmoid_f(gp.a * x) : -gp.a * softplus_f(x);
}

// beta from its stored value (sigmoid, doubled for negative eigenvalues, when in the kernel).
__device__ __forceinline__ float beta_value(const FusedRecurrentParams& p, float raw) {
  float b = raw;
  if (p.use_beta_sigmoid) b = (p.allow_neg_eigval ? 2.f : 1.f) * sigmoid_f(b);
  return b;
}

// The l2norm scalars 1/|q|, 1/|k| of a token from the per-warp sums of squares (1, 1 without it).
template <int kNumWarps>
__device__ __forceinline__ void l2norm_scalars(const FusedRecurrentParams& p,
                                               const float (&sumsq)[kNumWarps][2], float& rq,
                                               float& rk) {
  rq = rk = 1.f;
  if (!p.use_qk_l2norm) return;
  float sq = 0.f, sk = 0.f;
#pragma unroll
  for (int w = 0; w < kNumWarps; ++w) {
    sq += sumsq[w][0];
    sk += sumsq[w][1];
  }
  rq = 1.f / sqrtf(sq + 1e-6f);
  rk = 1.f / sqrtf(sk + 1e-6f);
}

// CTAs an SM must hold at once (__launch_bounds__' floor): at T = 1 the bytes in flight per SM
// are this many state tiles (16 KiB at K = 128). Unbounded, ptxas took ~120 registers for the
// [V, K] tile (4 CTAs per SM) though 80 hold it without spilling (6 per SM). The [K, V] tile
// takes 76 by itself (6 per SM) and spills when held to 80; the other instantiations (odd K/V
// and K > 128) spill under any floor that raises their occupancy, so they keep ptxas's choice,
// except the [V, K] 4-byte K <= 64 one, which spilled 4 bytes at ptxas's choice of 72 and holds
// in 80, and the [K, V] 16-byte K <= 64 one, which spilled 4 bytes at ptxas's choice of 56 and
// holds in 72 (ptxas -v, sm_90a, nvcc 13.0).
template <bool kVFirst, int kVec, int kKMax>
constexpr int min_blocks_per_sm() {
  if (kVFirst && kVec == 4 && kKMax <= 128) return 6;
  if (kVFirst && kVec == 1 && kKMax <= 64) return 5;
  if (!kVFirst && kVec == 4 && kKMax <= 64) return 7;
  return 0;  // no floor: ptxas's own choice
}

template <typename Tin, bool kVFirst, int kVec, int kKMax, int kCtaCols = kBV>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<kVFirst, kVec, kKMax>())
    fused_recurrent_kda_kernel(const FusedRecurrentParams p) {
  static_assert(kCtaCols <= kThreads, "one thread stages each value column");
  using Geo = Tile<kVFirst, kVec, kKMax, kCtaCols>;
  constexpr int kRows = Geo::kRows, kCols = Geo::kCols;
  // Shared rows of q/k/decay cover every column a thread may touch (masked ones read zeros).
  constexpr int kSmemK = kKMax > kThreads ? kKMax : kThreads;
  constexpr int kPerThread = kSmemK / kThreads;  // input elements a thread stages per token

  __shared__ float s_q[2][kSmemK], s_k[2][kSmemK], s_decay[2][kSmemK];
  __shared__ float s_v[2][kCtaCols];
  __shared__ float s_beta[2];
  __shared__ float s_sumsq[2][kWarps][2];
  __shared__ float s_pred[kWarps][kCtaCols], s_out[kWarps][kCtaCols];  // [K, V] layout only

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t K = p.K, V = p.V, H = p.H, HV = p.HV;
  // The CTA's (sequence, head, slice) in 32-bit arithmetic (the launcher bounds the grid by
  // 2^31): 64-bit divisions are subroutine calls of ~70 instructions each, and the state loads'
  // addresses wait on them.
  const unsigned num_slices = static_cast<unsigned>((V + kCtaCols - 1) / kCtaCols);
  const unsigned nh = blockIdx.x / num_slices;
  const int v0 = static_cast<int>(blockIdx.x - nh * num_slices) * kCtaCols;
  const unsigned hv32 = nh % static_cast<unsigned>(HV);
  const int64_t hv = hv32, n = nh / static_cast<unsigned>(HV);
  const int64_t h = hv32 / (static_cast<unsigned>(HV) / static_cast<unsigned>(H));

  int64_t bos, eos;
  if (p.cu_seqlens != nullptr) {
    // Clamped, so that offsets nobody validated (no host sync) cannot move reads out of bounds.
    bos = load_index(p.cu_seqlens, p.cu_seqlens_int64, n);
    eos = load_index(p.cu_seqlens, p.cu_seqlens_int64, n + 1);
    bos = bos < 0 ? 0 : (bos > p.T ? p.T : bos);
    eos = eos < bos ? bos : (eos > p.T ? p.T : eos);
  } else {
    bos = n * p.T;
    eos = bos + p.T;
  }
  // Issued now, waited on at the state loads: the token's inputs below do not depend on it.
  const int64_t slot = p.slots != nullptr ? load_index(p.slots, p.slots_int64, n) : n;

  // ---- per-head constants of the gate ---------------------------------------------------------
  const GateParams gp = gate_params(p, hv);
  float bias[kPerThread];
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int64_t kk = tid + e * kThreads;
    bias[e] = (p.use_gate_in_kernel && p.dt_bias != nullptr && kk < K) ? p.dt_bias[hv * K + kk]
                                                                         : 0.f;
  }

  // ---- the token inputs, loaded one token ahead (the first one before the state) --------------
  const Tin* const q = static_cast<const Tin*>(p.q);
  const Tin* const kp = static_cast<const Tin*>(p.k);
  const Tin* const vp = static_cast<const Tin*>(p.v);
  float in_q[kPerThread], in_k[kPerThread], in_g[kPerThread], in_v = 0.f, in_beta = 0.f;
  auto load_token = [&](int64_t r) {
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int64_t kk = tid + e * kThreads;
      const bool in = kk < K;
      in_q[e] = in ? to_float(q[(r * H + h) * K + kk]) : 0.f;
      in_k[e] = in ? to_float(kp[(r * H + h) * K + kk]) : 0.f;
      in_g[e] = in ? load_tagged(p.g, p.g_dtype, (r * HV + hv) * K + kk) : 0.f;
    }
    if (tid < kCtaCols) in_v = v0 + tid < V ? to_float(vp[(r * HV + hv) * V + v0 + tid]) : 0.f;
    if (tid == 0) in_beta = load_tagged(p.beta, p.beta_dtype, r * HV + hv);
  };
  if (bos < eos) load_token(bos);

  const int64_t head_off = hv * K * V;
  Tin* const o = static_cast<Tin*>(p.o);

  if (slot < 0 || slot >= p.num_slots) {
    // Padding (negative) gives zeros; an out-of-range slot, which the host could not check
    // without a sync, gives NaN so that the mistake shows. The pool is not touched.
    const float fill = slot < 0 ? 0.f : __int_as_float(0x7fc00000);
    for (int64_t r = bos; r < eos; ++r)
      if (tid < kCtaCols && v0 + tid < V) o[(r * HV + hv) * V + v0 + tid] = from_float<Tin>(fill);
    if (p.state_out != nullptr && !p.out_by_slot) {
      float* dst = p.state_out + n * p.state_out_stride + head_off;
      for (int64_t e = tid; e < K * kCtaCols; e += kThreads) {
        const int64_t kk = e / kCtaCols, vv = v0 + e % kCtaCols;
        if (vv < V) dst[kVFirst ? vv * K + kk : kk * V + vv] = fill;
      }
    }
    return;
  }

  // ---- the state tile: every load issued before anything waits on one ----------------------
  const int64_t ld = kVFirst ? K : V;  // the contiguous dim
  const int64_t row_limit = kVFirst ? V : K, col_limit = kVFirst ? K : V;
  const int row0 = kVFirst ? v0 : 0, col0 = kVFirst ? 0 : v0;
  // A whole tile in range (a full slice of value rows or columns, and K exactly the k extent
  // the thread geometry covers: kKMax rows for [K, V], 32 lanes x kCols columns for [V, K], which
  // exceeds kKMax = 64 with 16-byte vectors) needs no per-element bounds: one base offset and a
  // fixed row stride.
  const bool whole_tile =
      V - v0 >= kCtaCols && K == (kVFirst ? 32 * kCols : kKMax);
  const int64_t tile_base = (row0 + Geo::row(tid, 0)) * ld + col0 + Geo::col(tid, 0);
  const int64_t row_step = (Geo::row(tid, 1 % kRows) - Geo::row(tid, 0)) * ld;  // uniform
  auto elem_offset = [&](int i, int c) {  // of element (i, c) of the thread, whole tiles only
    return tile_base + i * row_step + (Geo::col(tid, c) - Geo::col(tid, 0));
  };
  float s[kRows][kCols];
  const float* src = p.state_in != nullptr ? p.state_in + slot * p.state_in_stride + head_off
                                           : nullptr;
  if (src != nullptr && whole_tile) {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int c = 0; c < kCols; c += kVec) {
        if constexpr (kVec == 4) {
          const float4 x = __ldcs(reinterpret_cast<const float4*>(src + elem_offset(i, c)));
          s[i][c] = x.x;
          s[i][c + 1] = x.y;
          s[i][c + 2] = x.z;
          s[i][c + 3] = x.w;
        } else {
          s[i][c] = __ldcs(src + elem_offset(i, c));
        }
      }
  } else {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t r = row0 + Geo::row(tid, i);
#pragma unroll
      for (int c = 0; c < kCols; c += kVec) {
        const int64_t cc = col0 + Geo::col(tid, c);
        // With kVec = 4 the contiguous dim is a multiple of 4: a vector is all in or all out.
        const bool in = src != nullptr && r < row_limit && cc < col_limit;
        if constexpr (kVec == 4) {
          float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
          if (in) x = __ldcs(reinterpret_cast<const float4*>(src + r * ld + cc));
          s[i][c] = x.x;
          s[i][c + 1] = x.y;
          s[i][c + 2] = x.z;
          s[i][c + 3] = x.w;
        } else {
          s[i][c] = in ? __ldcs(src + r * ld + cc) : 0.f;
        }
      }
    }
  }

  int buf = 0;
  for (int64_t r = bos; r < eos; ++r, buf ^= 1) {
    // Stage this token's inputs (zeros past K) and the partial sums of squares of q and k.
    float qq = 0.f, kk2 = 0.f;
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int64_t kk = tid + e * kThreads;
      s_q[buf][kk] = in_q[e];
      s_k[buf][kk] = in_k[e];
      s_decay[buf][kk] = kk < K ? expf(gate_value(in_g[e], bias[e], gp)) : 0.f;
      qq += in_q[e] * in_q[e];
      kk2 += in_k[e] * in_k[e];
    }
    if (p.use_qk_l2norm) {
      qq = warp_sum(qq);
      kk2 = warp_sum(kk2);
      if (lane == 0) {
        s_sumsq[buf][warp][0] = qq;
        s_sumsq[buf][warp][1] = kk2;
      }
    }
    if (tid < kCtaCols) s_v[buf][tid] = in_v;
    if (tid == 0) s_beta[buf] = beta_value(p, in_beta);
    if (r + 1 < eos) load_token(r + 1);
    __syncthreads();

    float rq, rk;
    l2norm_scalars(p, s_sumsq[buf], rq, rk);
    const float beta = s_beta[buf];
    const float q_scale = p.scale * rq;

    if constexpr (!kVFirst) {
      // Columns are values: pred[c] = sum over this thread's rows of k * (decayed S).
      float acc[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[c] = 0.f;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int kr = Geo::row(tid, i);
        const float d = s_decay[buf][kr], kv = s_k[buf][kr];
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          s[i][c] *= d;
          acc[c] = fmaf(kv, s[i][c], acc[c]);
        }
      }
      // Lanes of one warp that share columns differ in the bits above the column group.
#pragma unroll
      for (int off = Geo::kColGroups; off < 32; off <<= 1)
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[c] += __shfl_xor_sync(kFullMask, acc[c], off);
      if (lane < Geo::kColGroups)
#pragma unroll
        for (int c = 0; c < kCols; ++c) s_pred[warp][Geo::col(tid, c)] = acc[c];
      __syncthreads();
      float dl[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int vc = Geo::col(tid, c);
        float pred = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) pred += s_pred[w][vc];
        dl[c] = rk * beta * (s_v[buf][vc] - rk * pred);
        acc[c] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int kr = Geo::row(tid, i);
        const float kv = s_k[buf][kr], qv = s_q[buf][kr];
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          s[i][c] = fmaf(kv, dl[c], s[i][c]);
          acc[c] = fmaf(qv, s[i][c], acc[c]);
        }
      }
#pragma unroll
      for (int off = Geo::kColGroups; off < 32; off <<= 1)
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[c] += __shfl_xor_sync(kFullMask, acc[c], off);
      if (lane < Geo::kColGroups)
#pragma unroll
        for (int c = 0; c < kCols; ++c) s_out[warp][Geo::col(tid, c)] = acc[c];
      __syncthreads();
      if (tid < kCtaCols && v0 + tid < V) {
        float out = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) out += s_out[w][tid];
        o[(r * HV + hv) * V + v0 + tid] = from_float<Tin>(q_scale * out);
      }
    } else {
      // Rows are values, each row within one warp: per-row sums over k by warp reductions.
      float kv[kCols], dv[kCols], qv[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int kc = Geo::col(tid, c);
        kv[c] = s_k[buf][kc];
        dv[c] = s_decay[buf][kc];
        qv[c] = s_q[buf][kc];
      }
      float acc[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        acc[i] = 0.f;
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          s[i][c] *= dv[c];
          acc[i] = fmaf(kv[c], s[i][c], acc[i]);
        }
      }
      const int my_row = (lane >> 2) & 7;  // the row whose total this lane receives
      const float pred = warp_sum8_transposed(acc, lane);
      const float my_dl = rk * beta * (s_v[buf][warp * kRows + my_row] - rk * pred);
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const float dl = __shfl_sync(kFullMask, my_dl, i * 4);
        acc[i] = 0.f;
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          s[i][c] = fmaf(kv[c], dl, s[i][c]);
          acc[i] = fmaf(qv[c], s[i][c], acc[i]);
        }
      }
      const float out = warp_sum8_transposed(acc, lane);
      const int vv = v0 + warp * kRows + my_row;
      if ((lane & 3) == 0 && vv < V) o[(r * HV + hv) * V + vv] = from_float<Tin>(q_scale * out);
    }
  }

  // ---- the final state: written once --------------------------------------------------------
  if (p.state_out == nullptr || (p.out_by_slot && bos == eos)) return;  // in place, no token: unchanged
  float* dst = p.state_out + (p.out_by_slot ? slot : n) * p.state_out_stride + head_off;
  if (whole_tile) {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int c = 0; c < kCols; c += kVec) {
        if constexpr (kVec == 4) {
          __stcs(reinterpret_cast<float4*>(dst + elem_offset(i, c)),
                 make_float4(s[i][c], s[i][c + 1], s[i][c + 2], s[i][c + 3]));
        } else {
          __stcs(dst + elem_offset(i, c), s[i][c]);
        }
      }
    return;
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int64_t r = row0 + Geo::row(tid, i);
#pragma unroll
    for (int c = 0; c < kCols; c += kVec) {
      const int64_t cc = col0 + Geo::col(tid, c);
      if (r < row_limit && cc < col_limit) {
        if constexpr (kVec == 4) {
          __stcs(reinterpret_cast<float4*>(dst + r * ld + cc),
                 make_float4(s[i][c], s[i][c + 1], s[i][c + 2], s[i][c + 3]));
        } else {
          __stcs(dst + r * ld + cc, s[i][c]);
        }
      }
    }
  }
}

// The [K, V] layout at K = V = kD (128: the Kimi models' heads), whole tiles: one CTA of kD threads
// per (sequence, value head), thread c owns value column c of all kD k rows (kD fp32 registers).
// Why not the sliced tile above: a 32-column slice of a [K, V] tile is kD pieces of 128 bytes, 4 *
// kD bytes apart, and that layout ran at 1.40x its HBM floor where the [V, K] one (one contiguous
// block a CTA) ran at 1.24x; here each warp load is one 128-byte row segment and the CTA streams
// its contiguous tile by whole rows. Every k-reduction stays in the thread (no shuffles, no
// shared-memory reduction), one barrier a token for the staged q, k and decay. Same semantics as
// the sliced kernel (slots, padding, in place, varlen, every gate and flag).
// CTAs an SM for __launch_bounds__: 3 holds ptxas to 168 registers (12 bytes of spills); without a
// floor it takes 228 (2 CTAs an SM). On an H100 the floor of 3 measured 0.379 / 0.380 ms functional /
// in place against 0.383 / 0.391 (docs/perf-notes.md, session 13).
constexpr int kKvColumnMinBlocks = 3;

template <typename Tin, int kD, int kMinBlocks>
__global__ void __launch_bounds__(kD, kMinBlocks)
    fused_recurrent_kv_column_kernel(const FusedRecurrentParams p) {
  constexpr int kNumWarps = kD / 32;
  // s_k2: a second copy of k for the update loop: reading the same addresses twice, ptxas keeps the
  // first loop's kD k values in registers for the second (255 registers and spills at kD = 128).
  __shared__ __align__(16) float s_q[2][kD], s_k[2][kD], s_k2[2][kD], s_decay[2][kD];
  __shared__ float s_sumsq[2][kNumWarps][2];
  __shared__ float s_beta[2];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned HV = static_cast<unsigned>(p.HV), H = static_cast<unsigned>(p.H);
  const unsigned n = blockIdx.x / HV, hv = blockIdx.x - n * HV;
  const unsigned h = hv / (HV / H);
  // The sliced kernel's sequence rows, written out again: moved into a shared helper they
  // changed the sliced kernels' index code (SASS), which has not been re-measured since.
  int64_t bos, eos;
  if (p.cu_seqlens != nullptr) {
    bos = load_index(p.cu_seqlens, p.cu_seqlens_int64, n);
    eos = load_index(p.cu_seqlens, p.cu_seqlens_int64, n + 1);
    bos = bos < 0 ? 0 : (bos > p.T ? p.T : bos);
    eos = eos < bos ? bos : (eos > p.T ? p.T : eos);
  } else {
    bos = static_cast<int64_t>(n) * p.T;
    eos = bos + p.T;
  }
  const int64_t slot = p.slots != nullptr ? load_index(p.slots, p.slots_int64, n) : n;
  const GateParams gp = gate_params(p, hv);
  const float bias =
      (p.use_gate_in_kernel && p.dt_bias != nullptr) ? p.dt_bias[hv * kD + tid] : 0.f;
  const Tin* q = static_cast<const Tin*>(p.q);
  const Tin* kp = static_cast<const Tin*>(p.k);
  const Tin* vp = static_cast<const Tin*>(p.v);
  Tin* o = static_cast<Tin*>(p.o);
  float in_q = 0.f, in_k = 0.f, in_g = 0.f, in_v = 0.f, in_beta = 0.f;
  auto load_token = [&](int64_t r) {
    in_q = to_float(q[(r * H + h) * kD + tid]);
    in_k = to_float(kp[(r * H + h) * kD + tid]);
    in_g = load_tagged(p.g, p.g_dtype, (r * HV + hv) * kD + tid);
    in_v = to_float(vp[(r * HV + hv) * kD + tid]);
    if (tid == 0) in_beta = load_tagged(p.beta, p.beta_dtype, r * HV + hv);
  };
  if (bos < eos) load_token(bos);
  const int64_t head_off = static_cast<int64_t>(hv) * kD * kD;
  if (slot < 0 || slot >= p.num_slots) {
    const float fill = slot < 0 ? 0.f : __int_as_float(0x7fc00000);
    for (int64_t r = bos; r < eos; ++r) o[(r * HV + hv) * kD + tid] = from_float<Tin>(fill);
    if (p.state_out != nullptr && !p.out_by_slot) {
      float* dst = p.state_out + static_cast<int64_t>(n) * p.state_out_stride + head_off;
      for (int kk = 0; kk < kD; ++kk) dst[kk * kD + tid] = fill;
    }
    return;
  }
  float s[kD];
  const float* src =
      p.state_in != nullptr ? p.state_in + slot * p.state_in_stride + head_off : nullptr;
  if (src != nullptr) {
#pragma unroll
    for (int kk = 0; kk < kD; ++kk) s[kk] = src[kk * kD + tid];
  } else {
#pragma unroll
    for (int kk = 0; kk < kD; ++kk) s[kk] = 0.f;
  }
  int buf = 0;
  for (int64_t r = bos; r < eos; ++r, buf ^= 1) {
    s_q[buf][tid] = in_q;
    s_k[buf][tid] = in_k;
    s_k2[buf][tid] = in_k;
    s_decay[buf][tid] = expf(gate_value(in_g, bias, gp));
    if (p.use_qk_l2norm) {
      const float qq = warp_sum(in_q * in_q), kk2 = warp_sum(in_k * in_k);
      if (lane == 0) {
        s_sumsq[buf][warp][0] = qq;
        s_sumsq[buf][warp][1] = kk2;
      }
    }
    if (tid == 0) s_beta[buf] = beta_value(p, in_beta);
    const float v_here = in_v;
    if (r + 1 < eos) load_token(r + 1);
    __syncthreads();
    float rq, rk;
    l2norm_scalars(p, s_sumsq[buf], rq, rk);
    const float beta = s_beta[buf];
    // pred = sum_k k_k (decay_k S[k][c]); four partial sums for a shorter dependency chain
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD; kk += 4) {
      const float4 d = *reinterpret_cast<const float4*>(&s_decay[buf][kk]);
      const float4 kv = *reinterpret_cast<const float4*>(&s_k[buf][kk]);
      s[kk] *= d.x;
      s[kk + 1] *= d.y;
      s[kk + 2] *= d.z;
      s[kk + 3] *= d.w;
      a0 = fmaf(kv.x, s[kk], a0);
      a1 = fmaf(kv.y, s[kk + 1], a1);
      a2 = fmaf(kv.z, s[kk + 2], a2);
      a3 = fmaf(kv.w, s[kk + 3], a3);
    }
    const float pred = (a0 + a1) + (a2 + a3);
    const float dl = rk * beta * (v_here - rk * pred);
    a0 = a1 = a2 = a3 = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD; kk += 4) {
      const float4 kv = *reinterpret_cast<const float4*>(&s_k2[buf][kk]);
      const float4 qv = *reinterpret_cast<const float4*>(&s_q[buf][kk]);
      s[kk] = fmaf(kv.x, dl, s[kk]);
      s[kk + 1] = fmaf(kv.y, dl, s[kk + 1]);
      s[kk + 2] = fmaf(kv.z, dl, s[kk + 2]);
      s[kk + 3] = fmaf(kv.w, dl, s[kk + 3]);
      a0 = fmaf(qv.x, s[kk], a0);
      a1 = fmaf(qv.y, s[kk + 1], a1);
      a2 = fmaf(qv.z, s[kk + 2], a2);
      a3 = fmaf(qv.w, s[kk + 3], a3);
    }
    o[(r * HV + hv) * kD + tid] = from_float<Tin>(p.scale * rq * ((a0 + a1) + (a2 + a3)));
  }
  if (p.state_out == nullptr || (p.out_by_slot && bos == eos)) return;
  float* dst = p.state_out +
               (p.out_by_slot ? slot : static_cast<int64_t>(n)) * p.state_out_stride + head_off;
#pragma unroll
  for (int kk = 0; kk < kD; ++kk) dst[kk * kD + tid] = s[kk];
}

}  // namespace recurrent
}  // namespace cuda
}  // namespace kda_ext

// kda_ext CUDA backward: shared device helpers (chunk lookup, loads/stores, shared-memory GEMM).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/bwd_params.cuh"
#include "cuda/mma.cuh"

namespace kda_ext {
namespace cuda {
// Backward-only helpers live in their own namespace so that names the forward's headers may
// add later never collide with them.
namespace bwd {

// Shared-memory tiles are fp32 with a 4-float pad per row: wmma wants ld % 4 == 0 and 32-byte
// aligned tile origins (every origin used here is a multiple of 8 floats), the pad breaks the
// worst bank conflicts of column-major fragment loads.
constexpr int kTileLd = kBwdVTile + 4;  // 64-column tiles
// The same 64-column tiles kept in fp16/bf16 (operands of smem_gemm16): rows padded by 8 elements
// (wmma: ld % 8 == 0 for 16-bit types; 144-byte rows put the 8 rows of an ldmatrix phase on
// different banks). Every origin used is a multiple of 16 rows (a multiple of 32 bytes).
constexpr int kTileLd16 = kBwdVTile + 8;

__device__ __forceinline__ void store_any(void* p, DType dt, int64_t i, float x) {
  switch (dt) {
    case DType::kFloat16:
      static_cast<__half*>(p)[i] = __float2half_rn(x);
      break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
      break;
    case DType::kFloat64:
      static_cast<double*>(p)[i] = static_cast<double>(x);
      break;
    case DType::kFloat32:
    default:
      static_cast<float*>(p)[i] = x;
      break;
  }
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

// Two fp32 values as a packed pair of T (fp16/bf16, round to nearest: the same bits as two
// from_float<T>), a first (lower address).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 x = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&x);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 x = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&x);
}

// One 16-byte vector of T (4 fp32 or 8 fp16/bf16 elements) at dst from the fp32 values at src,
// rounded to T; both 16-byte aligned. For the workspaces stored in the input dtype (dh, dvn).
template <typename T>
__device__ __forceinline__ void store_vec16(T* dst, const float* src) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(dst) = *reinterpret_cast<const float4*>(src);
  } else {
    const float4 a = reinterpret_cast<const float4*>(src)[0];
    const float4 b = reinterpret_cast<const float4*>(src)[1];
    *reinterpret_cast<uint4*>(dst) = make_uint4(pack2<T>(a.x, a.y), pack2<T>(a.z, a.w),
                                                pack2<T>(b.x, b.y), pack2<T>(b.z, b.w));
  }
}

// One chunk of one sequence: tokens [tok0, tok0 + len) (global token index b*T + t), h slot.
struct BwdChunk {
  int64_t tok0;
  int64_t slot;
  int len;
};

// Maps an h slot to its chunk through the prefix sums written by bwd_prep_kernel. Slots past the
// last real chunk (the varlen upper bound) and empty chunks return false. BT (== p.BT) is the
// kernels' compile-time chunk size.
template <int BT>
__device__ __forceinline__ bool bwd_chunk_of_slot(const ChunkKdaBwdParams& p, int64_t slot,
                                                  BwdChunk& c) {
  const int64_t total = p.chunk_offsets[p.N];
  if (slot < 0 || slot >= total || slot >= p.B * p.NT) return false;
  // Largest n with chunk_offsets[n] <= slot; empty sequences share an offset with the next one
  // and are skipped because the search keeps the last of equal offsets.
  int64_t lo = 0, hi = p.N;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    if (p.chunk_offsets[mid] <= slot) lo = mid; else hi = mid;
  }
  const int64_t i = slot - p.chunk_offsets[lo];
  const int64_t bos = p.seq_bounds[lo], eos = p.seq_bounds[lo + 1];
  c.tok0 = bos + i * BT;
  const int64_t len = eos - c.tok0;
  if (len <= 0) return false;
  c.len = static_cast<int>(len < BT ? len : BT);
  c.slot = slot;
  return true;
}

// Offset of state element (k, v) of a [K,V] / [V,K] state block; K and V passed in (compile-time
// constants in the fixed-size chunk kernels, see kv_size) or taken from p.
__device__ __forceinline__ int64_t state_off(const ChunkKdaBwdParams& p, int64_t base, int k, int v,
                                             int64_t K, int64_t V) {
  return p.state_v_first ? (base * V + v) * K + k : (base * K + k) * V + v;
}
__device__ __forceinline__ int64_t state_off(const ChunkKdaBwdParams& p, int64_t base, int k,
                                             int v) {
  return state_off(p, base, k, v, p.K, p.V);
}

// Compile-time K and V of the per-chunk kernels (bwd_chunk.cuh): kFixedKV = 0 builds take any K, V
// from the parameters; kFixedKV != 0 builds are for K == V == kFixedKV exactly (the launch layer
// dispatches K == V == 128 to them). Why: those kernels are issue-bound, mostly on integer
// address arithmetic and fp32 element work rather than MMAs. With K and V constants the K-slice
// width is 64, every `k0 + c < K` / `v0 + c < V` mask and clamp of a whole slice / V tile is true
// (kWholeKV), K % 8 and V % 8 are known, the 64-bit multiplies by K and V of the offsets become
// shifts, and the V-tile loops have a constant trip count. Only folding: results are bitwise the
// same as the general build's.
template <int kFixedKV>
__device__ __forceinline__ int64_t kv_size(int64_t runtime) {
  static_assert(kFixedKV >= 0 && kFixedKV % 64 == 0 && kFixedKV <= 256,
                "kFixedKV: 0 (any) or a multiple of the 64-wide K slice / V tile up to 256");
  return kFixedKV != 0 ? kFixedKV : runtime;
}
// Every K slice [k0, k0 + 64) and V tile [v0, v0 + 64) lies inside K and V.
template <int kFixedKV>
constexpr bool kWholeKV = kFixedKV != 0;

// Which products take 3xTF32. Kernel C's always do: its intra-chunk terms feed the gate
// gradient dG directly, and one tf32 pass there took dA_log / ddt_bias past FLA's tolerance
// (error/tolerance 1.20 at fp16 with -1000 gates; 0.71 with the split). Kernels A, B and
// bwd_state split only for fp32 inputs (the accuracy an fp32 caller asks for): with fp16/bf16
// inputs one tf32 pass there left every margin as it was (worst 0.71 over FLA's chunk and varlen
// matrices, H200) and the backward 5.7% faster. docs/perf-notes.md, session 6.
template <typename T>
constexpr bool kSplitTF32 = std::is_same<T, float>::value;

// C[M x N] (+)= op(A)[M x kd] * op(B)[kd x N], fp32 shared-memory operands through 3xTF32 wmma
// (mma_16x16_split_tf32: fp32-level accuracy, which the gate gradients need) or, with kSplit
// false, one tf32 pass.
// TA: A(m, kk) = A[kk*lda + m] (else A[m*lda + kk]); TB: B(kk, n) = B[n*ldb + kk] (else
// B[kk*ldb + n]). M, N multiples of 16, kd a multiple of 8. Output tiles go round-robin over the
// warps; a warp that accumulates re-reads only tiles it wrote itself (callers keep M, N fixed
// between such calls) or tiles published by a __syncthreads.
// kSplit = false: one tf32 pass (mma_16x16<float>) instead of 3xTF32 (see kSplitTF32).
template <bool TA, bool TB, bool kSplit = true>
__device__ __forceinline__ void smem_gemm(float* C, int ldc, const float* A, int lda,
                                          const float* B, int ldb, int M, int N, int kd,
                                          bool accumulate) {
  using LA = typename std::conditional<TA, wmma::col_major, wmma::row_major>::type;
  using LB = typename std::conditional<TB, wmma::col_major, wmma::row_major>::type;
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int tn = N >> 4, tiles = (M >> 4) * tn;
  for (int t = warp; t < tiles; t += nwarps) {
    const int i = t / tn, j = t % tn;
    float* c = C + i * 16 * ldc + j * 16;
    AccFrag<float> acc;
    __syncwarp();
    if (accumulate) load_acc_shared<float>(acc, c, ldc);
    else wmma::fill_fragment(acc, 0.f);
    const float* a = TA ? A + i * 16 : A + i * 16 * lda;
    const float* b = TB ? B + j * 16 * ldb : B + j * 16;
    if constexpr (kSplit) {
      if (kd > 0) mma_16x16_split_tf32<LA, LB>(acc, a, lda, b, ldb, kd);
    } else {
      if (kd > 0) mma_16x16<float, LA, LB>(acc, a, lda, b, ldb, kd);
    }
    store_acc_shared<float>(c, acc, ldc);
  }
  __syncwarp();
}

// C[M x N] = alpha op(A) op(B) (accumulate false) or C += alpha op(A) op(B) (accumulate true)
// for fp16/bf16 operand tiles in shared memory: m16n16k16 wmma with fp32 accumulators, read
// from T as stored. Why: an operand pair read from T tensors needs no fp32 image; widening it
// cost a conversion and two stores per 8 elements, and its tf32 product took two m16n16k8 steps
// (a scalar LDS and a tf32 rounding per element, 4 HMMA.1684 each) where one m16n16k16 step
// does the same work (two LDSM fragment loads, 2 HMMA.16816). The products are the same numbers
// (fp16/bf16 values are exact in tf32, and both accumulate in fp32); only the order of the
// fp32 additions differs.
// alpha multiplies the finished product (fp32) once: folded into a T operand beforehand, a
// factor would take it out of T's values (scale * do is not an fp16/bf16 number).
// TA / TB as in smem_gemm; the tile->warp map is smem_gemm's too, so the two can accumulate into
// the same C one after the other without a barrier (same M, N). M, N, kd multiples of 16; lda,
// ldb multiples of 8 elements and tile origins 32-byte aligned (wmma's rules for 16-bit types).
template <typename T, bool TA, bool TB>
__device__ __forceinline__ void smem_gemm16(float* C, int ldc, const T* A, int lda, const T* B,
                                            int ldb, int M, int N, int kd, float alpha,
                                            bool accumulate) {
  static_assert(sizeof(T) == 2, "smem_gemm16 takes fp16/bf16 operands");
  using LA = typename std::conditional<TA, wmma::col_major, wmma::row_major>::type;
  using LB = typename std::conditional<TB, wmma::col_major, wmma::row_major>::type;
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int tn = N >> 4, tiles = (M >> 4) * tn;
  for (int t = warp; t < tiles; t += nwarps) {
    const int i = t / tn, j = t % tn;
    float* c = C + i * 16 * ldc + j * 16;
    AccFrag<T> acc;
    wmma::fill_fragment(acc, 0.f);
    const T* a = TA ? A + i * 16 : A + i * 16 * lda;
    const T* b = TB ? B + j * 16 * ldb : B + j * 16;
    if (kd > 0) mma_16x16<T, LA, LB>(acc, a, lda, b, ldb, kd);
    __syncwarp();
    if (accumulate) {
      AccFrag<T> prev;
      load_acc_shared<T>(prev, c, ldc);
#pragma unroll
      for (int e = 0; e < acc.num_elements; ++e) acc.x[e] = fmaf(alpha, acc.x[e], prev.x[e]);
    } else {
#pragma unroll
      for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= alpha;
    }
    store_acc_shared<T>(c, acc, ldc);
  }
  __syncwarp();
}

// Runs body(idx, value) for every idx in [0, total), spread over the block's threads, where
// value = load(idx) comes from global memory. The kUnroll loads of a round are all issued before
// any body runs. Why: a plain loop with a global load and a shared-memory store per iteration
// keeps one load in flight per thread (the compiler cannot move a load above a store it cannot
// prove independent), and with one or two blocks per SM that left the backward kernels waiting on
// memory latency more than half of the time (ncu: long-scoreboard stalls, H100).
// kAlwaysLoad: the loads run unconditionally (an index past the end loads element total - 1
// again, and its body does not run), for loads that widen their value (load8): such a load under
// `if (idx < total)` is converted inside the branch and waits for memory before the next one
// issues. (Not the default: in bwd_state it made ptxas drop to 64 registers with spills.)
template <int kUnroll, typename Val, bool kAlwaysLoad = false, typename Load, typename Body>
__device__ __forceinline__ void staged_for(int total, Load load, Body body) {
  const int step = blockDim.x;
  for (int base = threadIdx.x; base < total; base += kUnroll * step) {
    Val vals[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int idx = base + u * step;
      if (kAlwaysLoad) vals[u] = load(idx < total ? idx : total - 1);
      else if (idx < total) vals[u] = load(idx);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int idx = base + u * step;
      if (idx < total) body(idx, vals[u]);
    }
  }
}

// Fills a [rows x cols] fp32 tile (leading dim ld) from a token-major tensor: element (r, c) is
// src[((tok0 + r) * heads + head) * width + col0 + c] for r < nr and col0 + c < width, else 0.
// Where the widths allow it (multiples of 16 bytes, the usual K/V of 64/128/256) every thread
// moves 16-byte vectors: the kernels were issue-bound on the per-element index arithmetic of
// scalar loads (ncu, H100: ~14K instructions per warp per step of the state pass).
template <typename T>
__device__ __forceinline__ void load_tile(float* dst, int ld, int rows, int cols, const T* src,
                                          int64_t tok0, int nr, int64_t heads, int64_t head,
                                          int64_t width, int64_t col0) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const bool vec_ok = width % kVec == 0 && col0 % kVec == 0 && cols % kVec == 0 && ld % 4 == 0 &&
                      aligned16(src);
  if (vec_ok) {
    const int nvec = cols / kVec;
    staged_for<4, uint4>(
        rows * nvec,
        [&](int idx) {
          const int r = idx / nvec, c = (idx - r * nvec) * kVec;
          uint4 x = make_uint4(0u, 0u, 0u, 0u);
          if (r < nr && col0 + c < width)  // the whole vector is inside: width % kVec == 0
            x = *reinterpret_cast<const uint4*>(src + ((tok0 + r) * heads + head) * width + col0 + c);
          return x;
        },
        [&](int idx, uint4 x) {
          const int r = idx / nvec, c = (idx - r * nvec) * kVec;
          const T* e = reinterpret_cast<const T*>(&x);
          float* d = dst + r * ld + c;
#pragma unroll
          for (int j = 0; j < kVec; j += 4)
            *reinterpret_cast<float4*>(d + j) = make_float4(to_float<T>(e[j]), to_float<T>(e[j + 1]),
                                                            to_float<T>(e[j + 2]), to_float<T>(e[j + 3]));
        });
    return;
  }
  staged_for<8, float>(
      rows * cols,
      [&](int idx) {
        const int r = idx / cols, c = idx % cols;
        return (r < nr && col0 + c < width)
                   ? to_float<T>(src[((tok0 + r) * heads + head) * width + col0 + c])
                   : 0.f;
      },
      [&](int idx, float x) { dst[(idx / cols) * ld + idx % cols] = x; });
}

// load_tile for a 16-bit T whose tile stays in T (an operand of smem_gemm16): the same elements,
// copied as stored (no conversion; zeros outside). The vector path needs ld % 8 == 0 as well.
template <typename T>
__device__ __forceinline__ void copy_tile(T* dst, int ld, int rows, int cols, const T* src,
                                          int64_t tok0, int nr, int64_t heads, int64_t head,
                                          int64_t width, int64_t col0) {
  static_assert(sizeof(T) == 2, "copy_tile moves fp16/bf16 tiles");
  const bool vec_ok = width % 8 == 0 && col0 % 8 == 0 && cols % 8 == 0 && ld % 8 == 0 &&
                      aligned16(src);
  if (vec_ok) {
    const int nvec = cols / 8;
    staged_for<4, uint4>(
        rows * nvec,
        [&](int idx) {
          const int r = idx / nvec, c = (idx - r * nvec) * 8;
          uint4 x = make_uint4(0u, 0u, 0u, 0u);
          if (r < nr && col0 + c < width)  // the whole vector is inside: width % 8 == 0
            x = *reinterpret_cast<const uint4*>(src + ((tok0 + r) * heads + head) * width + col0 + c);
          return x;
        },
        [&](int idx, uint4 x) {
          const int r = idx / nvec, c = (idx - r * nvec) * 8;
          *reinterpret_cast<uint4*>(dst + r * ld + c) = x;
        });
    return;
  }
  // Bit copies: +0 is all-zero bits in fp16 and bf16 alike.
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  staged_for<8, uint16_t>(
      rows * cols,
      [&](int idx) {
        const int r = idx / cols, c = idx % cols;
        return (r < nr && col0 + c < width)
                   ? s[((tok0 + r) * heads + head) * width + col0 + c]
                   : static_cast<uint16_t>(0);
      },
      [&](int idx, uint16_t x) { d[(idx / cols) * ld + idx % cols] = x; });
}

// Loads the saved [BT x BT] chunk matrix (Aqk or Akk rows of this chunk), keeping only the valid
// square and the lower triangle (strict when `strict`); everything else is zero.
// BT is a template parameter: the per-element divisions by BT / BT/8 fold to shifts and masks
// (with a run-time BT each was a ~20-instruction integer division; the kernels are issue-bound).
template <typename T, int BT>
__device__ __forceinline__ void load_chunk_matrix(float* dst, int ld, const T* src, int64_t tok0,
                                                  int len, int64_t HV, int64_t hv, bool strict) {
  auto keep = [&](int i, int j) { return i < len && j < len && (strict ? j < i : j <= i); };
  if (aligned16(src) && ld % 4 == 0) {  // BT is 32 or 64: rows are whole vectors
    constexpr int nv = BT / 8;
    staged_for<2, F8, true>(
        BT * nv,
        [&](int idx) {
          // Branch-free (a load under a condition waits for memory before the next one issues):
          // rows past len read the last row, and keep() zeroes them and the columns past len.
          const int i = idx / nv, j0 = (idx - i * nv) * 8;
          return load8<T>(src + ((tok0 + (i < len ? i : len - 1)) * HV + hv) * BT + j0);
        },
        [&](int idx, F8 x) {
          const int i = idx / nv, j0 = (idx - i * nv) * 8;
#pragma unroll
          for (int j = 0; j < 8; ++j) x.v[j] = keep(i, j0 + j) ? x.v[j] : 0.f;
          store8(dst + i * ld + j0, x);
        });
    return;
  }
  staged_for<8, float>(
      BT * BT,
      [&](int idx) {
        const int i = idx / BT, j = idx % BT;
        return keep(i, j) ? to_float<T>(src[((tok0 + i) * HV + hv) * BT + j])
                   : 0.f;
      },
      [&](int idx, float x) { dst[(idx / BT) * ld + idx % BT] = x; });
}

// load_chunk_matrix for a 16-bit T whose tile stays in T (an operand of smem_gemm16): the same
// kept elements, copied as stored, the rest zero. The vector path needs ld % 8 == 0 as well.
template <typename T, int BT>
__device__ __forceinline__ void copy_chunk_matrix(T* dst, int ld, const T* src, int64_t tok0,
                                                  int len, int64_t HV, int64_t hv, bool strict) {
  static_assert(sizeof(T) == 2, "copy_chunk_matrix moves fp16/bf16 tiles");
  if (aligned16(src) && ld % 8 == 0) {  // BT is 32 or 64: rows are whole vectors
    constexpr int nv = BT / 8;
    staged_for<2, uint4, true>(
        BT * nv,
        [&](int idx) {
          // Branch-free, as in load_chunk_matrix: rows past len read the last row and are zeroed.
          const int i = idx / nv, j0 = (idx - i * nv) * 8;
          return *reinterpret_cast<const uint4*>(
              src + ((tok0 + (i < len ? i : len - 1)) * HV + hv) * BT + j0);
        },
        [&](int idx, uint4 x) {
          const int i = idx / nv, j0 = (idx - i * nv) * 8;
          // The kept columns of row i are a prefix of the row (j <= i, or j < i, and j < len
          // follows from i < len): of this vector's 8, the first nkeep. Word w holds elements
          // 2w (low half) and 2w + 1 (high half).
          const int last = i < len ? (strict ? i - 1 : i) : -1;
          const int nkeep = last - j0 + 1;
          uint32_t* wd = reinterpret_cast<uint32_t*>(&x);
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            const int r = nkeep - 2 * w;
            wd[w] &= r >= 2 ? 0xffffffffu : (r == 1 ? 0x0000ffffu : 0u);
          }
          *reinterpret_cast<uint4*>(dst + i * ld + j0) = x;
        });
    return;
  }
  auto keep = [&](int i, int j) { return i < len && j < len && (strict ? j < i : j <= i); };
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  staged_for<8, uint16_t>(
      BT * BT,
      [&](int idx) {
        const int i = idx / BT, j = idx % BT;
        return keep(i, j) ? s[((tok0 + i) * HV + hv) * BT + j] : static_cast<uint16_t>(0);
      },
      [&](int idx, uint16_t x) { d[(idx / BT) * ld + idx % BT] = x; });
}

// sum_{j < n} f(row, j) for the 64 rows of a tile, 8 threads per row (row = threadIdx.x / 8, so
// blockDim.x must be 512): strided partials, then a fixed 3-step xor tree; every thread of the
// row's group gets the total. The order is fixed, so results are bitwise reproducible. Why:
// the per-row and per-column sums ran on 64 threads walking 64 entries each while the rest of
// the block waited at the next barrier. Call it from every thread (it shuffles).
template <typename F>
__device__ __forceinline__ float row_sum_8(int n, F f) {
  const int row = threadIdx.x >> 3, part = threadIdx.x & 7;
  float s = 0.f;
  for (int j = part; j < n; j += 8) s += f(row, j);
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  s += __shfl_xor_sync(0xffffffffu, s, 2);
  s += __shfl_xor_sync(0xffffffffu, s, 4);
  return s;
}

// Calls emit(r, kk, q, k, G) for every element (r < BT, kk < 64) of the K slice [k0, k0 + 64)
// of one chunk: the raw q and k (0 outside the chunk or past K) and G = g_cum (rows past the
// chunk repeat the last row's G, so every exp(G_i - G_j) stays finite; 0 past K). BT is the
// compile-time chunk size (the loop bounds fold to constants).
// kFixedKV: see kv_size (K known, the slice whole).
template <typename T, int BT, int kFixedKV = 0, typename Emit>
__device__ __forceinline__ void load_slice_qkg(const ChunkKdaBwdParams& p, int64_t tok0, int len,
                                               int64_t hv, int64_t hq, int64_t k0, Emit emit) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  constexpr bool kWhole = kWholeKV<kFixedKV>;
  const int64_t K = kv_size<kFixedKV>(p.K), H = p.H, HV = p.HV;
  if (K % 8 == 0 && aligned16(q) && aligned16(k) && aligned16(p.g_cum)) {
    struct QKG {
      F8 q, k, g;
    };
    staged_for<1, QKG>(
        BT * 8,
        [&](int idx) {
          const int r = idx >> 3, c0 = (idx & 7) * 8;
          QKG x;
          x.q = x.k = x.g = zero8();
          const int rr = r < len ? r : len - 1;
          if (kWhole || k0 + c0 < K) {  // K % 8 == 0: the whole vector is inside
            x.g = load8<float>(p.g_cum + ((tok0 + rr) * HV + hv) * K + k0 + c0);
            if (r < len) {
              const int64_t off = ((tok0 + r) * H + hq) * K + k0 + c0;
              x.q = load8<T>(q + off);
              x.k = load8<T>(k + off);
            }
          }
          return x;
        },
        [&](int idx, const QKG& x) {
          const int r = idx >> 3, c0 = (idx & 7) * 8;
#pragma unroll
          for (int j = 0; j < 8; ++j) emit(r, c0 + j, x.q.v[j], x.k.v[j], x.g.v[j]);
        });
    return;
  }
  staged_for<8, float3>(
      BT * 64,
      [&](int idx) {
        const int r = idx / 64, kk = idx % 64;
        float3 x = make_float3(0.f, 0.f, 0.f);  // q, k, G
        const int rr = r < len ? r : len - 1;
        if (kWhole || k0 + kk < K) {
          x.z = p.g_cum[((tok0 + rr) * HV + hv) * K + k0 + kk];
          if (r < len) {
            const int64_t off = ((tok0 + r) * H + hq) * K + k0 + kk;
            x.x = to_float<T>(q[off]);
            x.y = to_float<T>(k[off]);
          }
        }
        return x;
      },
      [&](int idx, float3 x) { emit(idx / 64, idx % 64, x.x, x.y, x.z); });
}

// beta as the forward uses it: raw, or s * sigmoid(raw).
__device__ __forceinline__ float beta_value(const ChunkKdaBwdParams& p, int64_t i) {
  const float b = load_any(p.beta, p.beta_dtype, i);
  if (!p.use_beta_sigmoid) return b;
  return (p.allow_neg_eigval ? 2.f : 1.f) * sigmoidf_(b);
}

// l2norm rstd of row `row` of two [*, H, K] tensors (q and k; callers skip it when l2norm is
// off): warp-cooperative sums in a fixed order, results broadcast to every lane. Both rows' loads
// are issued before either sum, so the pair costs one memory round trip, not two.
template <typename T>
__device__ __forceinline__ void row_rstd_warp_pair(const T* x, const T* y, int64_t row, int64_t K,
                                                   float& rx, float& ry) {
  const int lane = threadIdx.x & 31;
  constexpr int kPer = 256 / 32;  // K <= 256: all of a lane's loads in flight at once
  float vx[kPer], vy[kPer];
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const int64_t c = lane + 32 * e;
    vx[e] = c < K ? to_float<T>(x[row * K + c]) : 0.f;
    vy[e] = c < K ? to_float<T>(y[row * K + c]) : 0.f;
  }
  float sx = 0.f, sy = 0.f;
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    sx += vx[e] * vx[e];
    sy += vy[e] * vy[e];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    sx += __shfl_xor_sync(0xffffffffu, sx, o);
    sy += __shfl_xor_sync(0xffffffffu, sy, o);
  }
  rx = rsqrtf(sx + 1e-6f);
  ry = rsqrtf(sy + 1e-6f);
}

}  // namespace bwd
}  // namespace cuda
}  // namespace kda_ext

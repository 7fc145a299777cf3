// kda_ext CUDA backward: per-chunk gradient kernels (A: state/WY terms per K slice; B: dAkk->dL, dAqk, dv; C: intra-chunk terms, reverse cumsum and gate backward per K slice).
#pragma once

#include <type_traits>

#include "cuda/bwd_bf16x3.cuh"
#include "cuda/bwd_common.cuh"

namespace kda_ext {
namespace cuda {
namespace bwd {

// ---------------------------------------------------------------------------------------------
// Kernel A, grid (B*NT slots, HV, NKS). For the K slice [k0, k0+64) of one chunk, with S = h[c]
// (state entering), dSn = dh[c] (gradient of the state leaving), dvn = dLoss/dv_new:
//   dqg = scale do S^T, dkg = v_new dSn^T, dw = -dvn S^T, dkb = Akk^T dw (kb = beta k e^G),
//   dq_hat = dqg e^G, dk_hat = dkg e^{Gl-G} + beta e^G dkb,
//   dG = dqg qg - dkg kg + dkb kb, and at the last row dGl = sum_i dkg kg + e^{Gl} sum_v S dSn,
//   dbeta partial = sum_k dkb k e^G, dAkk partial = dw kb^T (summed over slices in kernel B).
// ---------------------------------------------------------------------------------------------
// `half`: fp16/bf16 inputs. In the V loop their do tile and a second copy of the h tile (s16) stay
// 16-bit (64 x kTileLd16 each, operands of smem_gemm16), back to back in the region that holds
// the fp32 dkb tile after the loop (2 x 9216 bytes >= 17408). fp32 inputs: the layout as before.
struct BwdChunkASmem {
  int64_t S, dSn, dout, dvn, vn, aq, ak, aw, akk, dakk, vec, s16, total;
  __host__ __device__ BwdChunkASmem(int BT, bool half) {
    SmemCarver c;
    const int64_t tile = 64 * kTileLd, sq = BT * (BT + 4), tile16 = 64 * kTileLd16;
    static_assert(2 * 64 * kTileLd16 * 2 >= 64 * kTileLd * 4, "do + s16 must cover dkb");
    S = c.take<float>(tile);
    dSn = c.take<float>(tile);
    s16 = 0;
    if (half) {
      dout = c.take<uint16_t>(2 * tile16);
      s16 = dout + tile16 * static_cast<int64_t>(sizeof(uint16_t));  // 9216: 128-byte aligned
    } else {
      dout = c.take<float>(tile);
    }
    dvn = c.take<float>(tile);
    vn = c.take<float>(tile);
    aq = c.take<float>(tile);
    ak = c.take<float>(tile);
    aw = c.take<float>(tile);
    akk = c.take<float>(sq);
    dakk = c.take<float>(sq);
    vec = c.take<float>(4 * 64);
    total = c.offset;
  }
};

// V tiles held in registers between their loads and their stores to shared memory, for the case
// every row is whole 16-byte vectors (K % 8 == V % 8 == 0, aligned tensors). Why: loaded tile by
// tile, each 64 x 64 tile of kernels A and B was a memory round trip of its own before the
// products could start (four or five a V tile; ncu: long-scoreboard stalls first in kernel A);
// this way all of a V tile's loads are in flight together, and the next V tile's are issued
// before this one's products run. Loads are branch-free: an invalid vector reads a valid address
// of the same tensor (clamped row / column) and is zeroed when stored.

// 16-byte vectors per thread of a 64 x 64 tile of element type E (kBwdThreads threads).
template <typename E>
constexpr int kTileVecs = 64 * 64 * static_cast<int>(sizeof(E)) / 16 / kBwdThreads;

// Row and first column of vector u of this thread in a 64 x 64 tile of element type E.
template <typename E>
__device__ __forceinline__ void tile_vec_pos(int u, int& r, int& c) {
  constexpr int nv = 64 * static_cast<int>(sizeof(E)) / 16, per = 16 / static_cast<int>(sizeof(E));
  const int idx = static_cast<int>(threadIdx.x) + u * kBwdThreads;
  r = idx / nv;
  c = (idx % nv) * per;
}

// Rows [0, 64) x columns [v0, v0 + 64) of a token-major [*, HV, V] tensor at head hv, rows past
// the chunk's len clamped to its last row (columns past V too, unless kFixedKV: see kv_size).
template <typename E, int kFixedKV = 0>
__device__ __forceinline__ void load_tok_tile(uint4 (&x)[kTileVecs<E>], const E* src, int64_t tok0,
                                              int len, int64_t HV, int64_t hv, int64_t V, int64_t v0) {
#pragma unroll
  for (int u = 0; u < kTileVecs<E>; ++u) {
    int r, c;
    tile_vec_pos<E>(u, r, c);
    const int64_t row = tok0 + (r < len ? r : len - 1);
    const int64_t col = kWholeKV<kFixedKV> || v0 + c < V ? v0 + c : v0;
    x[u] = *reinterpret_cast<const uint4*>(src + (row * HV + hv) * V + col);
  }
}

// Stores what load_tok_tile loaded (or a state tile with rows_ok(r) / cols past V) as fp32 into
// dst[r * ld + c], zero outside; transposed (dst[c * ld + r]) when `transpose`. kFixedKV: the
// columns are all inside (see kv_size).
template <typename E, int kFixedKV = 0, typename RowOk>
__device__ __forceinline__ void store_tile(const uint4 (&x)[kTileVecs<E>], float* dst, int ld,
                                           RowOk rows_ok, int64_t V, int64_t v0, bool transpose) {
  constexpr int per = 16 / static_cast<int>(sizeof(E));
#pragma unroll
  for (int u = 0; u < kTileVecs<E>; ++u) {
    int r, c;
    tile_vec_pos<E>(u, r, c);
    const bool in = rows_ok(r) && (kWholeKV<kFixedKV> || v0 + c < V);
    const E* e = reinterpret_cast<const E*>(&x[u]);
    if (transpose) {
#pragma unroll
      for (int j = 0; j < per; ++j) dst[(c + j) * ld + r] = in ? to_float<E>(e[j]) : 0.f;
    } else {
#pragma unroll
      for (int j = 0; j < per; j += 4)
        *reinterpret_cast<float4*>(dst + r * ld + c + j) =
            in ? make_float4(to_float<E>(e[j]), to_float<E>(e[j + 1]), to_float<E>(e[j + 2]), to_float<E>(e[j + 3]))
               : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
}

// store_tile for a 16-bit E whose tile stays in E (an operand of smem_gemm16): each vector as
// loaded (no conversion, never transposed), zeros where store_tile writes zeros (the whole vector
// is in or out: columns go by 8 and V % 8 == 0 on this path). ld % 8 == 0 (kTileLd16).
template <typename E, int kFixedKV = 0, typename RowOk>
__device__ __forceinline__ void store_tile16(const uint4 (&x)[kTileVecs<E>], E* dst, int ld,
                                             RowOk rows_ok, int64_t V, int64_t v0) {
  static_assert(sizeof(E) == 2, "store_tile16 keeps fp16/bf16 tiles");
#pragma unroll
  for (int u = 0; u < kTileVecs<E>; ++u) {
    int r, c;
    tile_vec_pos<E>(u, r, c);
    const bool in = rows_ok(r) && (kWholeKV<kFixedKV> || v0 + c < V);
    *reinterpret_cast<uint4*>(dst + r * ld + c) = in ? x[u] : make_uint4(0u, 0u, 0u, 0u);
  }
}

// Kernel A's five tiles of one V tile: h and dh (state, K slice rows) and do, v_new, dvn, all
// stored in T (dh and dvn too, see ChunkKdaBwdParams).
template <typename T>
struct ATileRegs {
  uint4 h[kTileVecs<T>], dout[kTileVecs<T>], vn[kTileVecs<T>];
  uint4 dh[kTileVecs<T>], dvn[kTileVecs<T>];
};

template <typename T, int kFixedKV>
__device__ __forceinline__ void load_a_tiles(ATileRegs<T>& R, const ChunkKdaBwdParams& p,
                                             int64_t sb, int64_t tok0, int len, int64_t hv,
                                             int64_t k0, int64_t v0) {
  constexpr bool kWhole = kWholeKV<kFixedKV>;
  const int64_t K = kv_size<kFixedKV>(p.K), V = kv_size<kFixedKV>(p.V), HV = p.HV;
  const T* h = static_cast<const T*>(p.h);
  const bool vf = p.state_v_first;
  auto kcol = [&](int c) { return static_cast<int>(kWhole || k0 + c < K ? k0 + c : k0); };
  auto vcol = [&](int c) { return static_cast<int>(kWhole || v0 + c < V ? v0 + c : v0); };
#pragma unroll
  for (int u = 0; u < kTileVecs<T>; ++u) {
    int r, c;
    tile_vec_pos<T>(u, r, c);
    // h along its contiguous axis: [K, V] rows are k (r), [V, K] rows are v (r).
    R.h[u] = *reinterpret_cast<const uint4*>(
        h + (vf ? state_off(p, sb, kcol(c), vcol(r), K, V) : state_off(p, sb, kcol(r), vcol(c), K, V)));
  }
#pragma unroll
  for (int u = 0; u < kTileVecs<T>; ++u) {
    int r, c;
    tile_vec_pos<T>(u, r, c);
    R.dh[u] = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.dh) + sb * K * V +
                                              kcol(r) * V + vcol(c));
  }
  load_tok_tile<T, kFixedKV>(R.dout, static_cast<const T*>(p.dout), tok0, len, HV, hv, V, v0);
  load_tok_tile<T, kFixedKV>(R.vn, static_cast<const T*>(p.v_new), tok0, len, HV, hv, V, v0);
  load_tok_tile<T, kFixedKV>(R.dvn, static_cast<const T*>(p.dvn), tok0, len, HV, hv, V, v0);
}

// Tile: T for fp16/bf16 inputs, whose do tile (leading dimension kTileLd16) stays 16-bit and
// whose h tile also goes to S16 as loaded (rows along h's outer axis: k, or v when
// state_v_first); float for fp32 inputs (S16 unused). dh and dvn (stored in T) are widened to
// their fp32 tiles dSn and dvn, as v_new to vn: they stay fp32 operands of tf32 products.
template <typename T, int kFixedKV, typename Tile>
__device__ __forceinline__ void store_a_tiles(const ATileRegs<T>& R, const ChunkKdaBwdParams& p,
                                              int len, int64_t k0, int64_t v0, float* S,
                                              float* dSn, Tile* dout, float* dvn, float* vn,
                                              int ld, T* S16) {
  constexpr bool k16 = sizeof(Tile) == 2;
  constexpr bool kWhole = kWholeKV<kFixedKV>;
  const int64_t K = kv_size<kFixedKV>(p.K), V = kv_size<kFixedKV>(p.V);
  auto tok_ok = [&](int r) { return r < len; };
  auto k_ok = [&](int r) { return kWhole || k0 + r < K; };
  if (p.state_v_first) {  // h rows are v, columns k: swap the roles of the two bounds
    auto v_ok = [&](int r) { return kWhole || v0 + r < V; };
    store_tile<T, kFixedKV>(R.h, S, ld, v_ok, K, k0, true);
    if constexpr (k16) store_tile16<T, kFixedKV>(R.h, S16, kTileLd16, v_ok, K, k0);
  } else {
    store_tile<T, kFixedKV>(R.h, S, ld, k_ok, V, v0, false);
    if constexpr (k16) store_tile16<T, kFixedKV>(R.h, S16, kTileLd16, k_ok, V, v0);
  }
  store_tile<T, kFixedKV>(R.dh, dSn, ld, k_ok, V, v0, false);
  if constexpr (k16) store_tile16<T, kFixedKV>(R.dout, dout, kTileLd16, tok_ok, V, v0);
  else store_tile<T, kFixedKV>(R.dout, dout, ld, tok_ok, V, v0, false);
  store_tile<T, kFixedKV>(R.vn, vn, ld, tok_ok, V, v0, false);
  store_tile<T, kFixedKV>(R.dvn, dvn, ld, tok_ok, V, v0, false);
}

// BT (== p.BT, 32 or 64) is a template parameter: the per-element divisions by BT and BT / 8,
// the loop bounds and the GEMM shapes fold to constants (the kernel is issue-bound). kFixedKV
// (0, or 128 for K == V == 128, see kv_size) likewise makes K and V constants: the V-tile loop's
// trip count, the K-slice width (64), the slice / V-tile masks and clamps of every load and store,
// the K % 8 / V % 8 tests and the multiplies by K and V of the offsets.
// fp16/bf16 inputs: aq += do h^T multiplies two T operands, so it runs as T-typed wmma
// (smem_gemm16: m16n16k16, fp32 accumulators) from 16-bit tiles: do is kept as loaded (no fp32
// tile: nothing else reads it) and h goes to S16 as well as to the fp32 S (aw = dvn h^T and the
// dGl row sums need S in fp32). The same products as the one tf32 pass before (T values are
// exact in tf32; fp32 accumulation in another order), with one k16 step where tf32 took two k8
// steps: per 16 x 16 tile of aq (kd = 64) 8 LDSM + 8 HMMA.16816 instead of 64 scalar LDS, 64
// tf32 roundings and 32 HMMA.1684, and no widening of do. fp32 inputs: unchanged (3xTF32).
template <typename T, int BT, int kFixedKV = 0>
__global__ void __launch_bounds__(kBwdThreads)
bwd_chunk_a_kernel(const ChunkKdaBwdParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // Element type of the do tile: T as stored (fp16/bf16, with the 16-bit h copy S16), fp32 for
  // fp32 inputs.
  constexpr bool k16 = sizeof(T) == 2;
  using Tile = typename std::conditional<k16, T, float>::type;
  const BwdChunkASmem Lay(BT, k16);
  float* S = reinterpret_cast<float*>(smem_raw + Lay.S);
  float* dSn = reinterpret_cast<float*>(smem_raw + Lay.dSn);
  Tile* dout = reinterpret_cast<Tile*>(smem_raw + Lay.dout);
  T* S16 = reinterpret_cast<T*>(smem_raw + Lay.s16);  // fp16/bf16 only
  float* dvn = reinterpret_cast<float*>(smem_raw + Lay.dvn);
  float* vn = reinterpret_cast<float*>(smem_raw + Lay.vn);
  float* aq = reinterpret_cast<float*>(smem_raw + Lay.aq);
  float* ak = reinterpret_cast<float*>(smem_raw + Lay.ak);
  float* aw = reinterpret_cast<float*>(smem_raw + Lay.aw);
  float* akk = reinterpret_cast<float*>(smem_raw + Lay.akk);
  float* dakk = reinterpret_cast<float*>(smem_raw + Lay.dakk);
  float* vbeta = reinterpret_cast<float*>(smem_raw + Lay.vec);  // [64]
  float* vrq = vbeta + 64;                                       // [64] rstd of q rows
  float* vrk = vrq + 64;                                         // [64] rstd of k rows
  float* vgl = vrk + 64;                                         // [64] dLoss/dG_last
  constexpr int ld = kTileLd;
  constexpr int ldD = k16 ? kTileLd16 : kTileLd;  // do (and S16)
  constexpr int ldA = BT + 4;

  constexpr bool kWhole = kWholeKV<kFixedKV>;
  const int64_t HV = p.HV, H = p.H, K = kv_size<kFixedKV>(p.K), V = kv_size<kFixedKV>(p.V);
  const int64_t hv = blockIdx.y, ks = blockIdx.z;
  const int64_t k0 = ks * kBwdKSlice;
  if (hv >= HV || k0 >= K) return;
  BwdChunk ch;
  if (!bwd_chunk_of_slot<BT>(p, blockIdx.x, ch)) return;
  const int len = ch.len;
  const int64_t tok0 = ch.tok0, slot = ch.slot;
  const int64_t hq = hv / (HV / H);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* h = static_cast<const T*>(p.h);
  const T* dO = static_cast<const T*>(p.dout);
  const T* vnew = static_cast<const T*>(p.v_new);

  const int64_t sb = slot * HV + hv;
  const bool whole_vectors = K % 8 == 0 && V % 8 == 0 && aligned16(h) && aligned16(p.dh) &&
                             aligned16(dO) && aligned16(p.dvn) && aligned16(vnew);
  ATileRegs<T> next;  // the first V tile's loads go out before anything else
  if (whole_vectors) load_a_tiles<T, kFixedKV>(next, p, sb, tok0, len, hv, k0, 0);
  for (int idx = threadIdx.x; idx < 64 * ld; idx += blockDim.x) aq[idx] = ak[idx] = aw[idx] = 0.f;
  static_assert(kBwdThreads == 512, "row_sum_8 maps 8 threads to each of 64 rows");
  float sds = 0.f;  // sum_v S[kk, v] dSn[kk, v] for kk = threadIdx.x / 8
  // Any other K, V or alignment: tile by tile, element-wise where the rows are not whole vectors.
  auto load_v_tile_scalar = [&](int64_t v0) {
    // h follows the state layout: walk it along its contiguous axis so that loads coalesce.
    const bool vf = p.state_v_first;
    if ((vf ? K % 8 == 0 : V % 8 == 0) && aligned16(h)) {
      staged_for<1, F8>(
          64 * 8,
          [&](int idx) {  // idx = outer * 8 + group along the contiguous axis
            const int o = idx >> 3, g = (idx & 7) * 8;
            const int kk = vf ? g : o, vv = vf ? o : g;
            return (kWhole || (k0 + kk < K && v0 + vv < V))
                       ? load8<T>(h + state_off(p, sb, static_cast<int>(k0 + kk), static_cast<int>(v0 + vv), K, V))
                       : zero8();
          },
          [&](int idx, const F8& x) {
            const int o = idx >> 3, g = (idx & 7) * 8;
            if (!vf) {
              store8(S + o * ld + g, x);
            } else {
#pragma unroll
              for (int j = 0; j < 8; ++j) S[(g + j) * ld + o] = x.v[j];
            }
            if constexpr (k16) {  // S16 as h is laid out; x came from T, so narrowing is exact
              uint4 y;
              T* e = reinterpret_cast<T*>(&y);
#pragma unroll
              for (int j = 0; j < 8; ++j) e[j] = from_float<T>(x.v[j]);
              *reinterpret_cast<uint4*>(S16 + o * ldD + g) = y;
            }
          });
    } else {
      staged_for<8, float>(
          64 * 64,
          [&](int idx) {
            const int kk = vf ? idx % 64 : idx / 64, vv = vf ? idx / 64 : idx % 64;
            return (kWhole || (k0 + kk < K && v0 + vv < V))
                       ? to_float<T>(h[state_off(p, sb, static_cast<int>(k0 + kk), static_cast<int>(v0 + vv), K, V)])
                       : 0.f;
          },
          [&](int idx, float x) {
            const int kk = vf ? idx % 64 : idx / 64, vv = vf ? idx / 64 : idx % 64;
            S[kk * ld + vv] = x;
            if constexpr (k16) S16[(idx / 64) * ldD + idx % 64] = from_float<T>(x);  // as above
          });
    }
    // dh is [K, V] in T: rows k0 + kk, columns [v0, v0 + 64) (a slice of 64 rows of V wide).
    load_tile<T>(dSn, ld, 64, 64, static_cast<const T*>(p.dh) + sb * K * V, k0,
                 static_cast<int>(K - k0), 1, 0, V, v0);
    if constexpr (k16) copy_tile<T>(dout, ldD, BT, 64, dO, tok0, len, HV, hv, V, v0);
    else load_tile<T>(dout, ldD, BT, 64, dO, tok0, len, HV, hv, V, v0);
    load_tile<T>(dvn, ld, BT, 64, static_cast<const T*>(p.dvn), tok0, len, HV, hv, V, v0);
    load_tile<T>(vn, ld, BT, 64, vnew, tok0, len, HV, hv, V, v0);
  };
  // The products of one V tile (its tiles published by the caller's barrier).
  auto v_tile_products = [&]() {
    sds += row_sum_8(64, [&](int kk, int vv) { return S[kk * ld + vv] * dSn[kk * ld + vv]; });
    if constexpr (k16) {
      // aq += do h^T with h read from S16 as laid out: B(v, kk) = S16[kk][v], or S16[v][kk]
      // when state_v_first (a uniform branch; the two calls differ only in the fragment layout).
      if (p.state_v_first)
        smem_gemm16<T, false, false>(aq, ld, dout, ldD, S16, ldD, BT, 64, 64, 1.f, true);
      else
        smem_gemm16<T, false, true>(aq, ld, dout, ldD, S16, ldD, BT, 64, 64, 1.f, true);
    } else {
      smem_gemm<false, true, kSplitTF32<T>>(
          aq, ld, dout, ldD, S, ld, BT, 64, 64, true);
    }
    smem_gemm<false, true, kSplitTF32<T>>(
        ak, ld, vn, ld, dSn, ld, BT, 64, 64, true);
    smem_gemm<false, true, kSplitTF32<T>>(
        aw, ld, dvn, ld, S, ld, BT, 64, 64, true);
  };
  if constexpr (k16) {
    // One loop per path. Why: with both paths in one loop the V tile in flight (`next`, 28
    // registers when dh and dvn were fp32; 20 with them stored in T) stays allocated through the
    // element-wise path's staged loads too, and that pressure made ptxas spill address terms of
    // the register path in the general-K/V builds (reloaded every V tile; seen at 28); split, no
    // 16-bit build spills. (fp32 keeps the single loop: its code is left as it was.)
    if (whole_vectors) {
      for (int64_t v0 = 0; v0 < V; v0 += kBwdVTile) {
        __syncthreads();  // previous tiles fully consumed
        store_a_tiles<T, kFixedKV>(next, p, len, k0, v0, S, dSn, dout, dvn, vn, ld, S16);
        if (v0 + kBwdVTile < V)
          load_a_tiles<T, kFixedKV>(next, p, sb, tok0, len, hv, k0, v0 + kBwdVTile);
        __syncthreads();
        v_tile_products();
      }
    } else {
      for (int64_t v0 = 0; v0 < V; v0 += kBwdVTile) {
        __syncthreads();
        load_v_tile_scalar(v0);
        __syncthreads();
        v_tile_products();
      }
    }
  } else {
    for (int64_t v0 = 0; v0 < V; v0 += kBwdVTile) {
      __syncthreads();  // previous tiles fully consumed
      if (whole_vectors) {
        store_a_tiles<T, kFixedKV>(next, p, len, k0, v0, S, dSn, dout, dvn, vn, ld, S16);
        if (v0 + kBwdVTile < V) load_a_tiles<T, kFixedKV>(next, p, sb, tok0, len, hv, k0, v0 + kBwdVTile);
      } else {
        load_v_tile_scalar(v0);
      }
      __syncthreads();
      v_tile_products();
    }
  }
  __syncthreads();

  // Operands of the slice: k_hat -> S, G -> dSn, kb -> vn, q_hat -> dvn, dkb -> dout.
  float* kh = S;
  float* G = dSn;
  float* kb = vn;
  float* qh = dvn;
  float* dkb = reinterpret_cast<float*>(smem_raw + Lay.dout);  // (16-bit: over do and S16)
  // Per-row scalars. The l2norm rstd comes from the recompute's chunk_prepare when it ran (the
  // same values the recompute normalised q and k with); otherwise (saved intermediates) one CTA
  // per row (K slice 0, first value head of the group) computes it and keeps it for kernel C,
  // which would otherwise load whole q/k rows again for each of its K slices. (Computed here
  // rather than before the V loop: there, A measured 4% slower on an H100.)
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (p.rstd_ready) {
    for (int r = threadIdx.x; r < BT; r += blockDim.x) {
      const bool l2 = r < len && p.use_qk_l2norm;
      vrq[r] = l2 ? p.rstd_qk[(tok0 + r) * H + hq] : 1.f;
      vrk[r] = l2 ? p.rstd_qk[(p.B * p.T + tok0 + r) * H + hq] : 1.f;
      vbeta[r] = r < len ? beta_value(p, (tok0 + r) * HV + hv) : 0.f;
    }
  }
  const bool keep_rstd = p.rstd_qk != nullptr && ks == 0 && hv % (HV / H) == 0;
  for (int r = warp; r < BT && !p.rstd_ready; r += nwarps) {
    float rq = 1.f, rk = 1.f;
    if (r < len && p.use_qk_l2norm) {
      row_rstd_warp_pair<T>(q, k, (tok0 + r) * H + hq, K, rq, rk);
    }
    if ((threadIdx.x & 31) == 0) {
      vrq[r] = rq;
      vrk[r] = rk;
      vbeta[r] = r < len ? beta_value(p, (tok0 + r) * HV + hv) : 0.f;
      if (keep_rstd && r < len) {
        p.rstd_qk[(tok0 + r) * H + hq] = rq;
        p.rstd_qk[(p.B * p.T + tok0 + r) * H + hq] = rk;
      }
    }
  }
  load_chunk_matrix<T, BT>(akk, ldA, static_cast<const T*>(p.Akk), tok0, len, HV, hv, false);
  __syncthreads();
  // Element (r, kk) of the slice from the raw q, k and G: l2norm, k*beta*e^G, and -dw.
  // Exponentials of G in kernels A and C are __expf (ex2.approx of x log2e: ~2 ulp plus |x| 2^-24
  // relative), as in the forward's chunk_prepare that made qg/kg/w from the same G: expf's range
  // reduction costs ~6 more instructions each, and these kernels are issue-bound.
  auto emit_a = [&](int r, int kk, float qv, float kv, float gv) {
    if (p.use_qk_l2norm && r < len) {
      qv = round_to<T>(qv * vrq[r]);
      kv = round_to<T>(kv * vrk[r]);
    }
    qh[r * ld + kk] = qv;
    kh[r * ld + kk] = kv;
    G[r * ld + kk] = gv;
    kb[r * ld + kk] = vbeta[r] * kv * __expf(gv);
    aw[r * ld + kk] = -aw[r * ld + kk];
  };
  load_slice_qkg<T, BT, kFixedKV>(p, tok0, len, hv, hq, k0, emit_a);
  __syncthreads();
  smem_gemm<true, false, kSplitTF32<T>>(
      dkb, ld, akk, ldA, aw, ld, BT, 64, BT, false);
  smem_gemm<false, true, kSplitTF32<T>>(dakk, ldA, aw, ld, kb, ld, BT, BT, 64, false);
  __syncthreads();

  {
    float* part = p.dAkk_part + ks * (p.B * p.T * HV * BT);
    for (int idx = threadIdx.x; idx < len * BT; idx += blockDim.x) {
      const int r = idx / BT, j = idx % BT;
      part[((tok0 + r) * HV + hv) * BT + j] = j < len ? dakk[r * ldA + j] : 0.f;
    }
  }
  // Column sums over rows (dG_last) and row sums over the slice (dbeta), each in a fixed order.
  const int kw = kWhole ? 64 : static_cast<int>(K - k0 < 64 ? K - k0 : 64);
  {
    const int row = threadIdx.x >> 3;  // column kk for dG_last, row r for dbeta
    const bool leader = (threadIdx.x & 7) == 0;
    const float gl = G[(len - 1) * ld + row];
    const float col = row_sum_8(len, [&](int kk, int r) {
      return ak[r * ld + kk] * kh[r * ld + kk] * __expf(gl - G[r * ld + kk]);
    });
    if (leader) vgl[row] = row < kw ? __expf(gl) * sds + col : 0.f;
    const float db = row_sum_8(kw, [&](int r, int kk) {
      return dkb[r * ld + kk] * kh[r * ld + kk] * __expf(G[r * ld + kk]);
    });
    if (leader && row < len) p.dbeta_part[(ks * p.B * p.T + tok0 + row) * HV + hv] = db;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < len * 64; idx += blockDim.x) {
    const int r = idx / 64, kk = idx % 64;
    if (kk >= kw) continue;
    const float gv = G[r * ld + kk], gl = G[(len - 1) * ld + kk];
    const float eg = __expf(gv), egl = __expf(gl - gv);
    const float dqg = p.scale * aq[r * ld + kk];
    const float dkg = ak[r * ld + kk];
    const float dkbv = dkb[r * ld + kk];
    const float qv = qh[r * ld + kk], kv = kh[r * ld + kk], bb = vbeta[r];
    float dg = dqg * qv * eg - dkg * kv * egl + dkbv * kb[r * ld + kk];
    if (r == len - 1) dg += vgl[kk];
    const int64_t off = ((tok0 + r) * HV + hv) * K + k0 + kk;
    p.dq_hv[off] = dqg * eg;
    p.dk_hv[off] = dkg * egl + bb * eg * dkbv;
    p.dG[off] = dg;
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel B, grid (B*NT slots, HV). dAkk = sum of the slice partials + dvn (beta v)^T,
// dL = -Akk^T dAkk Akk^T (strict lower), dAqk = scale * tril(do v_new^T),
// dv = beta (Akk^T dvn), dbeta partial = sum_v (Akk^T dvn) v.
// ---------------------------------------------------------------------------------------------
// `half`: fp16/bf16 inputs, whose do and v_new tiles stay 16-bit (64 x kTileLd16, operands of
// smem_gemm16); fp32 inputs keep fp32 tiles (the layout is the same as before for them). dvn is
// stored in T for fp16/bf16 too, but its tile is fp32 either way (widened when stored: an
// operand of the tf32 products with vb and Akk).
struct BwdChunkBSmem {
  int64_t akk, dakk, daqk, tmp, dvn, vb, vr, dout, vn, dvo, vec, total;
  __host__ __device__ BwdChunkBSmem(int BT, bool half) {
    SmemCarver c;
    const int64_t tile = 64 * kTileLd, sq = BT * (BT + 4), tile16 = 64 * kTileLd16;
    akk = c.take<float>(sq);
    dakk = c.take<float>(sq);
    daqk = c.take<float>(sq);
    tmp = c.take<float>(sq);
    dvn = c.take<float>(tile);
    vb = c.take<float>(tile);
    vr = c.take<float>(tile);
    if (half) {
      dout = c.take<uint16_t>(tile16);
      vn = c.take<uint16_t>(tile16);
    } else {
      dout = c.take<float>(tile);
      vn = c.take<float>(tile);
    }
    dvo = c.take<float>(tile);
    vec = c.take<float>(64);
    total = c.offset;
  }
};

// BT (== p.BT, 32 or 64) is a template parameter: the per-element divisions by BT and BT / 8,
// the loop bounds and the GEMM shapes fold to constants (the kernel is issue-bound). kFixedKV
// (0, or 128 for K == V == 128, see kv_size) likewise makes K and V constants: the V-tile loop's
// trip count, the V-tile masks and clamps of the loads and dv stores, the V % 8 test, the
// multiplies by V of the offsets and the number of K-slice partials summed (2).
// fp16/bf16 inputs: daqk += do v_new^T multiplies two T operands that nothing else reads, so
// their tiles stay 16-bit as loaded (store_tile16 / copy_tile: no widening) and the product runs
// as T-typed wmma (smem_gemm16, fp32 accumulators): the same products as the one tf32 pass
// before in another fp32 order, with 8 LDSM + 8 HMMA.16816 per 16 x 16 tile of daqk instead of
// 64 scalar LDS, 64 tf32 roundings and 32 HMMA.1684. fp32 inputs: unchanged (3xTF32).
template <typename T, int BT, int kFixedKV = 0>
__global__ void __launch_bounds__(kBwdThreads)
bwd_chunk_b_kernel(const ChunkKdaBwdParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // Element type of the do and v_new tiles: T as stored (fp16/bf16), fp32 for fp32 inputs.
  constexpr bool k16 = sizeof(T) == 2;
  using Tile = typename std::conditional<k16, T, float>::type;
  const BwdChunkBSmem Lay(BT, k16);
  float* akk = reinterpret_cast<float*>(smem_raw + Lay.akk);
  float* dakk = reinterpret_cast<float*>(smem_raw + Lay.dakk);
  float* daqk = reinterpret_cast<float*>(smem_raw + Lay.daqk);
  float* tmp = reinterpret_cast<float*>(smem_raw + Lay.tmp);
  float* dvn = reinterpret_cast<float*>(smem_raw + Lay.dvn);
  float* vb = reinterpret_cast<float*>(smem_raw + Lay.vb);
  float* vr = reinterpret_cast<float*>(smem_raw + Lay.vr);
  Tile* dout = reinterpret_cast<Tile*>(smem_raw + Lay.dout);
  Tile* vn = reinterpret_cast<Tile*>(smem_raw + Lay.vn);
  float* dvo = reinterpret_cast<float*>(smem_raw + Lay.dvo);
  float* vbeta = reinterpret_cast<float*>(smem_raw + Lay.vec);
  constexpr int ld = kTileLd;
  constexpr int ldD = k16 ? kTileLd16 : kTileLd;  // do and v_new tiles
  constexpr int ldA = BT + 4;

  constexpr bool kWhole = kWholeKV<kFixedKV>;
  const int64_t HV = p.HV, V = kv_size<kFixedKV>(p.V);
  // K slices of kernel A (whose dAkk partials are summed below). Not folded for fp32: with its
  // V-tile registers twice as wide, the constant made ptxas spill at BT = 32 (52 bytes, 128
  // registers); fp16/bf16 keep 119 registers.
  const int nks = kWhole && sizeof(T) == 2 ? kFixedKV / kBwdKSlice : p.NKS;
  const int64_t hv = blockIdx.y;
  if (hv >= HV) return;
  BwdChunk ch;
  if (!bwd_chunk_of_slot<BT>(p, blockIdx.x, ch)) return;
  const int len = ch.len;
  const int64_t tok0 = ch.tok0;
  const int64_t ntok = p.B * p.T;
  const T* v = static_cast<const T*>(p.v);
  const T* dO = static_cast<const T*>(p.dout);
  const T* vnew = static_cast<const T*>(p.v_new);
  T* dv = static_cast<T*>(p.dv);

  for (int r = threadIdx.x; r < BT; r += blockDim.x)
    vbeta[r] = r < len ? beta_value(p, (tok0 + r) * HV + hv) : 0.f;
  load_chunk_matrix<T, BT>(akk, ldA, static_cast<const T*>(p.Akk), tok0, len, HV, hv, false);
  {
    constexpr int nv = BT / 8;  // partial rows are float32 [BT]: whole 8-vectors
    // BT * nv <= 512 = kBwdThreads: one round covers every vector, and a second unrolled one only
    // re-loads the last vector (kAlwaysLoad) into registers. fp16/bf16 take one round: with dvn
    // stored in T, the second round's registers made ptxas spill the general chunk-32 build (20
    // bytes). fp32 keeps two: with one, its K = V = 128 chunk-32 build spilled 52 bytes.
    static_assert(BT * nv <= kBwdThreads, "one staged round covers the dAkk partial rows");
    staged_for<sizeof(T) == 2 ? 1 : 2, F8, true>(
        BT * nv,
        [&](int idx) {
          // Slices summed in a fixed order. Branch-free, all slices' loads issued together: rows
          // past len read the last row (zeroed by the body), slices past NKS re-read the last
          // slice and add nothing.
          const int r = idx / nv, j0 = (idx - r * nv) * 8;
          const int64_t row = tok0 + (r < len ? r : len - 1);
          F8 x[kBwdMaxKSlices];
#pragma unroll
          for (int s = 0; s < kBwdMaxKSlices; ++s) {
            const int ss = s < nks ? s : nks - 1;
            x[s] = load8<float>(p.dAkk_part + ((ss * ntok + row) * HV + hv) * BT + j0);
          }
          F8 acc = zero8();
#pragma unroll
          for (int s = 0; s < kBwdMaxKSlices; ++s) {
            if (s < nks) {
#pragma unroll
              for (int j = 0; j < 8; ++j) acc.v[j] += x[s].v[j];
            }
          }
          return acc;
        },
        [&](int idx, F8 x) {
          const int r = idx / nv, j0 = (idx - r * nv) * 8;
#pragma unroll
          for (int j = 0; j < 8; ++j) x.v[j] = (r < len && j0 + j < len) ? x.v[j] : 0.f;
          store8(dakk + r * ldA + j0, x);
          store8(daqk + r * ldA + j0, zero8());
        });
  }
  float dbv = 0.f;  // sum_v (Akk^T dvn)[r, v] v[r, v] for r = threadIdx.x / 8
  // The four V-tile operands through registers when rows are whole vectors (see load_tok_tile),
  // the next V tile's loads in flight while this one's products run.
  const bool whole_vectors = V % 8 == 0 && aligned16(p.dvn) && aligned16(v) && aligned16(dO) &&
                             aligned16(vnew);
  uint4 r_dvn[kTileVecs<T>], r_v[kTileVecs<T>], r_do[kTileVecs<T>], r_vn[kTileVecs<T>];
  auto load_b_tiles = [&](int64_t v0) {
    load_tok_tile<T, kFixedKV>(r_dvn, static_cast<const T*>(p.dvn), tok0, len, HV, hv, V, v0);
    load_tok_tile<T, kFixedKV>(r_v, v, tok0, len, HV, hv, V, v0);
    load_tok_tile<T, kFixedKV>(r_do, dO, tok0, len, HV, hv, V, v0);
    load_tok_tile<T, kFixedKV>(r_vn, vnew, tok0, len, HV, hv, V, v0);
  };
  if (whole_vectors) load_b_tiles(0);
  for (int64_t v0 = 0; v0 < V; v0 += kBwdVTile) {
    __syncthreads();
    if (whole_vectors) {
      auto tok_ok = [&](int r) { return r < len; };
      store_tile<T, kFixedKV>(r_dvn, dvn, ld, tok_ok, V, v0, false);
      store_tile<T, kFixedKV>(r_v, vr, ld, tok_ok, V, v0, false);
      if constexpr (k16) {
        store_tile16<T, kFixedKV>(r_do, dout, ldD, tok_ok, V, v0);
        store_tile16<T, kFixedKV>(r_vn, vn, ldD, tok_ok, V, v0);
      } else {
        store_tile<T, kFixedKV>(r_do, dout, ldD, tok_ok, V, v0, false);
        store_tile<T, kFixedKV>(r_vn, vn, ldD, tok_ok, V, v0, false);
      }
      if (v0 + kBwdVTile < V) load_b_tiles(v0 + kBwdVTile);
    } else {
      load_tile<T>(dvn, ld, BT, 64, static_cast<const T*>(p.dvn), tok0, len, HV, hv, V, v0);
      load_tile<T>(vr, ld, BT, 64, v, tok0, len, HV, hv, V, v0);
      if constexpr (k16) {
        copy_tile<T>(dout, ldD, BT, 64, dO, tok0, len, HV, hv, V, v0);
        copy_tile<T>(vn, ldD, BT, 64, vnew, tok0, len, HV, hv, V, v0);
      } else {
        load_tile<T>(dout, ldD, BT, 64, dO, tok0, len, HV, hv, V, v0);
        load_tile<T>(vn, ldD, BT, 64, vnew, tok0, len, HV, hv, V, v0);
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < BT * 64; idx += blockDim.x) {
      const int r = idx / 64, c = idx % 64;
      vb[r * ld + c] = vbeta[r] * vr[r * ld + c];
    }
    __syncthreads();
    smem_gemm<false, true, kSplitTF32<T>>(
        dakk, ldA, dvn, ld, vb, ld, BT, BT, 64, true);
    if constexpr (k16) {
      smem_gemm16<T, false, true>(daqk, ldA, dout, ldD, vn, ldD, BT, BT, 64, 1.f, true);
    } else {
      smem_gemm<false, true, kSplitTF32<T>>(
          daqk, ldA, dout, ldD, vn, ldD, BT, BT, 64, true);
    }
    smem_gemm<true, false, kSplitTF32<T>>(
        dvo, ld, akk, ldA, dvn, ld, BT, 64, BT, false);
    __syncthreads();
    for (int idx = threadIdx.x; idx < len * 64; idx += blockDim.x) {
      const int r = idx / 64, c = idx % 64;
      if (kWhole || v0 + c < V)
        dv[((tok0 + r) * HV + hv) * V + v0 + c] = from_float<T>(vbeta[r] * dvo[r * ld + c]);
    }
    // Rows >= BT of the 64-row tiles may hold stale values; their sums are never stored.
    dbv += row_sum_8(64, [&](int r, int c) { return dvo[r * ld + c] * vr[r * ld + c]; });
  }
  __syncthreads();
  if ((threadIdx.x & 7) == 0 && (threadIdx.x >> 3) < len)
    p.dbeta_part[(nks * ntok + tok0 + (threadIdx.x >> 3)) * HV + hv] = dbv;

  // Only the strict lower part of dAkk reaches Lkk; dAqk keeps the diagonal.
  for (int idx = threadIdx.x; idx < BT * BT; idx += blockDim.x) {
    const int r = idx / BT, j = idx % BT;
    const bool in = r < len && j < len;
    if (!(in && j < r)) dakk[r * ldA + j] = 0.f;
    const float a = (in && j <= r) ? p.scale * daqk[r * ldA + j] : 0.f;
    if (r < len) p.dAqk[((tok0 + r) * HV + hv) * BT + j] = a;
  }
  __syncthreads();
  smem_gemm<false, true, kSplitTF32<T>>(
      tmp, ldA, dakk, ldA, akk, ldA, BT, BT, BT, false);
  __syncthreads();
  smem_gemm<true, false, kSplitTF32<T>>(
      dakk, ldA, akk, ldA, tmp, ldA, BT, BT, BT, false);
  __syncthreads();
  for (int idx = threadIdx.x; idx < len * BT; idx += blockDim.x) {
    const int r = idx / BT, j = idx % BT;
    p.dL[((tok0 + r) * HV + hv) * BT + j] = (j < r && j < len) ? -dakk[r * ldA + j] : 0.f;
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel C, grid (B*NT slots, HV, NKS). Intra-chunk terms of Aqk and Lkk for one K slice:
//   RQ_i = sum_{j<=i} sAqk'_ij k_j e^{G_i-G_j}, RL_i = sum_{j<i} dL_ij k_j e^{G_i-G_j},
//   CC_j = sum_{i>=j} (sAqk'_ij q_i + dL_ij beta_i k_i) e^{G_i-G_j};
//   dq += RQ, dk += beta RL + CC, dG += q RQ + k (beta RL - CC), dbeta += sum_k k RL.
// Off-diagonal 16x16 blocks go through a reference row between i and j (both factors <= 1) and
// tensor cores; diagonal blocks go pair by pair (one exp per pair, see the diagonal units). Then
// the reverse within-chunk cumsum of dG and the in-kernel gate backward, with per-chunk partials
// of dA_log / ddt_bias.
// ---------------------------------------------------------------------------------------------
// kCBf16x3<T>: kernel C's four off-diagonal products (row side rq += sAqk' xm, rl += dL xm;
// column side cc += sAqk'^T xm + dL^T ym) as bf16x3 (bwd_bf16x3.cuh: both fp32 operands as bf16
// hi/lo tiles, a_hi b_hi + a_lo b_hi + a_hi b_lo with mma.sync m16n8k16) instead of 3xTF32 wmma
// from fp32 tiles (each fragment element a scalar LDS and a tf32 split: most of the kernel's
// instructions went there). On for fp16/bf16 inputs; fp32 inputs keep 3xTF32 (the accuracy an
// fp32 caller asks for), and false builds the old code exactly.
// Precision: bf16x3 carries ~16 bits of each operand (worst error ~2^-15 of sum |a||b| per
// product; 2^-15.4 in scripts/dev/bf16x3_error.py's fp64 emulation) against 3xTF32's ~2^-21, far
// more than one tf32 pass (~2^-10, which cost dA_log / ddt_bias their margin:
// the c-tf32-per-product experiment in docs/perf-notes.md). Details in bwd_bf16x3.cuh.
template <typename T>
constexpr bool kCBf16x3 = sizeof(T) == 2;

// Layout with bf16x3 (b16 true): sAqk' and dL as bf16 hi/lo, only the part the products read
// (rows 16.., columns ..BT - 16: everything strictly below the diagonal blocks), [BT - 16][BT - 8]
// (ldmatrix rows of 48 or 112 bytes: the 8 rows of a phase on different banks), and in fp32 only
// their diagonal 16 x 16 blocks ([BT][16] at daqk / dl: the diagonal units read nothing else). The products' xm/ym operands (bf16 hi/lo slabs of at
// most BT - 16 rows) live in the xm + ym fp32 tiles, which are free until the diagonal units.
struct BwdChunkCSmem {
  int64_t qh, kh, G, daqk, dl, xm, ym, rq, rl, cc, vec, aqh, aql, dlh, dll, total;
  __host__ __device__ explicit BwdChunkCSmem(int BT, bool b16 = false) {
    SmemCarver c;
    const int64_t tile = 64 * kTileLd, sq = BT * (BT + 4);
    qh = c.take<float>(tile);
    kh = c.take<float>(tile);
    G = c.take<float>(tile);
    daqk = c.take<float>(b16 ? BT * 16 : sq);
    dl = c.take<float>(b16 ? BT * 16 : sq);
    xm = c.take<float>(tile);
    ym = c.take<float>(tile);
    rq = c.take<float>(tile);
    rl = c.take<float>(tile);
    cc = c.take<float>(tile);
    vec = c.take<float>(4 * 64);
    aqh = aql = dlh = dll = 0;
    if (b16) {
      const int64_t sq16 = (BT - 16) * (BT - 8);
      aqh = c.take<__nv_bfloat16>(sq16);
      aql = c.take<__nv_bfloat16>(sq16);
      dlh = c.take<__nv_bfloat16>(sq16);
      dll = c.take<__nv_bfloat16>(sq16);
    }
    total = c.offset;
  }
};
// The four bf16 slabs (xm hi/lo, ym hi/lo) of up to 48 rows fit in xm + ym (adjacent tiles).
static_assert(4 * 48 * kTileLd16 * 2 <= 2 * 64 * kTileLd * 4, "bf16x3 slabs must fit in xm + ym");
static_assert((64 * kTileLd * 4) % 128 == 0, "xm and ym are adjacent");

// BT (== p.BT, 32 or 64) is a template parameter: the per-element divisions by BT and BT / 8,
// the loop bounds and the GEMM shapes fold to constants (the kernel is issue-bound). kFixedKV
// (0, or 128 for K == V == 128, see kv_size) likewise makes K and V constants: the K-slice
// width (64: the masks of the combination, the dbeta sums, the reverse cumsum and the gate
// backward fold), the K % 8 test, the multiplies by K of the offsets, NKS (2).
template <typename T, int BT, int kFixedKV = 0>
__global__ void __launch_bounds__(kBwdThreads)
bwd_chunk_c_kernel(const ChunkKdaBwdParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  constexpr bool kB3 = kCBf16x3<T>;
  const BwdChunkCSmem Lay(BT, kB3);
  float* qh = reinterpret_cast<float*>(smem_raw + Lay.qh);
  float* kh = reinterpret_cast<float*>(smem_raw + Lay.kh);
  float* G = reinterpret_cast<float*>(smem_raw + Lay.G);
  float* daqk = reinterpret_cast<float*>(smem_raw + Lay.daqk);
  float* dl = reinterpret_cast<float*>(smem_raw + Lay.dl);
  float* xm = reinterpret_cast<float*>(smem_raw + Lay.xm);
  float* ym = reinterpret_cast<float*>(smem_raw + Lay.ym);
  float* rq = reinterpret_cast<float*>(smem_raw + Lay.rq);
  float* rl = reinterpret_cast<float*>(smem_raw + Lay.rl);
  float* cc = reinterpret_cast<float*>(smem_raw + Lay.cc);
  float* vbeta = reinterpret_cast<float*>(smem_raw + Lay.vec);
  float* vrq = vbeta + 64;
  float* vrk = vrq + 64;
  float* vred = vrk + 64;
  constexpr int ld = kTileLd;
  constexpr int ldA = BT + 4;
  // bf16x3: sAqk' / dL hi and lo (rows 16.. and columns ..BT - 16: [BT - 16][ld16A]), the slabs of the products' xm / ym operands
  // (hi and lo, [BT - 16][ld16], in the xm + ym tiles), and the fp32 diagonal blocks of sAqk' / dL
  // at daqk / dl ([BT][16]; the diagonal units' only reads of them).
  using B16 = __nv_bfloat16;
  constexpr int ld16A = BT - 8, ld16 = kTileLd16, slab = (BT - 16) * ld16;
  B16* aq_hi = reinterpret_cast<B16*>(smem_raw + Lay.aqh);
  B16* aq_lo = reinterpret_cast<B16*>(smem_raw + Lay.aql);
  B16* dl_hi = reinterpret_cast<B16*>(smem_raw + Lay.dlh);
  B16* dl_lo = reinterpret_cast<B16*>(smem_raw + Lay.dll);
  B16* xs_hi = reinterpret_cast<B16*>(smem_raw + Lay.xm);
  B16* xs_lo = xs_hi + slab;
  B16* ys_hi = xs_lo + slab;
  B16* ys_lo = ys_hi + slab;
  // The diagonal units read row r, columns ub0.. of the diagonal block at d + r * ldDg + dcol(ub0).
  constexpr int ldDg = kB3 ? 16 : ldA;

  constexpr bool kWhole = kWholeKV<kFixedKV>;
  const int64_t HV = p.HV, H = p.H, K = kv_size<kFixedKV>(p.K);
  const int nks = kWhole ? kFixedKV / kBwdKSlice : p.NKS;
  const int64_t hv = blockIdx.y, ks = blockIdx.z;
  const int64_t k0 = ks * kBwdKSlice;
  if (hv >= HV || k0 >= K) return;
  const int kw = kWhole ? 64 : static_cast<int>(K - k0 < 64 ? K - k0 : 64);
  const bool gate_partials = p.use_gate_in_kernel && p.ddt_part != nullptr;
  BwdChunk ch;
  if (!bwd_chunk_of_slot<BT>(p, blockIdx.x, ch)) {
    // Unused varlen slots still own their partial entries: zero them for the final reduction.
    if (gate_partials && blockIdx.x < p.B * p.NT) {
      for (int kk = threadIdx.x; kk < kw; kk += blockDim.x)
        p.ddt_part[(static_cast<int64_t>(blockIdx.x) * HV + hv) * K + k0 + kk] = 0.f;
      if (threadIdx.x == 0) p.dA_part[(static_cast<int64_t>(blockIdx.x) * HV + hv) * nks + ks] = 0.f;
    }
    return;
  }
  const int len = ch.len;
  const int64_t tok0 = ch.tok0, slot = ch.slot;
  const int64_t hq = hv / (HV / H);

  if constexpr (kCBf16x3<T>) {
    // The combination's read-modify-write of kernel A's dq / dk / dG (rows < len, this slice's
    // columns: 2 x 128 bytes a row each) is a DRAM round trip that nothing overlapped (one block
    // an SM, all warps at the same barrier): ask for those lines into L2 now, one prefetch a
    // thread. Only a hint: no value changes, and a line it misses is loaded as before.
    const int t = static_cast<int>(threadIdx.x), arr = t / (2 * BT), i = (t >> 1) % BT;
    if (arr < 3 && i < len && 32 * (t & 1) < kw) {
      const float* base = arr == 0 ? p.dq_hv : arr == 1 ? p.dk_hv : p.dG;
      const float* a = base + ((tok0 + i) * HV + hv) * K + k0 + 32 * (t & 1);
      asm volatile("prefetch.L2 [%0];" ::"l"(a));  // generic address
    }
    // Likewise q, k (one 128-byte line a row of the slice) and g_cum (two), which
    // load_slice_qkg reads only after the dAqk / dL staging and a barrier: their DRAM trip now
    // overlaps the staging's instead of following it.
    const int arr2 = t / BT, i2 = t % BT;
    if (arr2 < 4 && i2 < len && (arr2 < 3 || 32 < kw)) {
      const void* a2;
      if (arr2 < 2) {
        a2 = static_cast<const T*>(arr2 == 0 ? p.q : p.k) + ((tok0 + i2) * H + hq) * K + k0;
      } else {
        a2 = p.g_cum + ((tok0 + i2) * HV + hv) * K + k0 + 32 * (arr2 - 2);
      }
      asm volatile("prefetch.L2 [%0];" ::"l"(a2));
    }
  }

  // The l2norm rstd of each row as kernel A computed it (bit-identical, and no second pass over
  // whole q/k rows per K slice).
  for (int r = threadIdx.x; r < BT; r += blockDim.x) {
    const bool l2 = r < len && p.use_qk_l2norm;
    vrq[r] = l2 ? p.rstd_qk[(tok0 + r) * H + hq] : 1.f;
    vrk[r] = l2 ? p.rstd_qk[(p.B * p.T + tok0 + r) * H + hq] : 1.f;
    vbeta[r] = r < len ? beta_value(p, (tok0 + r) * HV + hv) : 0.f;
  }
  {
    constexpr int nv = BT / 8;  // dAqk/dL rows are float32 [BT]: whole 8-vectors
    staged_for<2, F8, true>(
        BT * nv * 2,
        [&](int idx) {
          // Branch-free: rows past len read the last row (zeroed below with the columns past len).
          const int which = idx & 1, it = idx >> 1, r = it / nv, j0 = (it - r * nv) * 8;
          const int rr = r < len ? r : len - 1;
          return load8<float>((which ? p.dL : p.dAqk) + ((tok0 + rr) * HV + hv) * BT + j0);
        },
        [&](int idx, F8 x) {
          const int which = idx & 1, it = idx >> 1, r = it / nv, j0 = (it - r * nv) * 8;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int jj = j0 + j;
            const bool in = r < len && jj < len && (which ? jj < r : jj <= r);
            x.v[j] = in ? x.v[j] : 0.f;
          }
          if constexpr (kB3) {
            const int o = (r - 16) * ld16A + j0;
            if (r >= 16 && j0 < BT - 16)
              store_split8(which ? dl_hi + o : aq_hi + o, which ? dl_lo + o : aq_lo + o, x.v);
            if ((j0 >> 4) == (r >> 4)) store8((which ? dl : daqk) + r * 16 + (j0 & 15), x);
          } else {
            store8((which ? dl : daqk) + r * ldA + j0, x);
          }
        });
  }
  __syncthreads();
  auto emit_c = [&](int r, int kk, float qv, float kv, float gv) {
    if (p.use_qk_l2norm && r < len) {
      qv = round_to<T>(qv * vrq[r]);
      kv = round_to<T>(kv * vrk[r]);
    }
    qh[r * ld + kk] = qv;
    kh[r * ld + kk] = kv;
    G[r * ld + kk] = gv;
    // bf16x3: no zeros needed. Every element of rq / rl / cc read later is written first: the
    // row products write rq / rl rows 16..16 nsub (all 64 columns), the column products cc rows
    // ..16 (nsub - 1), the even diagonal units all rows of their blocks (ub0 < len) before the
    // combination, and rows >= 16 nsub are never read (i < len there, r < len in the gate sums).
    if constexpr (!kB3) rq[r * ld + kk] = rl[r * ld + kk] = cc[r * ld + kk] = 0.f;
  };
  load_slice_qkg<T, BT, kFixedKV>(p, tok0, len, hv, hq, k0, emit_c);
  __syncthreads();

  const int nsub = (len + 15) / 16;
  // Every exp below (reference-row fills, pair factors, reference-row scalings) is of G_i - G_j
  // with row i at or after row j: <= 0 for the kimi/softplus gates (g_cum does not increase),
  // where __expf (ex2.approx of x*log2e: ~2 ulp plus |x|*2^-24 relative) is as good as the
  // diagonal blocks need, at about half of expf's instructions (the kernel is issue-bound).
  // Row side: sub-chunk I against all earlier rows through its first row.
  // bf16x3 (kB3): the fills write bf16 hi/lo slabs (row side: all sub-chunks' at once, below;
  // column side: slab row s = tile row i - j1) and each warp computes 16 x 8 output tiles (warp
  // w: column tile w % 8; row side: rq for w < 8, rl for the others; column side: warps 0..7,
  // both terms into one accumulator). The old wmma products kept warps 4..15 idle.
  // The per-thread element maps below (fills, combination) assume blockDim.x == kBwdThreads, as
  // the diagonal units do (static_assert there).
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid >> 5;
  constexpr int kNSub = BT / 16;
  if constexpr (kB3) {
    // All reference-row slabs at once (sub-chunk I's, rows j < 16 I, from slab row 8 I (I - 1)
    // on: 16 + 32 + 48 rows at chunk 64), one barrier, all products, one barrier: 2 barriers
    // instead of 2 per sub-chunk. Each warp then does its column tile for every I (1 + 2 + 3
    // k16 steps at chunk 64: the same for all 16 warps).
    constexpr int kRowSlabRows = 8 * (BT / 16 - 1) * (BT / 16);
    static_assert(2 * kRowSlabRows * kTileLd16 * 2 <= 2 * 64 * kTileLd * 4,
                  "the row side's slabs must fit in xm + ym");
    B16* const rs_hi = xs_hi;
    B16* const rs_lo = xs_hi + kRowSlabRows * ld16;
    // Element (j, kc..kc+1) of sub-chunk I's slab (j < 16 I) is this thread's when kc = 2 (tid %
    // 32) and j = warp + 16 m, m < I (the old loop's idx = 32 j + kc / 2 over the block): the
    // trip counts are compile-time, the reference rows G[16 I] are loaded once per thread and
    // row j's G and k once for all I (they were reloaded for each I; same products, same bits).
    {
      const int kc = 2 * (tid & 31);
      float2 gref[kNSub];
#pragma unroll
      for (int I = 1; I < kNSub; ++I) gref[I] = *reinterpret_cast<const float2*>(G + 16 * I * ld + kc);
#pragma unroll
      for (int m = 0; m + 1 < kNSub; ++m) {
        if (m + 1 >= nsub) break;  // nsub is the block's: uniform
        const int j = warp + 16 * m;
        const float2 gj = *reinterpret_cast<const float2*>(G + j * ld + kc);
        const float2 kv = *reinterpret_cast<const float2*>(kh + j * ld + kc);
#pragma unroll
        for (int I = m + 1; I < kNSub; ++I) {
          if (I >= nsub) break;
          const int o = (8 * I * (I - 1) + j) * ld16 + kc;
          uint32_t h, l;
          split_bf16x2(kv.x * __expf(gref[I].x - gj.x), kv.y * __expf(gref[I].y - gj.y), h, l);
          *reinterpret_cast<uint32_t*>(rs_hi + o) = h;
          *reinterpret_cast<uint32_t*>(rs_lo + o) = l;
        }
      }
    }
    if (nsub > 1) __syncthreads();  // nsub is the block's: uniform
    if (nsub > 1) {
      const bool second = warp >= 8;
      const int n0 = 8 * (warp & 7);
      const B16* const a_hi = second ? dl_hi : aq_hi;
      const B16* const a_lo = second ? dl_lo : aq_lo;
      float* const out = second ? rl : rq;
#pragma unroll 1
      for (int I = 1; I < nsub; ++I) {
        const int i0 = 16 * I, base = 8 * I * (I - 1), a0 = (i0 - 16) * ld16A;
        float big[4] = {0.f, 0.f, 0.f, 0.f}, small[4] = {0.f, 0.f, 0.f, 0.f};
        mma_bf16x3_16x8<false>(big, small, a_hi + a0, a_lo + a0, ld16A, rs_hi + base * ld16 + n0,
                               rs_lo + base * ld16 + n0, ld16, i0);
        store_acc_16x8(out + i0 * ld + n0, ld, big, small);
      }
      __syncthreads();
    }
  } else {
    for (int I = 1; I < nsub; ++I) {
      const int i0 = 16 * I;
      for (int idx = threadIdx.x; idx < i0 * 64; idx += blockDim.x) {
        const int j = idx / 64, kk = idx % 64;
        xm[j * ld + kk] = kh[j * ld + kk] * __expf(G[i0 * ld + kk] - G[j * ld + kk]);
      }
      __syncthreads();
      smem_gemm<false, false>(rq + i0 * ld, ld, daqk + i0 * ldA, ldA, xm, ld, 16, 64, i0, false);
      smem_gemm<false, false>(rl + i0 * ld, ld, dl + i0 * ldA, ldA, xm, ld, 16, 64, i0, false);
      __syncthreads();
    }
  }
  // Column side: sub-chunk J against all later rows through J's last row.
  if constexpr (kB3) {
    // Slab row s = i - j1 (i >= j1 = 16 (J + 1)), columns kc..kc+1, is this thread's when kc =
    // 2 (tid % 32) and i = 16 + warp + 16 m (m >= J) (the old loop's idx = 32 s + kc / 2 over
    // the block): the same rows for every J, so their q, k, G and beta are loaded once, before
    // the J loop (unrolled: compile-time trip counts), not once per J; the reference row's G
    // once per J (it was once per element). Same products, same bits.
    const int kc = 2 * (tid & 31);
    float2 cgi[kNSub - 1], cqv[kNSub - 1], ckv[kNSub - 1];
    float cbb[kNSub - 1];
#pragma unroll
    for (int m = 0; m + 1 < kNSub; ++m) {
      const int i = 16 + warp + 16 * m;
      cgi[m] = *reinterpret_cast<const float2*>(G + i * ld + kc);
      cqv[m] = *reinterpret_cast<const float2*>(qh + i * ld + kc);
      ckv[m] = *reinterpret_cast<const float2*>(kh + i * ld + kc);
      cbb[m] = vbeta[i];
    }
#pragma unroll
    for (int J = 0; J + 1 < kNSub; ++J) {
      if (J + 1 >= nsub) break;  // uniform
      const int j1 = 16 * (J + 1), r = j1 - 1;
      const float2 gr = *reinterpret_cast<const float2*>(G + r * ld + kc);
#pragma unroll
      for (int m = J; m + 1 < kNSub; ++m) {
        const int s = warp + 16 * (m - J), i = j1 + s;
        float2 e = make_float2(0.f, 0.f);
        if (i < len) e = make_float2(__expf(cgi[m].x - gr.x), __expf(cgi[m].y - gr.y));
        const float2 qv = cqv[m], kv = ckv[m];
        const float bb = cbb[m];
        uint32_t h, l;
        split_bf16x2(qv.x * e.x, qv.y * e.y, h, l);
        *reinterpret_cast<uint32_t*>(xs_hi + s * ld16 + kc) = h;
        *reinterpret_cast<uint32_t*>(xs_lo + s * ld16 + kc) = l;
        split_bf16x2(bb * kv.x * e.x, bb * kv.y * e.y, h, l);
        *reinterpret_cast<uint32_t*>(ys_hi + s * ld16 + kc) = h;
        *reinterpret_cast<uint32_t*>(ys_lo + s * ld16 + kc) = l;
      }
      __syncthreads();
      if (warp < 8) {
        const int n0 = 8 * warp, a0 = (j1 - 16) * ld16A + (j1 - 16);
        float big[4] = {0.f, 0.f, 0.f, 0.f}, small[4] = {0.f, 0.f, 0.f, 0.f};
        mma_bf16x3_16x8<true>(big, small, aq_hi + a0, aq_lo + a0, ld16A, xs_hi + n0, xs_lo + n0,
                              ld16, BT - j1);
        mma_bf16x3_16x8<true>(big, small, dl_hi + a0, dl_lo + a0, ld16A, ys_hi + n0, ys_lo + n0,
                              ld16, BT - j1);
        store_acc_16x8(cc + (j1 - 16) * ld + n0, ld, big, small);
      }
      __syncthreads();
    }
  } else {
    for (int J = 0; J + 1 < nsub; ++J) {
      const int j1 = 16 * (J + 1), r = j1 - 1;
      for (int idx = threadIdx.x; idx < (BT - j1) * 64; idx += blockDim.x) {
        const int i = j1 + idx / 64, kk = idx % 64;
        float e = 0.f;
        if (i < len) e = __expf(G[i * ld + kk] - G[r * ld + kk]);
        xm[i * ld + kk] = qh[i * ld + kk] * e;
        ym[i * ld + kk] = vbeta[i] * kh[i * ld + kk] * e;
      }
      __syncthreads();
      float* out = cc + (j1 - 16) * ld;
      smem_gemm<true, false>(out, ld, daqk + j1 * ldA + (j1 - 16), ldA, xm + j1 * ld, ld, 16, 64,
                             BT - j1, false);
      smem_gemm<true, false>(out, ld, dl + j1 * ldA + (j1 - 16), ldA, ym + j1 * ld, ld, 16, 64,
                             BT - j1, true);
      __syncthreads();
    }
  }

  // Diagonal 16x16 blocks, pair by pair. A pair (a, b), b <= a, of one block and one column has
  // one factor e = exp(G_a - G_b) and two uses of it:
  //   row side of a:    RQ_a += sAqk'_ab k_b e,  RL_a += dL_ab k_b e,
  //   column side of b: CC_b += (sAqk'_ab q_a + dL_ab beta_a k_a) e.
  // Why: walked element by element (every row against its block, both sides) each factor and
  // its shared-memory loads came twice, ~17 exp and ~60 loads an element; the combination was
  // the largest part of the kernel, which is issue-bound. Unit (block s, column kk) is two
  // threads of different warps: pairs with a - b even (the diagonal too) and odd, so a warp is
  // one block and one parity (no divergence, and sAqk'/dL rows are same-address broadcasts).
  // The even thread writes first: RQ/RL/CC with the reference-row parts of rq/rl/cc scaled in;
  // the odd thread puts its RQ/RL in xm/ym and adds its CC after a barrier (fixed order:
  // reproducible). Rows past len are safe to walk: their sAqk'/dL rows are zero and their q, k,
  // beta, G finite (load_slice_qkg), so they add exact zeros.
  static_assert(kBwdThreads == 2 * 4 * 64, "a diagonal unit is two threads; 4 blocks x 64 columns");
  const int unit_parity = tid >> 8, ub0 = 16 * ((tid >> 6) & 3), unit_kk = tid & 63;
  const bool unit_on = ub0 < len;  // len <= BT: no unit past the chunk's blocks when BT = 32
  float cc_odd[16];
  auto diag_unit = [&](auto parity) {
    constexpr int P = decltype(parity)::value;
    const int kk = unit_kk;
    const bool has_prev = ub0 > 0, has_next = ub0 + 16 < len;  // rq/rl or cc hold off-block sums
    float g[16], kv[16], cs[16];
#pragma unroll
    for (int a = 0; a < 16; ++a) {
      const int r = ub0 + a;
      g[a] = G[r * ld + kk];
      kv[a] = kh[r * ld + kk];
      float sa[16], sl[16];  // row a of the block's sAqk' and dL, columns 0..a
#pragma unroll
      for (int m = 0; m <= a / 4; ++m) {
        const int o = r * ldDg + (kB3 ? 0 : ub0) + 4 * m;
        const float4 x = *reinterpret_cast<const float4*>(daqk + o);
        const float4 y = *reinterpret_cast<const float4*>(dl + o);
        sa[4 * m] = x.x, sa[4 * m + 1] = x.y, sa[4 * m + 2] = x.z, sa[4 * m + 3] = x.w;
        sl[4 * m] = y.x, sl[4 * m + 1] = y.y, sl[4 * m + 2] = y.z, sl[4 * m + 3] = y.w;
      }
      const float qa = qh[r * ld + kk], bka = vbeta[r] * kv[a];
      float vq = 0.f, vl = 0.f;
      if (P == 0) {  // the diagonal: e = 1, dL_aa = 0
        vq = sa[a] * kv[a];
        cs[a] = sa[a] * qa;
      } else {
        cs[a] = 0.f;
      }
#pragma unroll
      for (int b = a - 2 + P; b >= 0; b -= 2) {
        const float e = __expf(g[a] - g[b]), ek = e * kv[b];
        vq += sa[b] * ek;
        vl += sl[b] * ek;
        cs[b] += (sa[b] * qa + sl[b] * bka) * e;
      }
      if (P == 0) {
        if (has_prev) {
          // Even a: pair (a, 0)'s e, computed once; a = 0: exp(0) = 1 exactly.
          const float f = a == 0 ? 1.f : __expf(g[a] - g[0]);
          vq += rq[r * ld + kk] * f;
          vl += rl[r * ld + kk] * f;
        }
        rq[r * ld + kk] = vq;
        rl[r * ld + kk] = vl;
      } else {
        xm[r * ld + kk] = vq;
        ym[r * ld + kk] = vl;
      }
    }
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      const int r = ub0 + b;
      if (P == 0) {
        // Odd b: pair (15, b)'s e, computed once; b = 15: exp(0) = 1 exactly.
        if (has_next) cs[b] += cc[r * ld + kk] * (b == 15 ? 1.f : __expf(g[15] - g[b]));
        cc[r * ld + kk] = cs[b];
      } else {
        cc_odd[b] = cs[b];
      }
    }
  };
  if (unit_on) {
    if (unit_parity == 0) diag_unit(std::integral_constant<int, 0>{});
    else diag_unit(std::integral_constant<int, 1>{});
  }
  __syncthreads();
  if (unit_on && unit_parity == 1) {
#pragma unroll
    for (int b = 0; b < 16; ++b) cc[(ub0 + b) * ld + unit_kk] += cc_odd[b];
  }
  __syncthreads();

  // The combination. xm <- k RL (dbeta row sums), ym <- complete dG of the slice.
  // The partial dq/dk/dG written by kernel A are read-modify-written: their loads are staged.
  // One element's arithmetic, as the compiler emitted it for the scalar loop below (explicit
  // roundings: the float4 path gives the same bits).
  auto combine = [](float vrq, float vxm, float vrl, float vym, float vc, float qv, float kv,
                    float bb, float pq, float pk, float pg, float& dq, float& dk, float& dg,
                    float& kr) {
    const float vq = __fadd_rn(vrq, vxm), vl = __fadd_rn(vrl, vym), bl = __fmul_rn(bb, vl);
    dq = __fadd_rn(pq, vq);
    dk = __fadd_rn(pk, __fadd_rn(bl, vc));
    dg = __fmaf_rn(kv, __fsub_rn(bl, vc), __fmaf_rn(vq, qv, pg));
    kr = __fmul_rn(kv, vl);
  };
  bool comb_vec = false;
  if constexpr (kB3)
    comb_vec = (kWhole || K % 4 == 0) && aligned16(p.dq_hv) && aligned16(p.dk_hv) && aligned16(p.dG);
  if (comb_vec) {
    // float4 path (fp16/bf16 inputs; K % 4 == 0, so kw % 4 == 0 and a vector is wholly inside
    // or outside the slice): thread tid takes columns c4..c4+3, c4 = 4 (tid % 16), of rows
    // tid / 16 + 32 u. Why: the scalar loop took 8 elements a thread with 3 global loads, 2
    // global stores, 8 shared loads and 2 shared stores each and its index decoding (idx / 64,
    // idx % 64, 64-bit offsets) per element; here 2 vectors a thread (BT 64), 4x fewer memory
    // instructions and one offset per vector. Loads are branch-free (rows past len and vectors
    // past kw read a valid element, unused), all issued before any body runs.
    constexpr int kCombVecs = BT * 16 / kBwdThreads;
    static_assert(BT * 16 % kBwdThreads == 0, "whole rounds of float4 vectors");
    const int c4 = 4 * (tid & 15), i_t = tid >> 4;
    const bool col_in = kWhole || c4 < kw;
    float4 pq[kCombVecs], pk[kCombVecs], pg[kCombVecs];
    int64_t goff[kCombVecs];
#pragma unroll
    for (int u = 0; u < kCombVecs; ++u) {
      const int i = i_t + 32 * u, ic = i < len ? i : len - 1;
      goff[u] = ((tok0 + ic) * HV + hv) * K + k0 + (col_in ? c4 : 0);
      pq[u] = *reinterpret_cast<const float4*>(p.dq_hv + goff[u]);
      pk[u] = *reinterpret_cast<const float4*>(p.dk_hv + goff[u]);
      pg[u] = *reinterpret_cast<const float4*>(p.dG + goff[u]);
    }
#pragma unroll
    for (int u = 0; u < kCombVecs; ++u) {
      const int i = i_t + 32 * u, o = i * ld + c4;
      float4 kr = make_float4(0.f, 0.f, 0.f, 0.f), dg = kr;
      if (i < len && col_in) {
        const float4 a = *reinterpret_cast<const float4*>(rq + o);
        const float4 b = *reinterpret_cast<const float4*>(xm + o);
        const float4 c = *reinterpret_cast<const float4*>(rl + o);
        const float4 d = *reinterpret_cast<const float4*>(ym + o);
        const float4 e = *reinterpret_cast<const float4*>(cc + o);
        const float4 q = *reinterpret_cast<const float4*>(qh + o);
        const float4 k = *reinterpret_cast<const float4*>(kh + o);
        const float bb = vbeta[i];
        float q0, q1, q2, q3, k0_, k1_, k2_, k3_;
        combine(a.x, b.x, c.x, d.x, e.x, q.x, k.x, bb, pq[u].x, pk[u].x, pg[u].x, q0, k0_, dg.x, kr.x);
        combine(a.y, b.y, c.y, d.y, e.y, q.y, k.y, bb, pq[u].y, pk[u].y, pg[u].y, q1, k1_, dg.y, kr.y);
        combine(a.z, b.z, c.z, d.z, e.z, q.z, k.z, bb, pq[u].z, pk[u].z, pg[u].z, q2, k2_, dg.z, kr.z);
        combine(a.w, b.w, c.w, d.w, e.w, q.w, k.w, bb, pq[u].w, pk[u].w, pg[u].w, q3, k3_, dg.w, kr.w);
        // __stcg: a 16-byte st.global (a float4 assignment here came out as four scalar stores).
        __stcg(reinterpret_cast<float4*>(p.dq_hv + goff[u]), make_float4(q0, q1, q2, q3));
        __stcg(reinterpret_cast<float4*>(p.dk_hv + goff[u]), make_float4(k0_, k1_, k2_, k3_));
      }
      *reinterpret_cast<float4*>(xm + o) = kr;
      *reinterpret_cast<float4*>(ym + o) = dg;
    }
  } else
  staged_for<4, float3>(
      BT * 64,
      [&](int idx) {
        const int i = idx / 64, kk = idx % 64;
        float3 x = make_float3(0.f, 0.f, 0.f);  // dq, dk, dG of kernel A
        if (i < len && kk < kw) {
          const int64_t off = ((tok0 + i) * HV + hv) * K + k0 + kk;
          x = make_float3(p.dq_hv[off], p.dk_hv[off], p.dG[off]);
        }
        return x;
      },
      [&](int idx, float3 prev) {
        const int i = idx / 64, kk = idx % 64;
        float dgv = 0.f, kr = 0.f;
        if (i < len && kk < kw) {
          const int o = i * ld + kk;
          // rq + xm, rl + ym: even + odd units
          const int64_t off = ((tok0 + i) * HV + hv) * K + k0 + kk;
          float dq, dk;
          combine(rq[o], xm[o], rl[o], ym[o], cc[o], qh[o], kh[o], vbeta[i], prev.x, prev.y,
                  prev.z, dq, dk, dgv, kr);
          p.dq_hv[off] = dq;
          p.dk_hv[off] = dk;
        }
        xm[i * ld + kk] = kr;
        ym[i * ld + kk] = dgv;
      });
  __syncthreads();
  // The gate backward's inputs go out now, all at once, and arrive while the dbeta sums and the
  // reverse cumsum run: one load per element under a dtype switch (load_any) had waited for
  // memory element by element. Every row this thread takes there has column kk_t (blockDim.x is
  // a multiple of 64), so dt_bias and exp(A_log) are per-thread constants.
  static_assert(kBwdThreads % 64 == 0, "a thread keeps one column in the gate backward");
  constexpr int kGateRows = 64 * 64 / kBwdThreads;
  const int kk_t = static_cast<int>(threadIdx.x) % 64, r_t = static_cast<int>(threadIdx.x) / 64;
  float graw[kGateRows];
  float gbias = 0.f, gscale = 1.f;
  if (p.use_gate_in_kernel) {
    const int64_t col = k0 + (kk_t < kw ? kk_t : 0);  // clamped: the value is unused past kw
    int64_t off[kGateRows];
#pragma unroll
    for (int u = 0; u < kGateRows; ++u) {
      const int r = r_t + u * (kBwdThreads / 64);
      off[u] = ((tok0 + (r < len ? r : len - 1)) * HV + hv) * K + col;
    }
    gather_any(graw, p.g, p.g_dtype, off);
    if (p.dt_bias != nullptr) gbias = load_any(p.dt_bias, p.dt_bias_dtype, hv * K + col);
    if (p.A_log != nullptr) gscale = expf(load_any(p.A_log, p.a_log_dtype, hv));
  }
  {
    const float acc = row_sum_8(kw, [&](int r, int kk) { return xm[r * ld + kk]; });
    const int r = threadIdx.x >> 3;
    if ((threadIdx.x & 7) == 0 && r < len) p.dbeta_part[(ks * p.B * p.T + tok0 + r) * HV + hv] += acc;
  }
  if (threadIdx.x < kw) {
    // Reverse cumsum: dgate_s = sum_{i >= s} dG_i within the chunk.
    const int kk = threadIdx.x;
    float acc = 0.f;
    if (len == BT) {
      // Whole chunk: compile-time rows, each group's loads issued before its adds (the loop
      // below waits for every load in turn while the other 14 warps wait at the barrier).
      // Same order of additions.
#pragma unroll 1
      for (int r0 = BT - 8; r0 >= 0; r0 -= 8) {  // not unrolled: 8 loads in flight, few registers
        float v[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) v[t] = ym[(r0 + t) * ld + kk];
#pragma unroll
        for (int t = 7; t >= 0; --t) {
          acc += v[t];
          ym[(r0 + t) * ld + kk] = acc;
        }
      }
    } else {
      for (int r = len - 1; r >= 0; --r) {
        acc += ym[r * ld + kk];
        ym[r * ld + kk] = acc;
      }
    }
  }
  __syncthreads();

  // Gate backward. xm <- dx (ddt_bias sums), rq <- dA_log contribution. Row r_t + 8 u of column
  // kk_t for u < kGateRows: the loads (raw g, dt_bias, A_log) were issued before the dbeta sums.
  for (int u = 0; u < kGateRows; ++u) {
    const int r = r_t + u * (kBwdThreads / 64), kk = kk_t;
    if (r >= len || kk >= kw) continue;
    const float dgate = ym[r * ld + kk];
    const int64_t off = ((tok0 + r) * HV + hv) * K + k0 + kk;
    float out = dgate, dA = 0.f;
    if (p.use_gate_in_kernel) {
      float x = graw[u];
      if (p.dt_bias != nullptr) x += gbias;
      const bool has_a = p.A_log != nullptr;
      const float a = gscale;
      if (p.use_lower_bound_gate) {
        const float sg = sigmoidf_(a * x);
        out = dgate * p.lower_bound * sg * (1.f - sg) * a;
        dA = has_a ? out * x : 0.f;
      } else {
        const float sp = x > 20.f ? x : log1pf(expf(x));
        const float dsp = x > 20.f ? 1.f : sigmoidf_(x);
        out = -dgate * a * dsp;
        dA = dgate * (-a * sp);
      }
    }
    store_any(p.dg, p.g_dtype, off, out);
    xm[r * ld + kk] = out;
    rq[r * ld + kk] = dA;
  }
  if (!gate_partials) return;
  __syncthreads();
  {
    const float sx = row_sum_8(len, [&](int kk, int r) { return xm[r * ld + kk]; });
    const float sa = row_sum_8(len, [&](int kk, int r) { return rq[r * ld + kk]; });
    const int kk = threadIdx.x >> 3;
    if ((threadIdx.x & 7) == 0) {
      if (kk < kw) p.ddt_part[(slot * HV + hv) * K + k0 + kk] = sx;
      vred[kk] = kk < kw ? sa : 0.f;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int kk = 0; kk < kw; ++kk) s += vred[kk];
    p.dA_part[(slot * HV + hv) * nks + ks] = s;
  }
}

}  // namespace bwd
}  // namespace cuda
}  // namespace kda_ext

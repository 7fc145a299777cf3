// kda_ext CUDA: kernel 2 "chunk_state_output" of the forward: the sequential state pass over a
// sequence's chunks fused with the output (h, v_new, o, final state).
//
// Design: one CTA of 256 threads per (V slice of BV columns, sequence, value head), grid
// (N*ceil(V/BV), HV); it walks the sequence's chunks in order with the state slice S [K, BV] in
// fp32 shared memory (BV = 32, or 16 for small grids: see "V slice width" below). Per chunk
// (FLA's chunk_gated_delta_rule_fwd_h + chunk_gla_fwd_o_gk fused):
//   h[slot] = S (k dtype), v_new = u - w Sh, o = scale qg Sh + Aqk v_new,
//   S <- exp(G_last) (.) rows S + kg^T v_new,
// where Sh is S rounded to k's dtype (what h stores, and what FLA feeds its dots) and v_new is
// rounded to v's dtype before it is used as an operand. Tiles arrive by cp.async into three
// [BT, K] buffers (w, qg, kg), each refilled for the next chunk as soon as it is consumed, so
// the global latency of chunk c+1 hides behind chunk c's MMAs (H100, bf16 B4 T4096 H16 K128:
// 1.01 ms with plain loads, 0.71 ms now; the loop is now bound by its own MMA/sync chain).
// Where three buffers don't fit in 227 KB (fp32 inputs, BT = 64, K > 160) a single buffer is
// reused for w, qg and kg in turn, still cp.async, without the prefetch.
// Fusing o here (instead of a separate grid over chunks) saves re-reading h and qg from memory;
// it costs parallelism when N*HV is small, which is the same trade FLA's h kernel already makes.
//
// V slice width. Every step is independent per V column (column j of v_new, o and S needs only
// column j of S, u and v_new), so the slice width changes the grid, not the math. BV = 32 is the
// default. When N*HV*ceil(V/32) is below the SM count (B = 1, T = 32768, HV = 16, V = 128: 64
// CTAs on 132 SMs, 512 chunks each) half the GPU idles and the time is one CTA's chain of chunk
// steps; BV = 16 doubles the CTAs and shortens each chunk step (the element-wise passes over the
// [*, BV] tiles and S's update halve). launch_fwd.cu picks it (the rule is there) for chunk 64
// with the compile-time K = 128 build or the general-K build. With 16 columns the [BT, BV]
// products w Sh and qg Sh have only BT/16 tiles, half the warps, so BV = 16 re-deals the work:
//  - with o and the triple-buffered layout, qg Sh (which needs only Sh) moves from step 4 to
//    step 2, where the warps the w Sh tiles leave idle form it (qg then travels with w in the
//    WG group); step 4 only adds Aqk v_new to it;
//  - otherwise (the recompute without o, or the single-buffer layout), w Sh is split over two
//    warps per tile by the parity of its k steps: the two accumulation chains mma_16x16 runs in
//    one warp, summed (even + odd) in step 3 exactly as mma_16x16 sums them.
// Both keep every product's operands and accumulation order, so BV = 16 and BV = 32 give the
// same bits in every output (the tests compare them bitwise). For BV = 32 the code is unchanged.
#pragma once

#include "cuda/chunk_prepare.cuh"
#include "cuda/mma.cuh"
#include "cuda/params.h"

namespace kda_ext {
namespace cuda {

constexpr int kStateThreads = 256;
constexpr int kBV = 32;        // the default V slice width
constexpr int kBVNarrow = 16;  // the slice for small grids (see the header)

template <int BV>
struct StateSlice {
  static_assert(BV == kBV || BV == kBVNarrow, "chunk_state_output: V slices of 32 or 16 columns");
  static constexpr int kLds = BV + 4;     // fp32 [*, BV] tiles
  static constexpr int kLdh = BV + 8;     // T [*, BV] tiles
  static constexpr int kTiles = BV / 16;  // 16-column MMA tiles per slice
};
// Opt-in shared memory per block on H100/H200; the triple-buffered layout is used when it fits
// (the host re-checks the chosen layout against the device's real limit).
constexpr int64_t kSmemBudget = 232448;

struct StateLayout {
  int64_t S, Sh, bw, bq, bk, abuf, ubuf, graw, pb, vn, dec;
  int64_t total;
  int KP, ldw;
  bool triple;  // separate w/qg/kg buffers, prefetched one chunk ahead
};

template <typename T, int BT, int BV>
__host__ __device__ inline StateLayout state_layout_for(int64_t K, bool triple) {
  constexpr int kLds = StateSlice<BV>::kLds, kLdh = StateSlice<BV>::kLdh;
  StateLayout l{};
  l.KP = static_cast<int>(align_up(K, 16));
  l.ldw = l.KP + 8;
  l.triple = triple;
  SmemCarver c;
  l.S = c.take<float>(static_cast<int64_t>(l.KP) * kLds);
  l.Sh = c.take<T>(static_cast<int64_t>(l.KP) * kLdh);
  l.bw = c.take<T>(static_cast<int64_t>(BT) * l.ldw);
  l.bq = triple ? c.take<T>(static_cast<int64_t>(BT) * l.ldw) : l.bw;
  l.bk = triple ? c.take<T>(static_cast<int64_t>(BT) * l.ldw) : l.bw;
  l.abuf = c.take<T>(BT * (BT + 8));
  l.ubuf = c.take<T>(BT * kLdh);
  l.graw = c.take<float>(l.KP);
  // BV = 16: pb is followed by pq, a second fp32 [BT, BV] product tile (the kernel's step 2).
  l.pb = c.take<float>(BT * kLds * (BV == kBVNarrow ? 2 : 1));
  l.vn = c.take<T>(BT * kLdh);
  l.dec = c.take<float>(l.KP);
  l.total = align_up(c.offset, 128);
  return l;
}

template <typename T, int BT, int BV>
__host__ __device__ inline StateLayout state_layout(int64_t K) {
  const StateLayout t = state_layout_for<T, BT, BV>(K, true);
  return t.total <= kSmemBudget ? t : state_layout_for<T, BT, BV>(K, false);
}

// kFixedKP: the padded K (align_up(K, 16)) as a compile-time constant, or 0 for any K. With it
// the layout, the leading dimensions of the w/qg/kg tiles and the MMA trip counts are constants:
// a wmma load with a run-time leading dimension costs an IMAD per element and the copies a
// division per call, and this kernel is issue-bound (~2.3K instructions per warp per chunk, a
// few percent of them tensor-core work). The host picks 64, 128 or 256 for K in 49..64,
// 113..128 or 241..256 with chunk 64 (K = 128: static SASS of the bf16 kernel 5576 -> 3176
// instructions) and 0 otherwise. BV: the V slice width, 32 or 16 (see the header).
template <typename T, int BT, int kFixedKP, int BV>
__global__ void __launch_bounds__(kStateThreads, 2)
    chunk_state_output_kernel(const ChunkKdaFwdParams p) {
  constexpr int kLds = StateSlice<BV>::kLds, kLdh = StateSlice<BV>::kLdh;
  constexpr int kTiles = StateSlice<BV>::kTiles;
  constexpr int NC = BT / 16;
  constexpr int LDA = BT + 8;
  constexpr int kWarps = kStateThreads / 32;
  constexpr int kVec = 16 / sizeof(T);
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t HV = p.HV;
  const int K = static_cast<int>(p.K), V = static_cast<int>(p.V);  // <= 256 (host-checked)
  // (K only matters here through align_up(K, 16), which kFixedKP fixes when set.)
  const StateLayout lay = state_layout<T, BT, BV>(kFixedKP > 0 ? kFixedKP : K);
  float* S = reinterpret_cast<float*>(smem + lay.S);
  T* Sh = reinterpret_cast<T*>(smem + lay.Sh);
  T* bw = reinterpret_cast<T*>(smem + lay.bw);
  T* bq = reinterpret_cast<T*>(smem + lay.bq);
  T* bk = reinterpret_cast<T*>(smem + lay.bk);
  T* abuf = reinterpret_cast<T*>(smem + lay.abuf);
  T* ubuf = reinterpret_cast<T*>(smem + lay.ubuf);
  float* graw = reinterpret_cast<float*>(smem + lay.graw);
  float* pb = reinterpret_cast<float*>(smem + lay.pb);
  T* vn = reinterpret_cast<T*>(smem + lay.vn);
  float* dec = reinterpret_cast<float*>(smem + lay.dec);
  float* pq = pb + BT * kLds;  // BV = 16 only (see state_layout_for)
  const int KP = kFixedKP > 0 ? kFixedKP : lay.KP;
  const int ldw = kFixedKP > 0 ? kFixedKP + 8 : lay.ldw;
  const bool triple = lay.triple;

  const int tid = threadIdx.x, warp = tid / 32;
  // grid (N * V tiles, HV): sequences on x, which has no 65535 limit (thousands of short
  // sequences times the heads would overflow gridDim.y); a sequence's V tiles stay adjacent in
  // launch order so they share its k/w/qg reads in L2.
  const int64_t v_tiles = (V + BV - 1) / BV;
  const int64_t n = blockIdx.x / v_tiles;
  const int64_t hv = blockIdx.y;
  const int64_t v0 = (blockIdx.x % v_tiles) * BV;
  if (n >= p.N || v0 >= V) return;
  const int vcols = static_cast<int>(V - v0 < BV ? V - v0 : BV);
  const int64_t b = p.varlen ? 0 : n;
  const SeqRange r = seq_range(p, n);
  const int64_t slot_base = p.varlen ? p.chunk_offsets[n] : b * p.NT;
  const int64_t slot_limit = p.B * p.NT;
  const int64_t nchunks = (r.eos - r.bos + BT - 1) / BT;

  const T* w = static_cast<const T*>(p.w);
  const T* u = static_cast<const T*>(p.u);
  const T* qg = static_cast<const T*>(p.qg);
  const T* kg = static_cast<const T*>(p.kg);
  const T* Aqk = static_cast<const T*>(p.Aqk);
  const float* g_cum = p.g_cum;
  T* o = static_cast<T*>(p.o);
  T* v_new = static_cast<T*>(p.v_new);
  T* h = static_cast<T*>(p.h);
  // BV = 16's two ways of dealing step 2 to all warps (see the header); both false for BV = 32.
  // q_early: qg Sh in step 2, qg in the WG group. split_ws: w Sh by k-step parity into pb and pq.
  const bool q_early = BV == kBVNarrow && triple && o != nullptr;
  const bool split_ws = BV == kBVNarrow && !q_early;
  // Workspaces come from the allocator (base aligned), so rows are 16-byte aligned exactly when
  // the row length is a multiple of the vector width.
  const bool vec_k = (K % kVec) == 0;
  const bool vec_v = (V % kVec) == 0;
  const bool vec_g = (K % 4) == 0;
  // state_v_first h stores: when the threads cover whole K rows (KP = 64, 128, 256), thread t
  // keeps row t % KP and the columns t / KP + j * (threads / KP).
  const bool sv_whole = kStateThreads % KP == 0;
  const int sv_kr = tid % KP, sv_c0 = tid / KP, sv_cstep = sv_whole ? kStateThreads / KP : 1;

  auto chunk_rows = [&](int64_t ci, int64_t& row0, int& L) {
    const int64_t start = r.bos + ci * BT;
    L = static_cast<int>(r.eos - start < BT ? r.eos - start : BT);
    row0 = b * p.T + start;
  };
  auto issue_q = [&](int64_t ci) {
    if (o == nullptr) return;
    int64_t row0;
    int L;
    chunk_rows(ci, row0, L);
    issue_tile<T, kStateThreads>(bq, ldw, qg + (row0 * HV + hv) * K, HV * K, L, BT, K, KP, vec_k);
  };
  // w and the g_cum row of the chunk's last token (needed first: steps 1-2); with q_early qg too.
  auto issue_wg = [&](int64_t ci) {
    int64_t row0;
    int L;
    chunk_rows(ci, row0, L);
    issue_tile<T, kStateThreads>(bw, ldw, w + (row0 * HV + hv) * K, HV * K, L, BT, K, KP, vec_k);
    issue_tile<float, kStateThreads>(graw, 0, g_cum + ((row0 + L - 1) * HV + hv) * K, 0, 1, 1, K,
                                     KP, vec_g);
    if (q_early) issue_q(ci);
  };
  // Aqk and the u slice (steps 3-4).
  auto issue_au = [&](int64_t ci) {
    int64_t row0;
    int L;
    chunk_rows(ci, row0, L);
    if (o != nullptr)  // Aqk and qg feed only the output (the recompute passes neither)
      issue_tile<T, kStateThreads>(abuf, LDA, Aqk + (row0 * HV + hv) * BT, HV * BT, L, BT, BT, BT,
                                   true);
    issue_tile<T, kStateThreads>(ubuf, kLdh, u + (row0 * HV + hv) * V + v0, HV * V, L, BT, vcols,
                                 BV, vec_v);
  };
  auto issue_k = [&](int64_t ci) {
    int64_t row0;
    int L;
    chunk_rows(ci, row0, L);
    issue_tile<T, kStateThreads>(bk, ldw, kg + (row0 * HV + hv) * K, HV * K, L, BT, K, KP, vec_k);
  };

  // S entering the first chunk: h0 (either layout) or zero. Rows >= K and columns >= V stay 0.
  const int64_t state_base = (n * HV + hv) * K * V;
  for (int idx = tid; idx < KP * BV; idx += kStateThreads) {
    const int kr = idx / BV, c = idx % BV;
    float x = 0.f;
    if (p.h0 != nullptr && kr < K && c < vcols)
      x = p.state_v_first ? p.h0[state_base + (v0 + c) * K + kr]
                          : p.h0[state_base + kr * V + v0 + c];
    S[kr * kLds + c] = x;
  }
  // Triple buffering keeps three commit groups in flight, in this order: WG = {w, g row},
  // AQ = {Aqk, u, qg}, KG = {kg}. Each is refilled for chunk c+1 as soon as chunk c has consumed
  // it (WG after step 2, AQ after step 4, KG after step 6), and every wait is wait_group<2>
  // (the oldest group done). Empty groups are committed past the last chunk so the count holds.
  // With q_early (BV = 16) qg moves from AQ to WG: step 2 consumes it with w.
  if (triple && nchunks > 0) {
    issue_wg(0);
    cp_async_commit();
    issue_au(0);
    if (!q_early) issue_q(0);
    cp_async_commit();
    issue_k(0);
    cp_async_commit();
  }

  for (int64_t ci = 0; ci < nchunks; ++ci) {
    int64_t row0;
    int L;
    chunk_rows(ci, row0, L);
    const int64_t slot = slot_base + ci;
    const bool has_next = ci + 1 < nchunks;

    if (triple) {
      cp_async_wait<2>();  // WG(c)
    } else {
      issue_wg(ci);
      issue_au(ci);
      cp_async_commit();
      cp_async_wait<0>();
    }
    __syncthreads();

    // 1. decay factors; Sh = S rounded; h[slot] = Sh.
    for (int kr = tid; kr < KP; kr += kStateThreads) dec[kr] = kr < K ? __expf(graw[kr]) : 0.f;
    const bool store_h = h != nullptr && slot < slot_limit;
    // The slot's state at column v0 (h is [K, V] per head, or [V, K] with state_v_first): the
    // offsets inside it are below K * V and stay int, as in chunk_prepare.
    T* h_tile = store_h ? h + slot * HV * K * V + hv * K * V + (p.state_v_first ? v0 * K : v0)
                        : nullptr;
    if constexpr (BV == kBVNarrow) {
      // The same four loops as the BV = 32 ones below, kept rolled in the fp16 K = 128 and the
      // fp32 general-K builds, which spilled at the register cap with the compiler's unrolling.
      constexpr bool kRolledSh = (std::is_same<T, __half>::value && kFixedKP == 128) ||
                                 (std::is_same<T, float>::value && kFixedKP == 0);
      if (p.state_v_first && !store_h) {
        for_strided<kRolledSh>(tid, KP * BV, kStateThreads, [&](int idx) {
          const int kr = idx / BV, c = idx % BV;
          Sh[kr * kLdh + c] = from_float<T>(S[kr * kLds + c]);
        });
      } else if (p.state_v_first && sv_whole) {
        for_strided<kRolledSh>(sv_c0, BV, sv_cstep, [&](int c) {
          const T x = from_float<T>(S[sv_kr * kLds + c]);
          Sh[sv_kr * kLdh + c] = x;
          if (sv_kr < K && c < vcols) h_tile[c * K + sv_kr] = x;
        });
      } else if (p.state_v_first) {
        for_strided<kRolledSh>(tid, KP * BV, kStateThreads, [&](int idx) {
          const int c = idx / KP, kr = idx % KP;
          const T x = from_float<T>(S[kr * kLds + c]);
          Sh[kr * kLdh + c] = x;
          if (store_h && kr < K && c < vcols) h_tile[c * K + kr] = x;
        });
      } else {
        for_strided<kRolledSh>(tid, KP * BV, kStateThreads, [&](int idx) {
          const int kr = idx / BV, c = idx % BV;
          const T x = from_float<T>(S[kr * kLds + c]);
          Sh[kr * kLdh + c] = x;
          if (store_h && kr < K && c < vcols) h_tile[kr * V + c] = x;
        });
      }
    } else {
      if (p.state_v_first && !store_h) {
        // Nothing goes to h: the plain (row, column) order, no division (as below).
        for (int idx = tid; idx < KP * BV; idx += kStateThreads) {
          const int kr = idx / BV, c = idx % BV;
          Sh[kr * kLdh + c] = from_float<T>(S[kr * kLds + c]);
        }
      } else if (p.state_v_first && sv_whole) {
        // h rows run along K: each thread keeps one K row (consecutive threads, consecutive h
        // entries) and walks the columns, without the run-time division by KP per element.
        for (int c = sv_c0; c < BV; c += sv_cstep) {
          const T x = from_float<T>(S[sv_kr * kLds + c]);
          Sh[sv_kr * kLdh + c] = x;
          if (sv_kr < K && c < vcols) h_tile[c * K + sv_kr] = x;
        }
      } else if (p.state_v_first) {
        for (int idx = tid; idx < KP * BV; idx += kStateThreads) {
          const int c = idx / KP, kr = idx % KP;
          const T x = from_float<T>(S[kr * kLds + c]);
          Sh[kr * kLdh + c] = x;
          if (store_h && kr < K && c < vcols) h_tile[c * K + kr] = x;
        }
      } else {
        for (int idx = tid; idx < KP * BV; idx += kStateThreads) {
          const int kr = idx / BV, c = idx % BV;
          const T x = from_float<T>(S[kr * kLds + c]);
          Sh[kr * kLdh + c] = x;
          if (store_h && kr < K && c < vcols) h_tile[kr * V + c] = x;
        }
      }
    }
    __syncthreads();

    // 2. pb = w Sh
    if constexpr (BV == kBVNarrow) {
      // One 16-column tile: 2 * NC jobs, the second NC of them pq = scale qg Sh (q_early) or the
      // odd-parity half of w Sh (split_ws, pb then holds the even half).
      for (int job = warp; job < 2 * NC; job += kWarps) {
        const int mi = job % NC;
        const bool second = job >= NC;
        AccFrag<T> acc;
        wmma::fill_fragment(acc, 0.f);
        if (q_early) {
          mma_16x16<T, wmma::row_major, wmma::row_major>(acc, (second ? bq : bw) + 16 * mi * ldw,
                                                         ldw, Sh, kLdh, KP);
          if (second) {
#pragma unroll
            for (int t = 0; t < acc.num_elements; ++t) acc.x[t] *= p.scale;
          }
        } else {
          mma_16x16_chain<T>(acc, bw + 16 * mi * ldw, ldw, Sh, kLdh, KP, second ? 1 : 0);
        }
        store_acc_shared<T>((second ? pq : pb) + 16 * mi * kLds, acc, kLds);
      }
    } else {
      for (int job = warp; job < NC * kTiles; job += kWarps) {
        const int mi = job / kTiles, ni = job % kTiles;
        AccFrag<T> acc;
        wmma::fill_fragment(acc, 0.f);
        mma_16x16<T, wmma::row_major, wmma::row_major>(acc, bw + 16 * mi * ldw, ldw, Sh + 16 * ni,
                                                       kLdh, KP);
        store_acc_shared<T>(pb + 16 * mi * kLds + 16 * ni, acc, kLds);
      }
    }
    __syncthreads();

    // 3. v_new = u - w Sh (rounded to v's dtype); decay S; qg ready.
    if (triple) {
      if (has_next) issue_wg(ci + 1);
      cp_async_commit();
      cp_async_wait<2>();  // AQ(c)
      __syncthreads();
    } else {
      issue_q(ci);
      cp_async_commit();
    }
    // The chunk's v_new and o rows at column v0 (null where not wanted); row i, column c is
    // i * HV * V + c in int from there (launch_fwd.cu checks BT * HV * V < 2^31).
    const int vs = static_cast<int>(HV * V);
    const int64_t tile0 = (row0 * HV + hv) * V + v0;
    T* vn_tile = v_new != nullptr ? v_new + tile0 : nullptr;
    for (int idx = tid; idx < BT * BV; idx += kStateThreads) {
      const int i = idx / BV, c = idx % BV;
      // (split_ws: w Sh is the even + the odd chain, added as mma_16x16 adds them.)
      const T x = from_float<T>(
          to_float<T>(ubuf[i * kLdh + c]) -
          (split_ws ? pb[i * kLds + c] + pq[i * kLds + c] : pb[i * kLds + c]));
      vn[i * kLdh + c] = x;
      if (vn_tile != nullptr && i < L && c < vcols) vn_tile[i * vs + c] = x;
    }
    for (int idx = tid; idx < KP * BV; idx += kStateThreads) {
      const int kr = idx / BV, c = idx % BV;
      S[kr * kLds + c] *= dec[kr];
    }
    if (!triple) cp_async_wait<0>();
    __syncthreads();

    // 4. pb = scale qg Sh + Aqk v_new (skipped when no o is wanted: the backward's recompute;
    // with q_early scale qg Sh is pq already).
    for (int job = warp; o != nullptr && job < NC * kTiles; job += kWarps) {
      const int mi = job / kTiles, ni = job % kTiles;
      AccFrag<T> acc;
      if (q_early) {
        load_acc_shared<T>(acc, pq + 16 * mi * kLds, kLds);
      } else {
        wmma::fill_fragment(acc, 0.f);
        mma_16x16<T, wmma::row_major, wmma::row_major>(acc, bq + 16 * mi * ldw, ldw, Sh + 16 * ni,
                                                       kLdh, KP);
#pragma unroll
        for (int t = 0; t < acc.num_elements; ++t) acc.x[t] *= p.scale;
      }
      mma_16x16<T, wmma::row_major, wmma::row_major>(acc, abuf + 16 * mi * LDA, LDA,
                                                     vn + 16 * ni, kLdh, BT);
      store_acc_shared<T>(pb + 16 * mi * kLds + 16 * ni, acc, kLds);
    }
    __syncthreads();

    // 5. o; prefetch the next chunk's Aqk/u/qg (their buffers are free now); kg ready.
    if (triple) {
      if (has_next) {
        issue_au(ci + 1);
        if (!q_early) issue_q(ci + 1);
      }
      cp_async_commit();
    } else {
      issue_k(ci);
      cp_async_commit();
    }
    T* o_tile = o != nullptr ? o + tile0 : nullptr;
    for (int idx = tid; o_tile != nullptr && idx < BT * BV; idx += kStateThreads) {
      const int i = idx / BV, c = idx % BV;
      if (i < L && c < vcols) o_tile[i * vs + c] = from_float<T>(pb[i * kLds + c]);
    }
    if (triple) cp_async_wait<2>(); else cp_async_wait<0>();  // KG(c)
    __syncthreads();

    // 6. S += kg^T v_new (kg^T read column-major out of the row-major kg tile).
    for (int job = warp; job < (KP / 16) * kTiles; job += kWarps) {
      const int mi = job / kTiles, ni = job % kTiles;
      AccFrag<T> acc;
      float* sp = S + 16 * mi * kLds + 16 * ni;
      load_acc_shared<T>(acc, sp, kLds);
      mma_16x16<T, wmma::col_major, wmma::row_major>(acc, bk + 16 * mi, ldw, vn + 16 * ni, kLdh,
                                                     BT);
      store_acc_shared<T>(sp, acc, kLds);
    }
    __syncthreads();
    if (triple) {
      if (has_next) issue_k(ci + 1);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();
  // A sequence without chunks skips the loop and its barriers: the state_v_first store below reads
  // S entries other warps initialised, so publish them first.
  __syncthreads();

  if (p.final_state != nullptr) {
    if (p.state_v_first) {
      for (int idx = tid; idx < K * BV; idx += kStateThreads) {
        const int c = idx / K, kr = idx % K;
        if (c < vcols) p.final_state[state_base + (v0 + c) * K + kr] = S[kr * kLds + c];
      }
    } else {
      for (int idx = tid; idx < K * BV; idx += kStateThreads) {
        const int kr = idx / BV, c = idx % BV;
        if (c < vcols) p.final_state[state_base + kr * V + v0 + c] = S[kr * kLds + c];
      }
    }
  }
}

}  // namespace cuda
}  // namespace kda_ext

// kda_ext CUDA: chunk_state_output with the state in registers (mma.sync), for 16-bit inputs,
// K = 128 and chunk 64: the Kimi configuration. Same contract as chunk_state_output_kernel
// (chunk_state_output.cuh), grid (N * ceil(V / BV), HV); every other configuration keeps that
// kernel.
//
// Why a second kernel: the wmma kernel keeps S in fp32 shared memory and sends every product's
// accumulator through shared memory for the element-wise work, with six barriers a chunk; it is
// bound by that chain (H100, (2, 8192, 32, 128) bf16: 0.93 ms, ~7 us a chunk, against FLA's
// 0.32 ms h kernel + 0.36 ms output kernel). Here (BV = 32 or 64 columns a CTA, BV / 4 warps):
// - warp w holds the rows [16 (w % 8), +16) and the 32 columns from 32 (w / 8) of the state slice
//   S [128, BV] as four fp32 m16n8 accumulators (16 registers a thread) for the whole sequence;
// - per chunk, S goes to shared memory once, rounded to T (Sh: what h stores and what FLA feeds
//   its dots); each warp then computes one 16 x 16 block of v_new = u - w Sh and of scale qg Sh,
//   rounds v_new to T into shared memory, adds Aqk v_new to the output block in registers (only
//   the Aqk blocks on or below the diagonal: the others are stored zeros) and stores o straight
//   from registers; S <- exp(G_last) S + kg^T v_new with kg^T read through ldmatrix.trans;
// - two barriers a chunk; inputs arrive by cp.async in two groups: {Aqk, kg} double-buffered and
//   issued one chunk ahead; {w, qg, u, the g_cum row of the last token} issued after the v_new
//   barrier for the next chunk (BV = 32: single buffers, 109 KB, two CTAs per SM) or for the one
//   after it (BV = 64: double buffers, one CTA of 16 warps per SM).
// Why two widths: the V slices of a head all read the same w, qg and kg; at 32 columns those reads
// (4x per head at V = 128) move ~4 TB/s through L2 by the traffic model, 64 columns halve them
// (H100, main shape: -4% of the kernel, so latency, not L2, is most of its time) but need
// N*HV*ceil(V/64) CTAs to fill the GPU (the host picks, launch_fwd.cu).
// Numerics as the wmma kernel: fp32 state and accumulators, 16-bit operands rounded at the same
// points (Sh, v_new); only the order of the fp32 sums differs.
#pragma once

#include "cuda/mma.cuh"
#include "cuda/mma_sync.cuh"
#include "cuda/params.h"

namespace kda_ext {
namespace cuda {

namespace state_mma {

constexpr int kBT = 64;     // chunk
constexpr int kK = 128;     // K (exactly)
constexpr int kLdw = kK + 8;  // w/qg/kg tiles [64][128]: 272-byte rows, conflict-free ldmatrix
constexpr int kLda = kBT + 8;  // Aqk [64][64]: 144-byte rows

template <int BV>
struct Cfg {
  static_assert(BV == 32 || BV == 64, "state_output_mma: V slices of 32 or 64 columns");
  static constexpr int kWarps = BV / 4;  // 8 row blocks of S times BV / 32 column groups
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMinBlocks = BV == 32 ? 2 : 1;  // 128 registers a thread either way
  static constexpr int kLdv = BV + 8;  // Sh [128][BV], v_new and u [64][BV]: conflict-free rows
  static constexpr int kBlocksPerRow = BV / 16;  // 16 x 16 v_new/o blocks per 16-row block
  static constexpr bool kDoubleG1 = BV == 64;    // w/qg/u double-buffered (room at one CTA/SM)
  static constexpr int kG1Bufs = kDoubleG1 ? 2 : 1;
};

struct Layout {
  int64_t bw[2], bq[2], ubuf[2], glast[2], bk[2], abuf[2], sh, vn, total;
};

template <typename T, int BV>
__host__ __device__ inline Layout layout() {
  using C = Cfg<BV>;
  Layout l{};
  SmemCarver c;
  for (int i = 0; i < 2; ++i) {
    const bool own = i < C::kG1Bufs;  // single-buffered: both entries name one buffer
    l.bw[i] = own ? c.take<T>(kBT * kLdw) : l.bw[0];
    l.bq[i] = own ? c.take<T>(kBT * kLdw) : l.bq[0];
    l.ubuf[i] = own ? c.take<T>(kBT * C::kLdv) : l.ubuf[0];
    l.glast[i] = own ? c.take<float>(kK) : l.glast[0];
    l.bk[i] = c.take<T>(kBT * kLdw);
    l.abuf[i] = c.take<T>(kBT * kLda);
  }
  l.sh = c.take<T>(kK * C::kLdv);
  l.vn = c.take<T>(kBT * C::kLdv);
  l.total = align_up(c.offset, 128);
  return l;
}

}  // namespace state_mma

template <typename T, int BV>
__global__ void __launch_bounds__(state_mma::Cfg<BV>::kThreads, state_mma::Cfg<BV>::kMinBlocks)
    chunk_state_output_mma_kernel(const ChunkKdaFwdParams p) {
  using namespace state_mma;
  using C = Cfg<BV>;
  constexpr int kThreads = C::kThreads, kLdv = C::kLdv;
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout lay = layout<T, BV>();
  // Buffers by chunk parity (selects, not lay.x[i & 1]: a run-time index into the layout struct
  // would put it in local memory).
  auto buf = [&](const int64_t (&off)[2], int64_t ci) -> T* {
    return reinterpret_cast<T*>(smem + ((ci & 1) ? off[1] : off[0]));
  };
  auto glast_of = [&](int64_t ci) -> float* {
    return reinterpret_cast<float*>(smem + ((ci & 1) ? lay.glast[1] : lay.glast[0]));
  };
  T* sh = reinterpret_cast<T*>(smem + lay.sh);
  T* vn = reinterpret_cast<T*>(smem + lay.vn);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int64_t HV = p.HV;
  const int V = static_cast<int>(p.V);
  // grid (N * V tiles, HV), as chunk_state_output_kernel's (a sequence's V tiles adjacent).
  const int64_t v_tiles = (V + BV - 1) / BV;
  const int64_t n = blockIdx.x / v_tiles;
  const int64_t hv = blockIdx.y;
  const int v0 = static_cast<int>((blockIdx.x % v_tiles) * BV);
  if (n >= p.N || v0 >= V) return;
  const int vcols = V - v0 < BV ? V - v0 : BV;
  const int64_t b = p.varlen ? 0 : n;
  const SeqRange r = seq_range(p, n);
  const int64_t slot_base = p.varlen ? p.chunk_offsets[n] : b * p.NT;
  const int64_t slot_limit = p.B * p.NT;
  const int64_t nchunks = (r.eos - r.bos + kBT - 1) / kBT;

  const T* w = static_cast<const T*>(p.w);
  const T* u = static_cast<const T*>(p.u);
  const T* qg = static_cast<const T*>(p.qg);
  const T* kg = static_cast<const T*>(p.kg);
  const T* Aqk = static_cast<const T*>(p.Aqk);
  T* o = static_cast<T*>(p.o);
  T* v_new = static_cast<T*>(p.v_new);
  T* h = static_cast<T*>(p.h);
  const bool want_o = o != nullptr;  // uniform: the backward's recompute passes no o, Aqk, qg
  // u's rows are 16-byte aligned when V is a multiple of 8 (allocator-aligned base); o and v_new
  // take 4-byte pair stores when V is even.
  const bool vec_v = (V % 8) == 0;
  const bool pair_v = (V % 2) == 0;
  const int vs = static_cast<int>(HV * V);  // row stride of u, o, v_new (BT * HV * V < 2^31)

  // (Only these two values of the sequence's range stay live in the chunk loop: the kernel runs
  // at the 128-register cap.)
  const int64_t seq_row0 = b * p.T + r.bos, seq_len = r.eos - r.bos;
  auto chunk_rows = [&](int64_t ci, int64_t& row0, int& L) {
    const int64_t left = seq_len - ci * kBT;
    L = static_cast<int>(left < kBT ? left : kBT);
    row0 = seq_row0 + ci * kBT;
  };
  // Group 1 of chunk ci: w, qg (with o), u slice, g_cum of the last row. Past the last chunk
  // nothing is issued (the caller still commits, so the group count stays uniform).
  auto issue_group1 = [&](int64_t ci) {
    if (ci >= nchunks) return;
    int64_t row0;
    int L;
    chunk_rows(ci, row0, L);
    issue_tile<T, kThreads>(buf(lay.bw, ci), kLdw, w + (row0 * HV + hv) * kK, HV * kK, L, kBT,
                            kK, kK, true);
    if (want_o)
      issue_tile<T, kThreads>(buf(lay.bq, ci), kLdw, qg + (row0 * HV + hv) * kK, HV * kK, L, kBT,
                              kK, kK, true);
    issue_tile<T, kThreads>(buf(lay.ubuf, ci), kLdv, u + (row0 * HV + hv) * V + v0, HV * V, L,
                            kBT, vcols, BV, vec_v);
    issue_tile<float, kThreads>(glast_of(ci), 0, p.g_cum + ((row0 + L - 1) * HV + hv) * kK, 0, 1,
                                1, kK, kK, true);
  };
  // Group 2 of chunk ci: Aqk (with o), kg.
  auto issue_group2 = [&](int64_t ci) {
    if (ci >= nchunks) return;
    int64_t row0;
    int L;
    chunk_rows(ci, row0, L);
    if (want_o)
      issue_tile<T, kThreads>(buf(lay.abuf, ci), kLda, Aqk + (row0 * HV + hv) * kBT, HV * kBT, L,
                              kBT, kBT, kBT, true);
    issue_tile<T, kThreads>(buf(lay.bk, ci), kLdw, kg + (row0 * HV + hv) * kK, HV * kK, L, kBT,
                            kK, kK, true);
  };

  // S: this warp's rows srow (+8) of K, columns scol + 8 j + 2 t4 (+1) of the slice (C layout).
  float S[4][4];
  const int srow = 16 * (warp % 8) + g, scol = 32 * (warp / 8);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int kr = srow + (e >= 2 ? 8 : 0), c = scol + 8 * j + 2 * t4 + (e & 1);
      float x = 0.f;
      const int64_t state_base = (n * HV + hv) * kK * V;
      if (p.h0 != nullptr && c < vcols)
        x = p.state_v_first ? p.h0[state_base + static_cast<int64_t>(v0 + c) * kK + kr]
                            : p.h0[state_base + static_cast<int64_t>(kr) * V + v0 + c];
      S[j][e] = x;
    }
  }

  // cp.async groups, committed by every thread in the same order (empty past the last chunk):
  // prologue {G1(0), G2(0)}, then [BV = 64: G1(1)]; per chunk ci, G2(ci + 1) after B1 and
  // G1(ci + 1) (BV = 32) or G1(ci + 2) (BV = 64) after B2. Before B1 of chunk ci everything but
  // the newest group (BV = 64: G1(ci + 1)) must be complete.
  issue_group1(0);
  issue_group2(0);
  cp_async_commit();
  if constexpr (C::kDoubleG1) {
    issue_group1(1);
    cp_async_commit();
  }
  // This warp's v_new / output block: rows 16 mb + g (+8) of the chunk, columns
  // 16 nb + 8 j + 2 t4 (+1) of the slice.
  const int mb = warp / C::kBlocksPerRow, nb = warp % C::kBlocksPerRow;

  for (int64_t ci = 0; ci < nchunks; ++ci) {
    int64_t row0;
    int L;
    chunk_rows(ci, row0, L);
    const int64_t slot = slot_base + ci;
    const T* bw = buf(lay.bw, ci);
    const T* bq = buf(lay.bq, ci);
    const T* ubuf = buf(lay.ubuf, ci);
    const float* glast = glast_of(ci);
    const T* bk = buf(lay.bk, ci);
    const T* abuf = buf(lay.abuf, ci);

    // 1. Sh = S rounded to T (the chunk's entering state).
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = scol + 8 * j + 2 * t4;
      *reinterpret_cast<uint32_t*>(sh + srow * kLdv + c) = pack2<T>(S[j][0], S[j][1]);
      *reinterpret_cast<uint32_t*>(sh + (srow + 8) * kLdv + c) = pack2<T>(S[j][2], S[j][3]);
    }
    if constexpr (C::kDoubleG1) cp_async_wait<1>(); else cp_async_wait<0>();
    __syncthreads();  // B1: Sh, G1(ci), G2(ci) visible; every warp is done with chunk ci - 1
    issue_group2(ci + 1);  // into the buffers chunk ci - 1 used
    cp_async_commit();
    // h[slot] = Sh (only where wanted: the backward's recompute).
    if (h != nullptr && slot < slot_limit) {
      T* h_tile = h + (slot * HV + hv) * kK * V + (p.state_v_first ? v0 * kK : v0);
      if (p.state_v_first) {
        const int kr = tid % kK;
        for (int c = tid / kK; c < vcols; c += kThreads / kK)
          h_tile[c * kK + kr] = sh[kr * kLdv + c];
      } else {
        store_smem_tile<T, kThreads, BV>(h_tile, V, sh, kLdv, kK, vcols, vec_v && vcols == BV);
      }
    }

    // 2. The warp's block of w Sh and qg Sh over K (B operand: Sh through ldmatrix.trans).
    float pv[2][4] = {}, po[2][4] = {};
#pragma unroll 4
    for (int kk = 0; kk < kK / 16; ++kk) {
      uint32_t bs[4], aw[4];
      ldmatrix_x4_trans(bs, sh + (16 * kk + 8 * ((lane / 8) % 2) + lane % 8) * kLdv + 16 * nb +
                                8 * (lane / 16));
      ldmatrix_x4(aw, bw + (16 * mb + lane % 16) * kLdw + 16 * kk + 8 * (lane / 16));
      mma_16x8x16<T>(pv[0], aw, bs[0], bs[1]);
      mma_16x8x16<T>(pv[1], aw, bs[2], bs[3]);
      if (want_o) {
        uint32_t aq[4];
        ldmatrix_x4(aq, bq + (16 * mb + lane % 16) * kLdw + 16 * kk + 8 * (lane / 16));
        mma_16x8x16<T>(po[0], aq, bs[0], bs[1]);
        mma_16x8x16<T>(po[1], aq, bs[2], bs[3]);
      }
    }
    // v_new = u - w Sh, rounded to T, into shared memory (rows past L: u and w rows are zero).
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = 16 * mb + g + 8 * hf, c = 16 * nb + 8 * j + 2 * t4;
        const float2 uu = unpack2<T>(*reinterpret_cast<const uint32_t*>(ubuf + i * kLdv + c));
        *reinterpret_cast<uint32_t*>(vn + i * kLdv + c) =
            pack2<T>(uu.x - pv[j][2 * hf], uu.y - pv[j][2 * hf + 1]);
      }
    }
    // Decay: S <- exp(G_last) (.) rows of S.
    {
      const float d0 = __expf(glast[srow]), d1 = __expf(glast[srow + 8]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        S[j][0] *= d0;
        S[j][1] *= d0;
        S[j][2] *= d1;
        S[j][3] *= d1;
      }
    }
    __syncthreads();  // B2: v_new visible; w, qg, u, the g_cum row and Sh of chunk ci are free
    issue_group1(ci + C::kG1Bufs);
    cp_async_commit();
    // v_new rows of the chunk (only where wanted: the backward's recompute).
    if (v_new != nullptr)
      store_smem_tile<T, kThreads, BV>(v_new + (row0 * HV + hv) * V + v0, vs, vn, kLdv, L, vcols,
                                       vec_v && vcols == BV);

    // 3. o = scale qg Sh + Aqk v_new over the Aqk blocks on or below the diagonal; stored from
    // registers.
    if (want_o) {
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) po[j][e] *= p.scale;
      for (int kk = 0; kk <= mb; ++kk) {
        uint32_t aa[4], bv[4];
        ldmatrix_x4(aa, abuf + (16 * mb + lane % 16) * kLda + 16 * kk + 8 * (lane / 16));
        ldmatrix_x4_trans(bv, vn + (16 * kk + 8 * ((lane / 8) % 2) + lane % 8) * kLdv + 16 * nb +
                                  8 * (lane / 16));
        mma_16x8x16<T>(po[0], aa, bv[0], bv[1]);
        mma_16x8x16<T>(po[1], aa, bv[2], bv[3]);
      }
      T* o_tile = o + (row0 * HV + hv) * V + v0;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int i = 16 * mb + g + 8 * hf, c = 16 * nb + 8 * j + 2 * t4;
          if (i >= L) continue;
          const float x = po[j][2 * hf], y = po[j][2 * hf + 1];
          if (pair_v && c + 1 < vcols) {
            *reinterpret_cast<uint32_t*>(o_tile + i * vs + c) = pack2<T>(x, y);
          } else {
            if (c < vcols) o_tile[i * vs + c] = from_float<T>(x);
            if (c + 1 < vcols) o_tile[i * vs + c + 1] = from_float<T>(y);
          }
        }
      }
    }

    // 4. S += kg^T v_new: A = kg^T (this warp's 16 rows of K) by ldmatrix.trans of the [t][K]
    // tile, B = v_new [t][scol..scol + 32) for the n-tile pairs (0, 1) and (2, 3).
#pragma unroll 2
    for (int kk = 0; kk < kBT / 16; ++kk) {
      uint32_t ak[4], b01[4], b23[4];
      ldmatrix_x4_trans(ak, bk + (16 * kk + 8 * (lane / 16) + lane % 8) * kLdw + 16 * (warp % 8) +
                                8 * ((lane / 8) % 2));
      const T* vrow =
          vn + (16 * kk + 8 * ((lane / 8) % 2) + lane % 8) * kLdv + scol + 8 * (lane / 16);
      ldmatrix_x4_trans(b01, vrow);
      ldmatrix_x4_trans(b23, vrow + 16);
      mma_16x8x16<T>(S[0], ak, b01[0], b01[1]);
      mma_16x8x16<T>(S[1], ak, b01[2], b01[3]);
      mma_16x8x16<T>(S[2], ak, b23[0], b23[1]);
      mma_16x8x16<T>(S[3], ak, b23[2], b23[3]);
    }
  }
  cp_async_wait<0>();

  if (p.final_state != nullptr) {
    const int64_t state_base = (n * HV + hv) * kK * V;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kr = srow + (e >= 2 ? 8 : 0), c = scol + 8 * j + 2 * t4 + (e & 1);
        if (c >= vcols) continue;
        if (p.state_v_first)
          p.final_state[state_base + static_cast<int64_t>(v0 + c) * kK + kr] = S[j][e];
        else
          p.final_state[state_base + static_cast<int64_t>(kr) * V + v0 + c] = S[j][e];
      }
    }
  }
}

}  // namespace cuda
}  // namespace kda_ext

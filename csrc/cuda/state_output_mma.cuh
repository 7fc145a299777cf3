// kda_ext CUDA: chunk_state_output with the state in registers (mma.sync), for 16-bit inputs,
// K = 128 and chunk 64: the Kimi configuration. Same contract and grid as
// chunk_state_output_kernel (chunk_state_output.cuh) with 32-column V slices; every other
// configuration keeps that kernel.
//
// Why a second kernel: the wmma kernel keeps S in fp32 shared memory and sends every product's
// accumulator through shared memory for the element-wise work, with six barriers a chunk; it is
// bound by that chain (H100, (2, 8192, 32, 128) bf16: 0.93 ms, ~7 us a chunk, against FLA's
// 0.32 ms h kernel + 0.36 ms output kernel). Here:
// - 8 warps; warp w holds the rows [16 w, 16 w + 16) of the state slice S [128, 32] as four fp32
//   m16n8 accumulators (16 registers a thread) for the whole sequence;
// - per chunk, S goes to shared memory once, rounded to T (Sh: what h stores and what FLA feeds
//   its dots); warp w then computes the 16 x 16 block (rows 16 (w / 2), columns 16 (w % 2)) of
//   v_new = u - w Sh and of scale qg Sh, rounds v_new to T into shared memory, adds Aqk v_new to
//   the output block in registers (only the Aqk blocks on or below the diagonal: the others are
//   stored zeros) and stores o straight from registers; S <- exp(G_last) S + kg^T v_new with
//   kg^T read through ldmatrix.trans;
// - two barriers a chunk; inputs arrive by cp.async in two groups, each refilled for the next chunk
//   as soon as every warp is past its last use: {w, qg, u, the g_cum row of the last token} after
//   the v_new barrier, {Aqk, kg} after the Sh barrier. Single buffers (82 KB) keep two CTAs per SM.
// Numerics as the wmma kernel: fp32 state and accumulators, 16-bit operands rounded at the same
// points (Sh, v_new); only the order of the fp32 sums differs.
#pragma once

#include "cuda/chunk_state_output.cuh"
#include "cuda/mma_sync.cuh"

namespace kda_ext {
namespace cuda {

namespace state_mma {

constexpr int kThreads = 256;
constexpr int kBT = 64;     // chunk
constexpr int kK = 128;     // K (exactly)
constexpr int kBVm = 32;    // V slice
constexpr int kLdw = kK + 8;     // w/qg/kg tiles [64][128]: 272-byte rows, conflict-free ldmatrix
constexpr int kLdsh = kBVm + 8;  // Sh [128][32], v_new [64][32], u [64][32]: 80-byte rows
constexpr int kLda = kBT + 8;    // Aqk [64][64]: 144-byte rows

struct Layout {
  int64_t bw, bq, bk, abuf, ubuf, sh, vn, glast, total;
};

template <typename T>
__host__ __device__ inline Layout layout() {
  Layout l{};
  SmemCarver c;
  l.bw = c.take<T>(kBT * kLdw);
  l.bq = c.take<T>(kBT * kLdw);
  l.bk = c.take<T>(kBT * kLdw);
  l.abuf = c.take<T>(kBT * kLda);
  l.ubuf = c.take<T>(kBT * kLdsh);
  l.sh = c.take<T>(kK * kLdsh);
  l.vn = c.take<T>(kBT * kLdsh);
  l.glast = c.take<float>(kK);
  l.total = align_up(c.offset, 128);
  return l;
}

}  // namespace state_mma

template <typename T>
__global__ void __launch_bounds__(state_mma::kThreads, 2)
    chunk_state_output_mma_kernel(const ChunkKdaFwdParams p) {
  using namespace state_mma;
  static_assert(kThreads == kStateThreads, "the host launches both kernels alike");
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout lay = layout<T>();
  T* bw = reinterpret_cast<T*>(smem + lay.bw);
  T* bq = reinterpret_cast<T*>(smem + lay.bq);
  T* bk = reinterpret_cast<T*>(smem + lay.bk);
  T* abuf = reinterpret_cast<T*>(smem + lay.abuf);
  T* ubuf = reinterpret_cast<T*>(smem + lay.ubuf);
  T* sh = reinterpret_cast<T*>(smem + lay.sh);
  T* vn = reinterpret_cast<T*>(smem + lay.vn);
  float* glast = reinterpret_cast<float*>(smem + lay.glast);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int64_t HV = p.HV;
  const int V = static_cast<int>(p.V);
  // grid (N * V tiles, HV), as chunk_state_output_kernel's 32-column grid.
  const int64_t v_tiles = (V + kBVm - 1) / kBVm;
  const int64_t n = blockIdx.x / v_tiles;
  const int64_t hv = blockIdx.y;
  const int v0 = static_cast<int>((blockIdx.x % v_tiles) * kBVm);
  if (n >= p.N || v0 >= V) return;
  const int vcols = V - v0 < kBVm ? V - v0 : kBVm;
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
  // Group 1 of chunk ci: w, qg (with o), u slice, g_cum of the last row.
  auto issue_group1 = [&](int64_t ci) {
    int64_t row0;
    int L;
    chunk_rows(ci, row0, L);
    issue_tile<T, kThreads>(bw, kLdw, w + (row0 * HV + hv) * kK, HV * kK, L, kBT, kK, kK, true);
    if (want_o)
      issue_tile<T, kThreads>(bq, kLdw, qg + (row0 * HV + hv) * kK, HV * kK, L, kBT, kK, kK, true);
    issue_tile<T, kThreads>(ubuf, kLdsh, u + (row0 * HV + hv) * V + v0, HV * V, L, kBT, vcols,
                            kBVm, vec_v);
    issue_tile<float, kThreads>(glast, 0, p.g_cum + ((row0 + L - 1) * HV + hv) * kK, 0, 1, 1, kK,
                                kK, true);
  };
  // Group 2 of chunk ci: Aqk (with o), kg.
  auto issue_group2 = [&](int64_t ci) {
    int64_t row0;
    int L;
    chunk_rows(ci, row0, L);
    if (want_o)
      issue_tile<T, kThreads>(abuf, kLda, Aqk + (row0 * HV + hv) * kBT, HV * kBT, L, kBT, kBT, kBT,
                              true);
    issue_tile<T, kThreads>(bk, kLdw, kg + (row0 * HV + hv) * kK, HV * kK, L, kBT, kK, kK, true);
  };

  // S: this warp's rows 16 warp + g (+8) of K, columns 8 j + 2 t4 (+1) of the slice (C layout).
  float S[4][4];
  const int srow = 16 * warp + g;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int kr = srow + (e >= 2 ? 8 : 0), c = 8 * j + 2 * t4 + (e & 1);
      float x = 0.f;
      const int64_t state_base = (n * HV + hv) * kK * V;
      if (p.h0 != nullptr && c < vcols)
        x = p.state_v_first ? p.h0[state_base + static_cast<int64_t>(v0 + c) * kK + kr]
                            : p.h0[state_base + static_cast<int64_t>(kr) * V + v0 + c];
      S[j][e] = x;
    }
  }

  if (nchunks > 0) {
    issue_group1(0);
    issue_group2(0);
    cp_async_commit();
  }
  // This warp's output block: rows 16 mb + g (+8) of the chunk, columns 16 nb + 8 j + 2 t4 (+1).
  const int mb = warp / 2, nb = warp % 2;

  for (int64_t ci = 0; ci < nchunks; ++ci) {
    int64_t row0;
    int L;
    chunk_rows(ci, row0, L);
    const int64_t slot = slot_base + ci;

    // 1. Sh = S rounded to T (the chunk's entering state).
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = 8 * j + 2 * t4;
      *reinterpret_cast<uint32_t*>(sh + srow * kLdsh + c) = pack2<T>(S[j][0], S[j][1]);
      *reinterpret_cast<uint32_t*>(sh + (srow + 8) * kLdsh + c) = pack2<T>(S[j][2], S[j][3]);
    }
    cp_async_wait<0>();  // group 1 of this chunk (and, for the first chunk, group 2)
    __syncthreads();     // B1: Sh and group 1 visible; every warp is done with the previous chunk
    if (ci > 0) {        // Aqk and kg of this chunk: their buffers were last read before B1
      issue_group2(ci);
      cp_async_commit();
    }
    // h[slot] = Sh (only where wanted: the backward's recompute).
    if (h != nullptr && slot < slot_limit) {
      T* h_tile = h + (slot * HV + hv) * kK * V + (p.state_v_first ? v0 * kK : v0);
      if (p.state_v_first) {
        const int kr = tid % kK;
        for (int c = tid / kK; c < vcols; c += kThreads / kK) h_tile[c * kK + kr] = sh[kr * kLdsh + c];
      } else if (vec_v && vcols == kBVm) {
        for (int idx = tid; idx < kK * (kBVm / 8); idx += kThreads) {
          const int kr = idx / (kBVm / 8), c = (idx % (kBVm / 8)) * 8;
          *reinterpret_cast<uint4*>(h_tile + kr * V + c) =
              *reinterpret_cast<const uint4*>(sh + kr * kLdsh + c);
        }
      } else {
        for (int idx = tid; idx < kK * kBVm; idx += kThreads) {
          const int kr = idx / kBVm, c = idx % kBVm;
          if (c < vcols) h_tile[kr * V + c] = sh[kr * kLdsh + c];
        }
      }
    }

    // 2. The warp's block of w Sh and qg Sh over K (B operand: Sh through ldmatrix.trans).
    float pv[2][4] = {}, po[2][4] = {};
#pragma unroll 4
    for (int kk = 0; kk < kK / 16; ++kk) {
      uint32_t bs[4], aw[4];
      ldmatrix_x4_trans(bs, sh + (16 * kk + 8 * ((lane / 8) % 2) + lane % 8) * kLdsh + 16 * nb +
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
        const float2 uu = unpack2<T>(*reinterpret_cast<const uint32_t*>(ubuf + i * kLdsh + c));
        *reinterpret_cast<uint32_t*>(vn + i * kLdsh + c) =
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
    cp_async_wait<0>();  // group 2 of this chunk
    __syncthreads();     // B2: v_new, Aqk, kg visible; w, qg, u, g_cum row and Sh are free
    if (ci + 1 < nchunks) {
      issue_group1(ci + 1);
      cp_async_commit();
    }
    // v_new rows of the chunk (only where wanted: the backward's recompute).
    if (v_new != nullptr) {
      T* vn_tile = v_new + (row0 * HV + hv) * V + v0;
      if (vec_v && vcols == kBVm) {
        const int i = tid / (kBVm / 8), c = (tid % (kBVm / 8)) * 8;  // 64 x 4 vectors, one each
        if (i < L)
          *reinterpret_cast<uint4*>(vn_tile + i * vs + c) =
              *reinterpret_cast<const uint4*>(vn + i * kLdsh + c);
      } else {
        for (int idx = tid; idx < kBT * kBVm; idx += kThreads) {
          const int i = idx / kBVm, c = idx % kBVm;
          if (i < L && c < vcols) vn_tile[i * vs + c] = vn[i * kLdsh + c];
        }
      }
    }

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
        ldmatrix_x4_trans(bv, vn + (16 * kk + 8 * ((lane / 8) % 2) + lane % 8) * kLdsh + 16 * nb +
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

    // 4. S += kg^T v_new: A = kg^T (rows 16 warp.. of K) by ldmatrix.trans of the [t][K] tile,
    // B = v_new [t][32] for the n-tile pairs (0, 1) and (2, 3).
#pragma unroll 2
    for (int kk = 0; kk < kBT / 16; ++kk) {
      uint32_t ak[4], b01[4], b23[4];
      ldmatrix_x4_trans(ak, bk + (16 * kk + 8 * (lane / 16) + lane % 8) * kLdw + 16 * warp +
                                8 * ((lane / 8) % 2));
      const T* vrow = vn + (16 * kk + 8 * ((lane / 8) % 2) + lane % 8) * kLdsh + 8 * (lane / 16);
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
        const int kr = srow + (e >= 2 ? 8 : 0), c = 8 * j + 2 * t4 + (e & 1);
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

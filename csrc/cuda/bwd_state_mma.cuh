// kda_ext CUDA backward: the reverse state pass with dS in registers (mma.sync), for bf16 inputs,
// K = 128, chunk 64 and V slices of 32 columns. Same contract and grid as bwd_state_kernel
// (bwd_state.cuh); every other configuration keeps that kernel.
//
// Per chunk, last to first (dS = dLoss/d(state leaving the chunk)):
//   dh[chunk] = dS (rounded to T), dv_new = Aqk^T do + kg dS,
//   dS <- e^{G_last} (.)rows dS + scale qg^T do - w^T dv_new;   finally dh0 = dS.
// Why: bwd_state_kernel keeps dS in fp32 shared memory and sends each product through shared
// memory with seven barriers a chunk (H100, (2, 8192, 32, 128) bf16: 1.79 ms, ~14 us a chunk,
// against FLA's 0.44 ms dh kernel). Here, as in state_output_mma.cuh:
// - warp w holds rows [16 w, 16 w + 16) of dS [128, 32] as four fp32 m16n8 accumulators for the
//   whole sequence, and computes the 16 x 16 block (rows 16 (w / 2), columns 16 (w % 2)) of
//   dv_new, stored to global memory from registers;
// - the products whose second operand is fp32 (kg dS, w^T dv_new; the wmma kernel runs them in
//   tf32) take that operand as two bf16 terms, x = hi + lo with hi = bf16(x), lo = bf16(x - hi):
//   two bf16 MMAs carry ~16 bits of x's mantissa, more than tf32's 11, on the bf16 pipe with
//   ldmatrix operands. dh stores hi (= dS rounded to bf16, as before); the products of two bf16
//   operands (Aqk^T do, qg^T do) are exact-operand MMAs as before;
// - two barriers a chunk; cp.async groups: {kg, Aqk, the g_cum row} for the next chunk issued
//   after the dv_new barrier, {qg, w} for this chunk after the first barrier, do double-buffered
//   and issued a chunk ahead. ~98 KB of shared memory: two CTAs per SM.
// fp16 keeps the wmma kernel: a split into fp16 hi + lo loses the lo term to fp16's exponent range
// for small gradients.
#pragma once

#include "cuda/bwd_common.cuh"
#include "cuda/mma_sync.cuh"

namespace kda_ext {
namespace cuda {
namespace bwd {

namespace state_bwd_mma {

constexpr int kBT = 64;
constexpr int kK = 128;
constexpr int kBV = 32;
constexpr int kThreads = 256;
constexpr int kLdk = kK + 8;   // qg, kg, w [64][128]: 272-byte rows (conflict-free ldmatrix)
constexpr int kLda = kBT + 8;  // Aqk [64][64]
constexpr int kLdv = kBV + 8;  // do [64][32], dS hi/lo [128][32], -dv_new hi/lo [64][32]

struct Layout {
  int64_t kg, qg, w, aqk, dout[2], grow, dsh, dsl, dvh, dvl, total;
};

template <typename T>
__host__ __device__ inline Layout layout() {
  Layout l{};
  SmemCarver c;
  l.kg = c.take<T>(kBT * kLdk);
  l.qg = c.take<T>(kBT * kLdk);
  l.w = c.take<T>(kBT * kLdk);
  l.aqk = c.take<T>(kBT * kLda);
  l.dout[0] = c.take<T>(kBT * kLdv);
  l.dout[1] = c.take<T>(kBT * kLdv);
  l.grow = c.take<float>(kK);
  l.dsh = c.take<T>(kK * kLdv);
  l.dsl = c.take<T>(kK * kLdv);
  l.dvh = c.take<T>(kBT * kLdv);
  l.dvl = c.take<T>(kBT * kLdv);
  l.total = align_up(c.offset, 128);
  return l;
}

}  // namespace state_bwd_mma

template <typename T>
__global__ void __launch_bounds__(state_bwd_mma::kThreads, 2)
    bwd_state_mma_kernel(const ChunkKdaBwdParams p) {
  using namespace state_bwd_mma;
  static_assert(std::is_same<T, __nv_bfloat16>::value, "bf16 only (see the header)");
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout lay = layout<T>();
  T* kgs = reinterpret_cast<T*>(smem + lay.kg);
  T* qgs = reinterpret_cast<T*>(smem + lay.qg);
  T* ws = reinterpret_cast<T*>(smem + lay.w);
  T* aqk = reinterpret_cast<T*>(smem + lay.aqk);
  float* grow = reinterpret_cast<float*>(smem + lay.grow);
  T* dsh = reinterpret_cast<T*>(smem + lay.dsh);
  T* dsl = reinterpret_cast<T*>(smem + lay.dsl);
  T* dvh = reinterpret_cast<T*>(smem + lay.dvh);
  T* dvl = reinterpret_cast<T*>(smem + lay.dvl);
  auto dout_buf = [&](int64_t c) -> T* {
    return reinterpret_cast<T*>(smem + ((c & 1) ? lay.dout[1] : lay.dout[0]));
  };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int64_t HV = p.HV;
  const int V = static_cast<int>(p.V);
  const int64_t n = blockIdx.x, hv = blockIdx.y;
  const int v0 = static_cast<int>(blockIdx.z) * kBV;
  if (n >= p.N || hv >= HV || v0 >= V) return;
  const int vcols = V - v0 < kBV ? V - v0 : kBV;
  const int64_t bos = p.seq_bounds[n], eos = p.seq_bounds[n + 1];
  const int64_t nchunks = eos > bos ? (eos - bos + kBT - 1) / kBT : 0;
  const int64_t slot0 = p.chunk_offsets[n];
  const T* Aqk = static_cast<const T*>(p.Aqk);
  const T* qg = static_cast<const T*>(p.qg);
  const T* kg = static_cast<const T*>(p.kg);
  const T* w = static_cast<const T*>(p.w);
  const T* dO = static_cast<const T*>(p.dout);
  const bool vec_v = (V % 8) == 0;  // do rows and dh rows 16-byte aligned
  const bool pair_v = (V % 2) == 0;
  const int vs = static_cast<int>(HV * V);  // row stride of do and dvn

  auto chunk_rows = [&](int64_t c, int64_t& tok0, int& len) {
    tok0 = bos + c * kBT;
    len = static_cast<int>(eos - tok0 < kBT ? eos - tok0 : kBT);
  };
  // {kg, Aqk, the g_cum row of the chunk's last token} of chunk c (nothing for c < 0).
  auto issue_kag = [&](int64_t c) {
    if (c < 0) return;
    int64_t tok0;
    int len;
    chunk_rows(c, tok0, len);
    issue_tile<T, kThreads>(kgs, kLdk, kg + (tok0 * HV + hv) * kK, HV * kK, len, kBT, kK, kK, true);
    issue_tile<T, kThreads>(aqk, kLda, Aqk + (tok0 * HV + hv) * kBT, HV * kBT, len, kBT, kBT, kBT,
                            true);
    issue_tile<float, kThreads>(grow, 0, p.g_cum + ((tok0 + len - 1) * HV + hv) * kK, 0, 1, 1, kK,
                                kK, true);
  };
  auto issue_qw = [&](int64_t c) {
    int64_t tok0;
    int len;
    chunk_rows(c, tok0, len);
    issue_tile<T, kThreads>(qgs, kLdk, qg + (tok0 * HV + hv) * kK, HV * kK, len, kBT, kK, kK, true);
    issue_tile<T, kThreads>(ws, kLdk, w + (tok0 * HV + hv) * kK, HV * kK, len, kBT, kK, kK, true);
  };
  auto issue_do = [&](int64_t c) {
    if (c < 0) return;
    int64_t tok0;
    int len;
    chunk_rows(c, tok0, len);
    issue_tile<T, kThreads>(dout_buf(c), kLdv, dO + (tok0 * HV + hv) * V + v0, HV * V, len, kBT,
                            vcols, kBV, vec_v);
  };

  // dS: this warp's rows srow (+8) of K, columns 8 j + 2 t4 (+1) of the slice (C layout).
  float S[4][4];
  const int srow = 16 * warp + g;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int kr = srow + (e >= 2 ? 8 : 0), c = 8 * j + 2 * t4 + (e & 1);
      S[j][e] = (p.dht != nullptr && c < vcols) ? p.dht[state_off(p, n * HV + hv, kr, v0 + c)]
                                                : 0.f;
    }
  }
  // This warp's dv_new block: rows 16 mb + g (+8), columns 16 nb + 8 j + 2 t4 (+1).
  const int mb = warp / 2, nb = warp % 2;

  // cp.async groups (every thread commits the same sequence; empty groups past the first chunk):
  // prologue {kag(last), do(last)}; per chunk c after B1: {qw(c)}, {do(c - 1)}; after B2:
  // {kag(c - 1)}. Before B1 everything must be complete, before B2 all but do(c - 1).
  issue_kag(nchunks - 1);
  issue_do(nchunks - 1);
  cp_async_commit();

  for (int64_t c = nchunks - 1; c >= 0; --c) {
    int64_t tok0;
    int len;
    chunk_rows(c, tok0, len);
    const int64_t slot = slot0 + c;
    // Impossible for a sane prefix sum (as in bwd_state_kernel: such a chunk is skipped, dS
    // unchanged); uniform across the block, so every barrier and copy still happens.
    const bool ok_slot = slot >= 0 && slot < p.B * p.NT;
    const T* dout = dout_buf(c);

    // a. dS as bf16 hi + lo, the B operand of kg dS; hi is also dh.
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = 8 * j + 2 * t4;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const float x = S[j][2 * hf], y = S[j][2 * hf + 1];
        uint32_t hi, lo;
        split_bf16x2(x, y, hi, lo);
        const int row = srow + 8 * hf;
        *reinterpret_cast<uint32_t*>(dsh + row * kLdv + col) = hi;
        *reinterpret_cast<uint32_t*>(dsl + row * kLdv + col) = lo;
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // B1: dS hi/lo, kg, Aqk, the g row and do of chunk c visible
    issue_qw(c);  // qg and w were last read by chunk c + 1's dS update, before B1
    cp_async_commit();
    issue_do(c - 1);  // into the buffer chunk c + 1 used
    cp_async_commit();

    // dh[slot] = dS rounded to T (always [K, V]).
    if (ok_slot)
      store_smem_tile<T, kThreads, kBV>(static_cast<T*>(p.dh) + (slot * HV + hv) * kK * V + v0,
                                        V, dsh, kLdv, kK, vcols, vec_v && vcols == kBV);

    // b. dv_new block = Aqk^T do (Aqk^T by ldmatrix.trans; Aqk[j][i] is 0 for j < i, so only the
    // k blocks kk >= mb) + kg dS_hi + kg dS_lo.
    float dv[2][4] = {};
    for (int kk = mb; kk < kBT / 16; ++kk) {
      uint32_t a[4], b[4];
      ldmatrix_x4_trans(a, aqk + (16 * kk + 8 * (lane / 16) + lane % 8) * kLda + 16 * mb +
                               8 * ((lane / 8) % 2));
      ldmatrix_x4_trans(b, dout + (16 * kk + 8 * ((lane / 8) % 2) + lane % 8) * kLdv + 16 * nb +
                               8 * (lane / 16));
      mma_16x8x16<T>(dv[0], a, b[0], b[1]);
      mma_16x8x16<T>(dv[1], a, b[2], b[3]);
    }
#pragma unroll 4
    for (int kk = 0; kk < kK / 16; ++kk) {
      uint32_t a[4], bh[4], bl[4];
      ldmatrix_x4(a, kgs + (16 * mb + lane % 16) * kLdk + 16 * kk + 8 * (lane / 16));
      const int boff =
          (16 * kk + 8 * ((lane / 8) % 2) + lane % 8) * kLdv + 16 * nb + 8 * (lane / 16);
      ldmatrix_x4_trans(bh, dsh + boff);
      ldmatrix_x4_trans(bl, dsl + boff);
      mma_16x8x16<T>(dv[0], a, bh[0], bh[1]);
      mma_16x8x16<T>(dv[1], a, bh[2], bh[3]);
      mma_16x8x16<T>(dv[0], a, bl[0], bl[1]);
      mma_16x8x16<T>(dv[1], a, bl[2], bl[3]);
    }
    // dvn = dv_new rounded to T (global); -dv_new as hi + lo into shared memory for w^T dv_new.
    T* dvn_tile = static_cast<T*>(p.dvn) + (tok0 * HV + hv) * V + v0;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = 16 * mb + g + 8 * hf, col = 16 * nb + 8 * j + 2 * t4;
        const float x = dv[j][2 * hf], y = dv[j][2 * hf + 1];
        if (ok_slot && i < len) {
          if (pair_v && col + 1 < vcols) {
            *reinterpret_cast<uint32_t*>(dvn_tile + i * vs + col) = pack2<T>(x, y);
          } else {
            if (col < vcols) dvn_tile[i * vs + col] = from_float<T>(x);
            if (col + 1 < vcols) dvn_tile[i * vs + col + 1] = from_float<T>(y);
          }
        }
        uint32_t hi, lo;
        split_bf16x2(-x, -y, hi, lo);
        *reinterpret_cast<uint32_t*>(dvh + i * kLdv + col) = hi;
        *reinterpret_cast<uint32_t*>(dvl + i * kLdv + col) = lo;
      }
    }
    const float gam0 = expf(grow[srow]), gam1 = expf(grow[srow + 8]);
    cp_async_wait<1>();  // qg and w of chunk c (do of chunk c - 1 may still be in flight)
    __syncthreads();     // B2: -dv_new hi/lo, qg, w visible; kg, Aqk and the g row are free
    issue_kag(c - 1);
    cp_async_commit();

    // d. dS <- gam (.) dS + scale qg^T do - w^T dv_new (this warp's 16 rows of K; qg^T and w^T
    // by ldmatrix.trans of their [t][K] tiles).
    if (ok_slot) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        S[j][0] *= gam0;
        S[j][1] *= gam0;
        S[j][2] *= gam1;
        S[j][3] *= gam1;
      }
      float qd[4][4] = {};
      const int aoff = 16 * warp + 8 * ((lane / 8) % 2);
#pragma unroll 2
      for (int kk = 0; kk < kBT / 16; ++kk) {
        uint32_t a[4], b01[4], b23[4];
        ldmatrix_x4_trans(a, qgs + (16 * kk + 8 * (lane / 16) + lane % 8) * kLdk + aoff);
        const T* brow = dout + (16 * kk + 8 * ((lane / 8) % 2) + lane % 8) * kLdv + 8 * (lane / 16);
        ldmatrix_x4_trans(b01, brow);
        ldmatrix_x4_trans(b23, brow + 16);
        mma_16x8x16<T>(qd[0], a, b01[0], b01[1]);
        mma_16x8x16<T>(qd[1], a, b01[2], b01[3]);
        mma_16x8x16<T>(qd[2], a, b23[0], b23[1]);
        mma_16x8x16<T>(qd[3], a, b23[2], b23[3]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) S[j][e] += p.scale * qd[j][e];
#pragma unroll 1
      for (int kk = 0; kk < kBT / 16; ++kk) {
        uint32_t a[4], b[4];
        ldmatrix_x4_trans(a, ws + (16 * kk + 8 * (lane / 16) + lane % 8) * kLdk + aoff);
        const int brow = (16 * kk + 8 * ((lane / 8) % 2) + lane % 8) * kLdv + 8 * (lane / 16);
#pragma unroll
        for (int part = 0; part < 2; ++part) {  // hi, then lo
          const T* src = part == 0 ? dvh : dvl;
          ldmatrix_x4_trans(b, src + brow);
          mma_16x8x16<T>(S[0], a, b[0], b[1]);
          mma_16x8x16<T>(S[1], a, b[2], b[3]);
          ldmatrix_x4_trans(b, src + brow + 16);
          mma_16x8x16<T>(S[2], a, b[0], b[1]);
          mma_16x8x16<T>(S[3], a, b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  if (p.dh0 != nullptr) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kr = srow + (e >= 2 ? 8 : 0), c = 8 * j + 2 * t4 + (e & 1);
        if (c < vcols) p.dh0[state_off(p, n * HV + hv, kr, v0 + c)] = S[j][e];
      }
    }
  }
}

}  // namespace bwd
}  // namespace cuda
}  // namespace kda_ext

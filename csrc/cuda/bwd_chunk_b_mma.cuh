// kda_ext CUDA backward: kernel B (bwd_chunk.cuh) with its products in registers (mma.sync), for
// bf16 inputs, chunk 64 and K = V = 128 with 16-byte aligned dvn, v, do, v_new, Akk and dAkk
// partials. Same grid (B*NT slots, HV), same outputs and output contract as bwd_chunk_b_kernel;
// every other configuration keeps that kernel. Per (chunk, value head), rows r, columns j < 64:
//   dAkk = sum of the 2 K-slice partials (fixed order) + beta_j (dvn v^T)[r, j], kept for j < r;
//   dAqk = scale (do v_new^T), kept for j <= r, stored (fp32) for r < len, every j;
//   dvo = Akk^T dvn; dv = beta_r dvo (T); dbeta partial (slot NKS) = sum_v dvo v;
//   dL = -(Akk^T (dAkk Akk^T)), kept for j < r, stored (fp32) for r < len, every j.
// Why: bwd_chunk_b_kernel stages everything as fp32 tiles (V in two 64-column tiles, each widened
// from T, products through wmma with accumulators round-tripping shared memory, eight barriers a
// V tile; H100, (2, 8192, 32, 128) bf16: 1.17 ms). Here:
// - the whole chunk comes in at once by cp.async as stored (dvn, v, do, v_new: [64][128] bf16;
//   rows past len zero-filled), Akk through registers (masked to its kept lower triangle, as
//   load_chunk_matrix keeps it), the dAkk partials straight into the registers of the
//   accumulator elements they are added to (float2 loads issued before the wait);
// - every product is m16n8k16 bf16 mma.sync with fp32 accumulators, operands by ldmatrix from
//   rows padded by 8 elements (272- / 144-byte strides: the 8 rows of an ldmatrix phase hit
//   disjoint banks);
// - only the needed 16 x 8 tiles run: dAkk, dAqk and dL are kept on (block-)lower triangles, so
//   the three [64 x 64] products cover the 20 tiles with 8 nt <= 16 rb + 15 (rb the 16-row
//   block), split 3/3/2/3/3/2/2/2 over the 8 warps (table kTileRb / kTileNt0 / kTileCnt); Akk^T's zero upper part cuts
//   dvo = Akk^T dvn to k blocks kb >= rb and dL to kb >= rb, and tmp = dAkk Akk^T to kb <= rb.
//   dvo's row blocks are paired {0, 3} / {1, 2} (4 + 1 = 3 + 2 k blocks) with a 32-column quarter
//   per warp: every warp does the same 20 MMA blocks;
// - the products with an fp32 operand (dAkk Akk^T, Akk^T tmp; one tf32 pass in the wmma kernel:
//   11 bits) take it as bf16 hi + lo (x = hi + lo, hi = bf16(x), lo = bf16(x - hi): ~16 bits, two
//   MMAs). The V-loop products have exact bf16 operands (dvn is stored in T); beta_j multiplies
//   the fp32 (dvn v^T) afterwards instead of being folded into a tf32 operand;
// - dAqk, dv and dL go to global memory from the accumulators (a quad writes 32 contiguous bytes
//   of fp32, 16 of bf16), dbeta by quad shuffles and a fixed-order sum over the 4 column
//   quarters through shared memory: deterministic, no atomics;
// - 256 threads, three barriers, ~98 KB of shared memory: two CTAs per SM.
// fp16 keeps the wmma kernel (a fp16 lo term underflows for small gradients, as in
// bwd_state_mma.cuh).
#pragma once

#include "cuda/bwd_common.cuh"
#include "cuda/mma_sync.cuh"

namespace kda_ext {
namespace cuda {
namespace bwd {

namespace chunk_b_mma {

constexpr int kBT = 64;
constexpr int kV = 128;
constexpr int kThreads = 256;
constexpr int kLdv = kV + 8;   // dvn, v, do, v_new [64][128]: 272-byte rows
constexpr int kLda = kBT + 8;  // Akk, dAkk hi/lo, tmp hi/lo [64][64]: 144-byte rows

// 16 x 8 output tiles of the [64 x 64] products per warp w: row block rb, n-tiles nt0 .. nt0 +
// cnt - 1 (cnt 2 or 3). Together the 20 tiles with 8 nt <= 16 rb + 15 (the block-lower triangle,
// diagonal blocks whole), each once:
//   w    0  1  2  3  4  5  6  7
//   rb   3  3  3  2  2  1  1  0
//   nt0  0  3  6  0  3  0  2  0
//   cnt  3  3  2  3  3  2  2  2
// Nibble w of each constant (no array: a run-time index into a local array would go to local
// memory).
constexpr uint32_t kTileRb = 0x01122333u, kTileNt0 = 0x02030630u, kTileCnt = 0x22233233u;

struct Layout {
  int64_t dvn, v, dout, vn, akk, dakh, dakl, tmph, tmpl, beta, dbeta, total;
};

template <typename T>
__host__ __device__ inline Layout layout() {
  Layout l{};
  SmemCarver c;
  l.dvn = c.take<T>(kBT * kLdv);
  l.v = c.take<T>(kBT * kLdv);
  l.dout = c.take<T>(kBT * kLdv);
  l.vn = c.take<T>(kBT * kLdv);
  l.akk = c.take<T>(kBT * kLda);
  l.dakh = c.take<T>(kBT * kLda);
  l.dakl = c.take<T>(kBT * kLda);
  l.beta = c.take<float>(kBT);
  l.dbeta = c.take<float>(4 * kBT);
  // tmp hi/lo reuse do / v_new (both read only by the first products, before the second barrier;
  // 2 x 9216 <= 2 x 17408 bytes).
  l.tmph = l.dout;
  l.tmpl = l.dout + kBT * kLda * static_cast<int64_t>(sizeof(T));
  l.total = align_up(c.offset, 128);
  return l;
}

}  // namespace chunk_b_mma

// Operand loaders used below (see mma_sync.cuh for the fragment layouts; g = lane / 4):
//  (a) A from a row-major [M][K] tile X (A = X): ldmatrix, lane l -> X[m0 + l % 16][k0 + 8 (l / 16)];
//  (b) A = X^T from a row-major [K][M] tile X: ldmatrix.trans, lane l ->
//      X[k0 + 8 (l / 16) + l % 8][m0 + 8 ((l / 8) % 2)];
//  (c) B(k, n) = Y[n][k] from a row-major [N][K] tile Y ("col-major" B), two n-tiles: ldmatrix
//      (no trans), lane l -> Y[n0 + 8 (l / 16) + l % 8][k0 + 8 ((l / 8) % 2)]. Matrix q = l / 8
//      is (n-tile q / 2, k half q % 2); a non-trans 8 x 8 load gives lane i the row i / 4 = g
//      (= n) and columns 2 (i % 4) + {0, 1} (= k 2t..2t+1): exactly b[0] / b[1] of that n-tile,
//      so registers {0, 1} are n-tile 0 and {2, 3} n-tile 1. One n-tile (x2): lanes 0..15 ->
//      Y[n0 + l % 8][k0 + 8 ((l / 8) % 2)];
//  (d) B(k, n) = Y[k][n] from a row-major [K][N] tile Y, two n-tiles: ldmatrix.trans, lane l ->
//      Y[k0 + 8 ((l / 8) % 2) + l % 8][n0 + 8 (l / 16)]. One n-tile (x2): lanes 0..15 ->
//      Y[k0 + 8 ((l / 8) % 2) + l % 8][n0].
template <typename T>
__global__ void __launch_bounds__(chunk_b_mma::kThreads, 2)
    bwd_chunk_b_mma_kernel(const ChunkKdaBwdParams p) {
  using namespace chunk_b_mma;
  static_assert(std::is_same<T, __nv_bfloat16>::value, "bf16 only (see the header)");
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout lay = layout<T>();
  T* dvns = reinterpret_cast<T*>(smem + lay.dvn);
  T* vs = reinterpret_cast<T*>(smem + lay.v);
  T* dos = reinterpret_cast<T*>(smem + lay.dout);
  T* vns = reinterpret_cast<T*>(smem + lay.vn);
  T* akk = reinterpret_cast<T*>(smem + lay.akk);
  T* dakh = reinterpret_cast<T*>(smem + lay.dakh);
  T* dakl = reinterpret_cast<T*>(smem + lay.dakl);
  T* tmph = reinterpret_cast<T*>(smem + lay.tmph);
  T* tmpl = reinterpret_cast<T*>(smem + lay.tmpl);
  float* betas = reinterpret_cast<float*>(smem + lay.beta);
  float* dbs = reinterpret_cast<float*>(smem + lay.dbeta);

  const int64_t HV = p.HV;
  const int64_t hv = blockIdx.y;
  if (hv >= HV) return;
  BwdChunk ch;
  if (!bwd_chunk_of_slot<kBT>(p, blockIdx.x, ch)) return;
  const int len = ch.len;
  const int64_t tok0 = ch.tok0;
  const int64_t ntok = p.B * p.T;
  constexpr int kNks = 128 / kBwdKSlice;  // K = 128: two slices of dAkk partials
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;

  // ---- loads -------------------------------------------------------------------------------
  // dvn, v, do, v_new: [64][128] by cp.async, 16 vectors a row, rows past len zero-filled (the
  // source address clamped to row 0 of the chunk, never read).
  {
    const T* src[4] = {static_cast<const T*>(p.dvn), static_cast<const T*>(p.v),
                       static_cast<const T*>(p.dout), static_cast<const T*>(p.v_new)};
    T* dst[4] = {dvns, vs, dos, vns};
    const int c = (tid % 16) * 8;
#pragma unroll
    for (int m = 0; m < 4; ++m) {
#pragma unroll
      for (int i = 0; i < kBT * 16 / kThreads; ++i) {
        const int r = tid / 16 + i * (kThreads / 16);
        const bool ok = r < len;
        cp_async16(dst[m] + r * kLdv + c, src[m] + ((tok0 + (ok ? r : 0)) * HV + hv) * kV + c, ok);
      }
    }
    cp_async_commit();
  }
  // Akk [64][64] through registers, keeping i < len, j <= i (load_chunk_matrix's kept elements:
  // j < len follows); rows past len read the chunk's last row and are zeroed.
  uint4 akr[kBT * 8 / kThreads];
#pragma unroll
  for (int i = 0; i < kBT * 8 / kThreads; ++i) {
    const int r = tid / 8 + i * (kThreads / 8), j0 = (tid % 8) * 8;
    akr[i] = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.Akk) +
                                             ((tok0 + (r < len ? r : len - 1)) * HV + hv) * kBT + j0);
  }
  // This warp's [64 x 64] tiles (kTileRb ...) and the dAkk partials of its accumulator elements:
  // row rb16 + g + 8 hf, columns 8 nt + 2 t4 (+1), slices summed in order (0 + s0) + s1 as
  // bwd_chunk_b_kernel does. Rows past len read the chunk's last row (masked out below).
  const int rb = (kTileRb >> (4 * warp)) & 15, nt0 = (kTileNt0 >> (4 * warp)) & 15,
            cnt = (kTileCnt >> (4 * warp)) & 15;
  float2 part[3][2];
#pragma unroll
  for (int i = 0; i < 3; ++i) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      part[i][hf] = make_float2(0.f, 0.f);
      if (i >= cnt) continue;
      const int r = 16 * rb + g + 8 * hf, j = 8 * (nt0 + i) + 2 * t4;
      const int64_t row = tok0 + (r < len ? r : len - 1);
      float2 acc = make_float2(0.f, 0.f);
#pragma unroll
      for (int s = 0; s < kNks; ++s) {
        const float2 x =
            *reinterpret_cast<const float2*>(p.dAkk_part + ((s * ntok + row) * HV + hv) * kBT + j);
        acc.x += x.x;
        acc.y += x.y;
      }
      part[i][hf] = acc;
    }
  }
  if (tid < kBT) betas[tid] = tid < len ? beta_value(p, (tok0 + tid) * HV + hv) : 0.f;
  // dAqk and dL outside the tiles computed below (row block rb's columns >= 16 rb + 16) are 0:
  // stored here for rows < len, 4 floats a thread and step.
  for (int idx = tid; idx < 2 * kBT * (kBT / 4); idx += kThreads) {
    const int which = idx / (kBT * kBT / 4), e = idx % (kBT * kBT / 4);
    const int r = e / (kBT / 4), c = (e % (kBT / 4)) * 4;
    if (r < len && c >= 16 * (r / 16) + 16) {
      float* dst = which == 0 ? p.dAqk : p.dL;
      *reinterpret_cast<float4*>(dst + ((tok0 + r) * HV + hv) * kBT + c) =
          make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
#pragma unroll
  for (int i = 0; i < kBT * 8 / kThreads; ++i) {
    const int r = tid / 8 + i * (kThreads / 8), j0 = (tid % 8) * 8;
    // Kept: a prefix of row r's columns, j <= r (none past len): nkeep of this vector's 8.
    const int nkeep = (r < len ? r : -1) - j0 + 1;
    uint32_t* wd = reinterpret_cast<uint32_t*>(&akr[i]);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int k = nkeep - 2 * w;
      wd[w] &= k >= 2 ? 0xffffffffu : (k == 1 ? 0x0000ffffu : 0u);
    }
    *reinterpret_cast<uint4*>(akk + r * kLda + j0) = akr[i];
  }
  cp_async_wait<0>();
  __syncthreads();  // B1: the chunk's tiles, Akk and beta visible

  // ---- dvn v^T and do v_new^T on this warp's tiles (K = V = 128) ----------------------------
  float pk[3][4] = {}, pq[3][4] = {};  // dvn v^T, do v_new^T
  {
    const int arow = (16 * rb + lane % 16) * kLdv + 8 * (lane / 16);                    // (a)
    const int brow = (8 * nt0 + 8 * (lane / 16) + lane % 8) * kLdv + 8 * ((lane / 8) % 2);  // (c)
    const int brow2 = (8 * (nt0 + 2) + lane % 8) * kLdv + 8 * ((lane / 8) % 2);          // (c), x2
#pragma unroll 2
    for (int kk = 0; kk < kV / 16; ++kk) {
      uint32_t ak[4], aq[4], bk[4], bq[4];
      ldmatrix_x4(ak, dvns + arow + 16 * kk);
      ldmatrix_x4(aq, dos + arow + 16 * kk);
      ldmatrix_x4(bk, vs + brow + 16 * kk);
      ldmatrix_x4(bq, vns + brow + 16 * kk);
      mma_16x8x16<T>(pk[0], ak, bk[0], bk[1]);
      mma_16x8x16<T>(pk[1], ak, bk[2], bk[3]);
      mma_16x8x16<T>(pq[0], aq, bq[0], bq[1]);
      mma_16x8x16<T>(pq[1], aq, bq[2], bq[3]);
      if (cnt == 3) {
        uint32_t ck[2], cq[2];
        ldmatrix_x2(ck, vs + brow2 + 16 * kk);
        ldmatrix_x2(cq, vns + brow2 + 16 * kk);
        mma_16x8x16<T>(pk[2], ak, ck[0], ck[1]);
        mma_16x8x16<T>(pq[2], aq, cq[0], cq[1]);
      }
    }
  }
  // dAqk (fp32, scale, kept j <= r, j < len) to global; dAkk (partials + beta_j dvn v^T, kept
  // j < r, r < len) to shared memory as bf16 hi + lo, the A operand of dAkk Akk^T.
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    if (i < cnt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int r = 16 * rb + g + 8 * hf, j = 8 * (nt0 + i) + 2 * t4;
        const bool rin = r < len;
        if (rin) {
          const float a0 = (j < len && j <= r) ? p.scale * pq[i][2 * hf] : 0.f;
          const float a1 = (j + 1 < len && j + 1 <= r) ? p.scale * pq[i][2 * hf + 1] : 0.f;
          *reinterpret_cast<float2*>(p.dAqk + ((tok0 + r) * HV + hv) * kBT + j) =
              make_float2(a0, a1);
        }
        const float d0 = (rin && j < r) ? part[i][hf].x + betas[j] * pk[i][2 * hf] : 0.f;
        const float d1 = (rin && j + 1 < r) ? part[i][hf].y + betas[j + 1] * pk[i][2 * hf + 1] : 0.f;
        uint32_t hi, lo;
        split_bf16x2(d0, d1, hi, lo);
        *reinterpret_cast<uint32_t*>(dakh + r * kLda + j) = hi;
        *reinterpret_cast<uint32_t*>(dakl + r * kLda + j) = lo;
      }
    }
  }

  // ---- dvo = Akk^T dvn: row blocks {0, 3} (warps 0-3) or {1, 2} (warps 4-7), columns
  // [32 q, 32 q + 32) with q = warp % 4; Akk^T[r][j] = 0 for j < r: k blocks kb >= the row block.
  {
    const int q = warp % 4, pair = warp / 4;
    const int rbs[2] = {pair == 0 ? 0 : 1, pair == 0 ? 3 : 2};
    float dvo[2][4][4] = {};
    const int bcol = 32 * q + 8 * (lane / 16);
    for (int kb = rbs[0]; kb < kBT / 16; ++kb) {
      uint32_t b01[4], b23[4];
      const T* brow = dvns + (16 * kb + 8 * ((lane / 8) % 2) + lane % 8) * kLdv + bcol;  // (d)
      ldmatrix_x4_trans(b01, brow);
      ldmatrix_x4_trans(b23, brow + 16);
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        if (kb >= rbs[s]) {
          uint32_t a[4];
          ldmatrix_x4_trans(a, akk + (16 * kb + 8 * (lane / 16) + lane % 8) * kLda + 16 * rbs[s] +
                                   8 * ((lane / 8) % 2));  // (b)
          mma_16x8x16<T>(dvo[s][0], a, b01[0], b01[1]);
          mma_16x8x16<T>(dvo[s][1], a, b01[2], b01[3]);
          mma_16x8x16<T>(dvo[s][2], a, b23[0], b23[1]);
          mma_16x8x16<T>(dvo[s][3], a, b23[2], b23[3]);
        }
      }
    }
    // dv = beta_r dvo (T) for r < len; dbeta: sum over this quarter's columns of dvo v, summed
    // over the quad, then over the four quarters in order after the barrier.
    T* dv = static_cast<T*>(p.dv);
#pragma unroll
    for (int s = 0; s < 2; ++s) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int r = 16 * rbs[s] + g + 8 * hf;
        const float br = betas[r];
        float db = 0.f;
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          const int c = 32 * q + 8 * n + 2 * t4;
          const float x = dvo[s][n][2 * hf], y = dvo[s][n][2 * hf + 1];
          const float2 vv = unpack2<T>(*reinterpret_cast<const uint32_t*>(vs + r * kLdv + c));
          db += x * vv.x;
          db += y * vv.y;
          if (r < len)
            *reinterpret_cast<uint32_t*>(dv + ((tok0 + r) * HV + hv) * kV + c) =
                pack2<T>(br * x, br * y);
        }
        db += __shfl_xor_sync(0xffffffffu, db, 1);
        db += __shfl_xor_sync(0xffffffffu, db, 2);
        if (t4 == 0) dbs[q * kBT + r] = db;
      }
    }
  }
  __syncthreads();  // B2: dAkk hi/lo and the dbeta quarters visible; do / v_new free

  if (tid < len) {
    const float db = ((dbs[tid] + dbs[kBT + tid]) + dbs[2 * kBT + tid]) + dbs[3 * kBT + tid];
    p.dbeta_part[(kNks * ntok + tok0 + tid) * HV + hv] = db;
  }

  // ---- tmp = dAkk Akk^T on this warp's tiles: dAkk[r][m] = 0 for m >= r, so k blocks kb <= rb;
  // A = dAkk hi, then lo (a); B(m, j) = Akk[j][m] (c).
  float tp[3][4] = {};
  {
    const int arow = (16 * rb + lane % 16) * kLda + 8 * (lane / 16);
    const int brow = (8 * nt0 + 8 * (lane / 16) + lane % 8) * kLda + 8 * ((lane / 8) % 2);
    const int brow2 = (8 * (nt0 + 2) + lane % 8) * kLda + 8 * ((lane / 8) % 2);
    for (int kb = 0; kb <= rb; ++kb) {
      uint32_t b[4], b2[2];
      ldmatrix_x4(b, akk + brow + 16 * kb);
      if (cnt == 3) ldmatrix_x2(b2, akk + brow2 + 16 * kb);
#pragma unroll
      for (int part_ = 0; part_ < 2; ++part_) {
        uint32_t a[4];
        ldmatrix_x4(a, (part_ == 0 ? dakh : dakl) + arow + 16 * kb);
        mma_16x8x16<T>(tp[0], a, b[0], b[1]);
        mma_16x8x16<T>(tp[1], a, b[2], b[3]);
        if (cnt == 3) mma_16x8x16<T>(tp[2], a, b2[0], b2[1]);
      }
    }
  }
  // tmp as hi + lo into the do / v_new region (free since B2). dL below reads tmp rows m >= r in
  // columns j < r of its own tiles' column range: tiles (kb, nt) with kb >= rb, all computed.
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    if (i < cnt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int r = 16 * rb + g + 8 * hf, j = 8 * (nt0 + i) + 2 * t4;
        uint32_t hi, lo;
        split_bf16x2(tp[i][2 * hf], tp[i][2 * hf + 1], hi, lo);
        *reinterpret_cast<uint32_t*>(tmph + r * kLda + j) = hi;
        *reinterpret_cast<uint32_t*>(tmpl + r * kLda + j) = lo;
      }
    }
  }
  __syncthreads();  // B3: tmp hi/lo visible

  // ---- dL = -(Akk^T tmp) on this warp's tiles: Akk^T[r][m] = 0 for m < r, k blocks kb >= rb;
  // A = Akk^T (b), B = tmp hi, then lo (d).
  float dl[3][4] = {};
  {
    const int bcol = 8 * nt0 + 8 * (lane / 16);
    for (int kb = rb; kb < kBT / 16; ++kb) {
      uint32_t a[4];
      ldmatrix_x4_trans(a, akk + (16 * kb + 8 * (lane / 16) + lane % 8) * kLda + 16 * rb +
                               8 * ((lane / 8) % 2));
      const int brow = (16 * kb + 8 * ((lane / 8) % 2) + lane % 8) * kLda;
#pragma unroll
      for (int part_ = 0; part_ < 2; ++part_) {
        const T* src = part_ == 0 ? tmph : tmpl;
        uint32_t b[4];
        ldmatrix_x4_trans(b, src + brow + bcol);
        mma_16x8x16<T>(dl[0], a, b[0], b[1]);
        mma_16x8x16<T>(dl[1], a, b[2], b[3]);
        if (cnt == 3) {
          uint32_t b2[2];
          ldmatrix_x2_trans(b2, src + brow + 8 * (nt0 + 2));
          mma_16x8x16<T>(dl[2], a, b2[0], b2[1]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    if (i < cnt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int r = 16 * rb + g + 8 * hf, j = 8 * (nt0 + i) + 2 * t4;
        if (r < len) {
          const float x = (j < r && j < len) ? -dl[i][2 * hf] : 0.f;
          const float y = (j + 1 < r && j + 1 < len) ? -dl[i][2 * hf + 1] : 0.f;
          *reinterpret_cast<float2*>(p.dL + ((tok0 + r) * HV + hv) * kBT + j) = make_float2(x, y);
        }
      }
    }
  }
}

}  // namespace bwd
}  // namespace cuda
}  // namespace kda_ext

// kda_ext CUDA backward: kernel A (state / WY terms of one chunk per K slice) with its products in
// registers (mma.sync), for bf16 inputs, chunk 64, K == V == 128, 16-byte aligned tensors and
// the l2norm rstd already in rstd_qk (or no l2norm). Same contract and grid (B*NT slots, HV, NKS)
// as bwd_chunk_a_kernel (bwd_chunk.cuh): it writes dq_hv, dk_hv, dG, dbeta_part[ks] and
// dAkk_part[ks] with the same index formulas and masks, which kernels B and C read unchanged.
// Every other configuration keeps that kernel (and so does KDA_EXT_BWD_A_KERNEL=wmma).
//
// Math, for the K slice [k0, k0 + 64) of one chunk (S = h[c] [k][v], dSn = dh[c], dvn = dv_new):
//   aq = do S^T, ak = v_new dSn^T, aw = dvn S^T (sums over V = 128), dw = -aw,
//   kb = beta k_hat e^G, dkb = Akk^T dw, dAkk partial = dw kb^T,
//   dq_hv = scale aq e^G, dk_hv = ak e^{Gl-G} + beta e^G dkb,
//   dG = scale aq q_hat e^G - ak k_hat e^{Gl-G} + dkb kb (+ at row len-1: e^{Gl} sum_v S dSn
//        + sum_{r<len} ak k_hat e^{Gl-G}), dbeta partial = sum_k dkb k_hat e^G.
// Why: bwd_chunk_a_kernel (512 threads, ~175 KB of fp32 shared-memory tiles, one CTA per SM) runs
// every product through wmma from shared memory and the element-wise work from shared memory too
// (H100, (2, 8192, 32, 128) bf16: 2.83 ms). Here:
// - 256 threads, ~91 KB of shared memory, at most 128 registers: two CTAs per SM, so one CTA's
//   loads overlap the other's products;
// - phase 1: one cp.async round trip brings the whole slice (S, dSn [64 k][128 v] or S as
//   [128 v][64 k] when state_v_first, do, v_new, dvn [64 t][128 v]) as bf16 tiles (rows padded by
//   8 elements: conflict-free ldmatrix; token rows past len zero-filled). Warp w owns rows
//   16 (w % 4) of t and columns 32 (w / 4) of k, and keeps aq, ak, aw as fp32 m16n8 accumulators
//   (48 registers). All three products have bf16 operands as stored (exact; fp32 accumulation,
//   as the wmma kernel's tf32 / bf16 wmma);
// - phase 2 (reusing phase 1's shared memory): q, k, g_cum, Akk of the slice by cp.async; each
//   thread l2-normalises (rstd from rstd_qk, rounded to bf16 as the wmma kernel's emit_a) the
//   vectors it copied itself, so no barrier between the copy and that pass; dw (from the aw
//   registers) and kb go to shared memory as bf16 hi + lo (x = hi + lo, hi = bf16(x),
//   lo = bf16(x - hi): ~16 bits of mantissa; the wmma kernel ran these two products in one tf32
//   pass, 11 bits). dAkk partial = dw kb^T takes hi*hi + hi*lo + lo*hi (3 MMAs a step) over the
//   whole 64 k of the slice, so a warp's 16 x 32 block is complete in its registers (no
//   cross-warp sum; stored straight to dAkk_part). dkb = Akk^T dw takes Akk (exact bf16) as
//   A = Akk^T (ldmatrix.trans) against dw hi and lo (2 MMAs a step), only the k steps j >= 16
//   (w % 4) (Akk[j][t] = 0 for j < t); its accumulator layout is aq's, so the epilogue is
//   element-wise in registers;
// - epilogue: G, q_hat, k_hat at the accumulator positions from shared memory, kb recomputed in
//   fp32 exactly as the wmma kernel computes it; the dG_last column sums (over the 8 lanes of a
//   column by shuffles, then the 4 row-block warps in order 0..3 through shared memory) and the
//   dbeta row sums (the 4 lanes of a quad, then the two column halves in order) in fixed orders:
//   bitwise deterministic run to run. Only the elements of row len - 1 wait for the column sums.
// fp16 / fp32 / other shapes keep the wmma kernel (an fp16 hi + lo split loses lo to fp16's
// exponent range for small gradients).
#pragma once

#include "cuda/bwd_common.cuh"
#include "cuda/mma_sync.cuh"

namespace kda_ext {
namespace cuda {
namespace bwd {

namespace chunk_a_mma {

constexpr int kBT = 64;
constexpr int kK = 128;  // K == V == 128
constexpr int kV = 128;
constexpr int kKS = kBwdKSlice;  // 64-column K slice
constexpr int kThreads = 256;
constexpr int kLdw = kV + 8;     // 128-wide bf16 rows (S, dSn, do, v_new, dvn): 272 bytes
constexpr int kLdn = kKS + 8;    // 64-wide bf16 rows (S^T when state_v_first, q, k, Akk, dw, kb)
constexpr int kLdg = kKS + 8;    // G fp32 rows: float2 reads of a half warp hit 32 distinct banks
static_assert(kKS == 64 && kBT == 64, "the warp tiling assumes a 64 x 64 slice");

struct Layout {
  // phase 1
  int64_t S, dsn, dout, vn, dvn;
  // phase 2 (over phase 1)
  int64_t q, k, g, akk, dwh, dwl, kbh, kbl;
  // kept: per-row / per-column vectors
  int64_t vec, total;
};

__host__ __device__ inline Layout layout() {
  Layout l{};
  SmemCarver a;
  const int64_t sv = kBT * kLdw > kV * kLdn ? kBT * kLdw : kV * kLdn;  // [64][136] or [128][72]
  l.S = a.take<uint16_t>(sv);
  l.dsn = a.take<uint16_t>(kKS * kLdw);
  l.dout = a.take<uint16_t>(kBT * kLdw);
  l.vn = a.take<uint16_t>(kBT * kLdw);
  l.dvn = a.take<uint16_t>(kBT * kLdw);
  SmemCarver b;
  l.q = b.take<uint16_t>(kBT * kLdn);
  l.k = b.take<uint16_t>(kBT * kLdn);
  l.g = b.take<float>(kBT * kLdg);
  l.akk = b.take<uint16_t>(kBT * kLdn);
  l.dwh = b.take<uint16_t>(kBT * kLdn);
  l.dwl = b.take<uint16_t>(kBT * kLdn);
  l.kbh = b.take<uint16_t>(kBT * kLdn);
  l.kbl = b.take<uint16_t>(kBT * kLdn);
  SmemCarver c;
  c.offset = a.offset > b.offset ? a.offset : b.offset;
  // rq, rk, beta, sds [64] each; column partials [4][64]; row partials [2][64]
  l.vec = c.take<float>(4 * 64 + 4 * 64 + 2 * 64);
  l.total = align_up(c.offset, 128);
  return l;
}

// cp.async of a [kRows][kVpr * 8] bf16 tile (kVpr 16-byte vectors a row) into dst (leading
// dimension ld): row r from src(r) (a pointer to its first element), zero-filled where !ok(r)
// (then src(0) is passed as a valid address that is not read).
template <int kRows, int kVpr, typename U, typename Src, typename Ok>
__device__ __forceinline__ void issue_rows(U* dst, int ld, Src src, Ok ok) {
  constexpr int per = 16 / static_cast<int>(sizeof(U));
  static_assert((kRows * kVpr) % kThreads == 0, "whole rounds of vectors");
#pragma unroll
  for (int u = 0; u < kRows * kVpr / kThreads; ++u) {
    const int idx = static_cast<int>(threadIdx.x) + u * kThreads;
    const int r = idx / kVpr, c = (idx % kVpr) * per;
    const bool valid = ok(r);
    cp_async16(dst + r * ld + c, src(valid ? r : 0) + c, valid);
  }
}

}  // namespace chunk_a_mma

template <typename T>
__global__ void __launch_bounds__(chunk_a_mma::kThreads, 2)
    bwd_chunk_a_mma_kernel(const ChunkKdaBwdParams p) {
  using namespace chunk_a_mma;
  static_assert(std::is_same<T, __nv_bfloat16>::value, "bf16 only (see the header)");
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout lay = layout();
  T* Ss = reinterpret_cast<T*>(smem + lay.S);
  T* dSs = reinterpret_cast<T*>(smem + lay.dsn);
  T* dos = reinterpret_cast<T*>(smem + lay.dout);
  T* vns = reinterpret_cast<T*>(smem + lay.vn);
  T* dvns = reinterpret_cast<T*>(smem + lay.dvn);
  T* qs = reinterpret_cast<T*>(smem + lay.q);
  T* kss = reinterpret_cast<T*>(smem + lay.k);
  float* gs = reinterpret_cast<float*>(smem + lay.g);
  T* akk = reinterpret_cast<T*>(smem + lay.akk);
  T* dwh = reinterpret_cast<T*>(smem + lay.dwh);
  T* dwl = reinterpret_cast<T*>(smem + lay.dwl);
  T* kbh = reinterpret_cast<T*>(smem + lay.kbh);
  T* kbl = reinterpret_cast<T*>(smem + lay.kbl);
  float* vrq = reinterpret_cast<float*>(smem + lay.vec);  // [64] rstd of q rows
  float* vrk = vrq + 64;                                   // [64] rstd of k rows
  float* vbeta = vrk + 64;                                 // [64]
  float* sds = vbeta + 64;                                 // [64] sum_v S[k][v] dSn[k][v]
  float* vcol = sds + 64;                                  // [4][64] dG_last partials by row block
  float* vrow = vcol + 4 * 64;                             // [2][64] dbeta partials by column half

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int mb = warp % 4, nh = warp / 4;  // rows 16 mb of t, columns 32 nh of the k slice
  const int64_t HV = p.HV, H = p.H;
  const int64_t hv = blockIdx.y, ks = blockIdx.z;
  const int64_t k0 = ks * kKS;
  if (hv >= HV || k0 >= kK) return;
  BwdChunk ch;
  if (!bwd_chunk_of_slot<kBT>(p, blockIdx.x, ch)) return;
  const int len = ch.len;
  const int64_t tok0 = ch.tok0;
  const int64_t hq = hv / (HV / H);
  const int64_t sb = ch.slot * HV + hv;
  const bool vf = p.state_v_first;
  const T* h = static_cast<const T*>(p.h);
  const T* dh = static_cast<const T*>(p.dh);
  const T* dO = static_cast<const T*>(p.dout);
  const T* vnew = static_cast<const T*>(p.v_new);
  const T* dvn = static_cast<const T*>(p.dvn);

  // ---- phase 1: the slice's five tiles, one cp.async group --------------------------------
  auto all_rows = [](int) { return true; };
  auto tok_rows = [&](int r) { return r < len; };
  if (vf) {  // h [V][K]: rows v, the slice's 64 columns of k
    issue_rows<kV, kKS / 8>(Ss, kLdn, [&](int v) { return h + (sb * kV + v) * kK + k0; }, all_rows);
  } else {   // h [K][V]: rows k of the slice, 128 columns of v
    issue_rows<kKS, kV / 8>(Ss, kLdw, [&](int kk) { return h + (sb * kK + k0 + kk) * kV; }, all_rows);
  }
  issue_rows<kKS, kV / 8>(dSs, kLdw, [&](int kk) { return dh + (sb * kK + k0 + kk) * kV; }, all_rows);
  issue_rows<kBT, kV / 8>(dos, kLdw, [&](int r) { return dO + ((tok0 + r) * HV + hv) * kV; }, tok_rows);
  issue_rows<kBT, kV / 8>(vns, kLdw, [&](int r) { return vnew + ((tok0 + r) * HV + hv) * kV; }, tok_rows);
  issue_rows<kBT, kV / 8>(dvns, kLdw, [&](int r) { return dvn + ((tok0 + r) * HV + hv) * kV; }, tok_rows);
  cp_async_commit();

  // Per-row scalars (kept region). rstd comes from the recompute (the launch layer sends the
  // case where this kernel would have to compute it to bwd_chunk_a_kernel); without l2norm the
  // wmma kernel stores rstd = 1 for kernel C when rstd_qk exists and was not filled: so here.
  if (tid < kBT) {
    const int r = tid;
    const bool l2 = r < len && p.use_qk_l2norm && p.rstd_ready;
    vrq[r] = l2 ? p.rstd_qk[(tok0 + r) * H + hq] : 1.f;
    vrk[r] = l2 ? p.rstd_qk[(p.B * p.T + tok0 + r) * H + hq] : 1.f;
    vbeta[r] = r < len ? beta_value(p, (tok0 + r) * HV + hv) : 0.f;
    if (!p.rstd_ready && p.rstd_qk != nullptr && ks == 0 && hv % (HV / H) == 0 && r < len) {
      p.rstd_qk[(tok0 + r) * H + hq] = 1.f;
      p.rstd_qk[(p.B * p.T + tok0 + r) * H + hq] = 1.f;
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // B1: phase-1 tiles and the row scalars visible

  // aq = do S^T, ak = v_new dSn^T, aw = dvn S^T over V: A operands row-major [t][v] (ldmatrix,
  // lane l -> row l % 16, column 8 (l / 16)). B(v, k) = S[k][v]: with S stored [k][v] each
  // n (= k) row holds its K (= v) run contiguously, the "column-major B" that ldmatrix without
  // .trans reads: matrix m = l / 8 of an x4 is rows n 8 (m / 2) .. + 8, columns v 8 (m % 2) ..
  // + 8, so lane l points at (row 8 (l / 16) + l % 8, column 8 ((l / 8) % 2)), and thread l gets
  // (n = g, v = 2 t4, 2 t4 + 1) of each matrix = b0 / b1 of n-tile 0 (m = 0, 1) and of n-tile 1
  // (m = 2, 3). dSn [k][v] the same. S stored [v][k] (state_v_first) is the row-major [K][N] case
  // of mma_sync.cuh: ldmatrix.trans.
  float aq[4][4] = {}, ak[4][4] = {}, aw[4][4] = {};
  {
    const int arow = (16 * mb + lane % 16) * kLdw + 8 * (lane / 16);
    const int brow = (32 * nh + 8 * (lane / 16) + lane % 8) * kLdw + 8 * ((lane / 8) % 2);
    const int btr = (8 * ((lane / 8) % 2) + lane % 8) * kLdn + 32 * nh + 8 * (lane / 16);
#pragma unroll 2
    for (int kv = 0; kv < kV / 16; ++kv) {
      uint32_t ado[4], avn[4], advn[4];
      ldmatrix_x4(ado, dos + arow + 16 * kv);
      ldmatrix_x4(avn, vns + arow + 16 * kv);
      ldmatrix_x4(advn, dvns + arow + 16 * kv);
#pragma unroll
      for (int pr = 0; pr < 2; ++pr) {
        uint32_t bs[4], bd[4];
        if (vf) ldmatrix_x4_trans(bs, Ss + btr + 16 * kv * kLdn + 16 * pr);
        else ldmatrix_x4(bs, Ss + brow + 16 * pr * kLdw + 16 * kv);
        ldmatrix_x4(bd, dSs + brow + 16 * pr * kLdw + 16 * kv);
        mma_16x8x16<T>(aq[2 * pr], ado, bs[0], bs[1]);
        mma_16x8x16<T>(aq[2 * pr + 1], ado, bs[2], bs[3]);
        mma_16x8x16<T>(aw[2 * pr], advn, bs[0], bs[1]);
        mma_16x8x16<T>(aw[2 * pr + 1], advn, bs[2], bs[3]);
        mma_16x8x16<T>(ak[2 * pr], avn, bd[0], bd[1]);
        mma_16x8x16<T>(ak[2 * pr + 1], avn, bd[2], bd[3]);
      }
    }
  }
  // sds[k] = sum_v S[k][v] dSn[k][v]: 4 threads a row, each 32 v in a fixed order, then a fixed
  // 2-step xor tree.
  {
    const int kk = tid / 4, part = tid % 4;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int v0 = 8 * (part + 4 * j);
      const uint4 d = *reinterpret_cast<const uint4*>(dSs + kk * kLdw + v0);
      const uint32_t* dw32 = reinterpret_cast<const uint32_t*>(&d);
      if (vf) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 d2 = unpack2<T>(dw32[e]);
          s += to_float<T>(Ss[(v0 + 2 * e) * kLdn + kk]) * d2.x;
          s += to_float<T>(Ss[(v0 + 2 * e + 1) * kLdn + kk]) * d2.y;
        }
      } else {
        const uint4 x = *reinterpret_cast<const uint4*>(Ss + kk * kLdw + v0);
        const uint32_t* x32 = reinterpret_cast<const uint32_t*>(&x);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 s2 = unpack2<T>(x32[e]), d2 = unpack2<T>(dw32[e]);
          s += s2.x * d2.x;
          s += s2.y * d2.y;
        }
      }
    }
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    if (part == 0) sds[kk] = s;
  }
  __syncthreads();  // B2: phase-1 tiles consumed; phase 2 reuses the space

  // ---- phase 2 -------------------------------------------------------------------------------
  // Each thread copies the vectors (r, c0 .. c0 + 8) for idx = tid + 256 u (u = 0, 1) of q, k,
  // Akk and the same 8 columns of g_cum (two vectors), and later transforms exactly those.
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* Akk = static_cast<const T*>(p.Akk);
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int idx = tid + u * kThreads, r = idx / 8, c0 = (idx % 8) * 8;
    const bool in = r < len;
    const int rr = in ? r : len - 1;  // G rows past len repeat the last row (as load_slice_qkg)
    const int64_t qoff = ((tok0 + rr) * H + hq) * kK + k0 + c0;
    cp_async16(qs + r * kLdn + c0, q + qoff, in);
    cp_async16(kss + r * kLdn + c0, k + qoff, in);
    const float* gsrc = p.g_cum + ((tok0 + rr) * HV + hv) * kK + k0 + c0;
    cp_async16(gs + r * kLdg + c0, gsrc, true);
    cp_async16(gs + r * kLdg + c0 + 4, gsrc + 4, true);
    cp_async16(akk + r * kLdn + c0, Akk + ((tok0 + rr) * HV + hv) * kBT + c0, in);
  }
  cp_async_commit();

  // dw = -aw as bf16 hi + lo, [t][k] (each warp its own 16 x 32 block).
#pragma unroll
  for (int n = 0; n < 4; ++n) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = 16 * mb + g + 8 * hf, col = 32 * nh + 8 * n + 2 * t4;
      const float x = -aw[n][2 * hf], y = -aw[n][2 * hf + 1];
      uint32_t hi, lo;
      split_bf16x2(x, y, hi, lo);
      *reinterpret_cast<uint32_t*>(dwh + row * kLdn + col) = hi;
      *reinterpret_cast<uint32_t*>(dwl + row * kLdn + col) = lo;
    }
  }
  cp_async_wait<0>();
  // This thread's own copies are visible to it after the wait: q_hat, k_hat in place (l2norm
  // with the recompute's rstd, rounded to bf16 as emit_a does: bf16 values, so stored exactly),
  // kb = beta k_hat e^G as hi + lo, and Akk masked to its kept lower triangle (j <= i < len: rows
  // past len were zero-filled).
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int idx = tid + u * kThreads, r = idx / 8, c0 = (idx % 8) * 8;
    uint4 qv = *reinterpret_cast<const uint4*>(qs + r * kLdn + c0);
    uint4 kv = *reinterpret_cast<const uint4*>(kss + r * kLdn + c0);
    const float4 ga = *reinterpret_cast<const float4*>(gs + r * kLdg + c0);
    const float4 gb = *reinterpret_cast<const float4*>(gs + r * kLdg + c0 + 4);
    const float gv[8] = {ga.x, ga.y, ga.z, ga.w, gb.x, gb.y, gb.z, gb.w};
    uint32_t* q32 = reinterpret_cast<uint32_t*>(&qv);
    uint32_t* k32 = reinterpret_cast<uint32_t*>(&kv);
    const bool l2 = p.use_qk_l2norm && r < len;
    const float rq = vrq[r], rk = vrk[r], bb = vbeta[r];
    uint4 hi4, lo4;
    uint32_t* hi32 = reinterpret_cast<uint32_t*>(&hi4);
    uint32_t* lo32 = reinterpret_cast<uint32_t*>(&lo4);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float2 q2 = unpack2<T>(q32[e]), k2 = unpack2<T>(k32[e]);
      if (l2) {
        q2.x = round_to<T>(q2.x * rq);
        q2.y = round_to<T>(q2.y * rq);
        k2.x = round_to<T>(k2.x * rk);
        k2.y = round_to<T>(k2.y * rk);
        q32[e] = pack2<T>(q2.x, q2.y);
        k32[e] = pack2<T>(k2.x, k2.y);
      }
      const float b0 = bb * k2.x * __expf(gv[2 * e]), b1 = bb * k2.y * __expf(gv[2 * e + 1]);
      split_bf16x2(b0, b1, hi32[e], lo32[e]);
    }
    if (l2) {
      *reinterpret_cast<uint4*>(qs + r * kLdn + c0) = qv;
      *reinterpret_cast<uint4*>(kss + r * kLdn + c0) = kv;
    }
    *reinterpret_cast<uint4*>(kbh + r * kLdn + c0) = hi4;
    *reinterpret_cast<uint4*>(kbl + r * kLdn + c0) = lo4;
    // Akk row r: keep columns j <= r (a prefix of the row; word w holds 2w low, 2w + 1 high).
    uint4 a = *reinterpret_cast<const uint4*>(akk + r * kLdn + c0);
    uint32_t* a32 = reinterpret_cast<uint32_t*>(&a);
    const int nkeep = (r < len ? r : -1) - c0 + 1;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int rem = nkeep - 2 * w;
      a32[w] &= rem >= 2 ? 0xffffffffu : (rem == 1 ? 0x0000ffffu : 0u);
    }
    *reinterpret_cast<uint4*>(akk + r * kLdn + c0) = a;
  }
  __syncthreads();  // B3: q_hat, k_hat, G, kb hi/lo, dw hi/lo, Akk visible

  // dAkk partial [t][j] = sum_k dw[t][k] kb[j][k] over the slice's 64 k: this warp's rows 16 mb,
  // columns j 32 nh. A = dw [t][k] row-major (ldmatrix); B(k, j) = kb[j][k] ([N][K]: ldmatrix
  // without .trans, as S above). hi*hi + hi*lo + lo*hi.
  {
    float da[4][4] = {};
    const int arow = (16 * mb + lane % 16) * kLdn + 8 * (lane / 16);
    const int brow = (32 * nh + 8 * (lane / 16) + lane % 8) * kLdn + 8 * ((lane / 8) % 2);
#pragma unroll
    for (int kk = 0; kk < kKS / 16; ++kk) {
      uint32_t ah[4], al[4];
      ldmatrix_x4(ah, dwh + arow + 16 * kk);
      ldmatrix_x4(al, dwl + arow + 16 * kk);
#pragma unroll
      for (int pr = 0; pr < 2; ++pr) {
        uint32_t bh[4], bl[4];
        ldmatrix_x4(bh, kbh + brow + 16 * pr * kLdn + 16 * kk);
        ldmatrix_x4(bl, kbl + brow + 16 * pr * kLdn + 16 * kk);
        mma_16x8x16<T>(da[2 * pr], ah, bh[0], bh[1]);
        mma_16x8x16<T>(da[2 * pr + 1], ah, bh[2], bh[3]);
        mma_16x8x16<T>(da[2 * pr], ah, bl[0], bl[1]);
        mma_16x8x16<T>(da[2 * pr + 1], ah, bl[2], bl[3]);
        mma_16x8x16<T>(da[2 * pr], al, bh[0], bh[1]);
        mma_16x8x16<T>(da[2 * pr + 1], al, bh[2], bh[3]);
      }
    }
    // dAkk_part[ks][tok0 + t][hv][j] for t < len: the partial where j < len, else 0.
    float* part = p.dAkk_part + ks * (p.B * p.T * HV * kBT);
#pragma unroll
    for (int n = 0; n < 4; ++n) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int t = 16 * mb + g + 8 * hf, j = 32 * nh + 8 * n + 2 * t4;
        if (t < len)
          *reinterpret_cast<float2*>(part + ((tok0 + t) * HV + hv) * kBT + j) =
              make_float2(j < len ? da[n][2 * hf] : 0.f, j + 1 < len ? da[n][2 * hf + 1] : 0.f);
      }
    }
  }

  // dkb[t][k] = sum_j Akk[j][t] dw[j][k]: A = Akk^T from Akk [j][t] (row-major [K][M]:
  // ldmatrix.trans, lane l -> row j 8 (l / 16) + l % 8, column t 8 ((l / 8) % 2)); B = dw [j][k]
  // (row-major [K][N]: ldmatrix.trans, lane l -> row 8 ((l / 8) % 2) + l % 8, column 8 (l / 16)),
  // hi then lo. Akk[j][t] = 0 for j < t: only the j blocks jb >= mb.
  float dkb[4][4] = {};
  {
    const int atr = (8 * (lane / 16) + lane % 8) * kLdn + 16 * mb + 8 * ((lane / 8) % 2);
    const int btr = (8 * ((lane / 8) % 2) + lane % 8) * kLdn + 32 * nh + 8 * (lane / 16);
    for (int jb = mb; jb < kBT / 16; ++jb) {
      uint32_t a[4];
      ldmatrix_x4_trans(a, akk + atr + 16 * jb * kLdn);
#pragma unroll
      for (int pr = 0; pr < 2; ++pr) {
        uint32_t bh[4], bl[4];
        ldmatrix_x4_trans(bh, dwh + btr + 16 * jb * kLdn + 16 * pr);
        ldmatrix_x4_trans(bl, dwl + btr + 16 * jb * kLdn + 16 * pr);
        mma_16x8x16<T>(dkb[2 * pr], a, bh[0], bh[1]);
        mma_16x8x16<T>(dkb[2 * pr + 1], a, bh[2], bh[3]);
        mma_16x8x16<T>(dkb[2 * pr], a, bl[0], bl[1]);
        mma_16x8x16<T>(dkb[2 * pr + 1], a, bl[2], bl[3]);
      }
    }
  }

  // ---- epilogue: element (t = 16 mb + g + 8 hf, kk = 32 nh + 8 n + 2 t4 + e) ----------------
  const int rl = len - 1;
  const float scale = p.scale;
  float colp[4][2] = {}, rowp[2] = {};
  float dglast[4][2] = {};  // dG of row len - 1 (if this thread holds it), before the column sums
#pragma unroll
  for (int n = 0; n < 4; ++n) {
    const int col = 32 * nh + 8 * n + 2 * t4;
    const float2 gl2 = *reinterpret_cast<const float2*>(gs + rl * kLdg + col);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = 16 * mb + g + 8 * hf;
      const float2 g2 = *reinterpret_cast<const float2*>(gs + r * kLdg + col);
      const float2 q2 = unpack2<T>(*reinterpret_cast<const uint32_t*>(qs + r * kLdn + col));
      const float2 k2 = unpack2<T>(*reinterpret_cast<const uint32_t*>(kss + r * kLdn + col));
      const float bb = vbeta[r];
      float dq[2], dk[2], dg[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float gv = e ? g2.y : g2.x, gl = e ? gl2.y : gl2.x;
        const float qv = e ? q2.y : q2.x, kv = e ? k2.y : k2.x;
        const float eg = __expf(gv), egl = __expf(gl - gv);
        const float dqg = scale * aq[n][2 * hf + e];
        const float dkg = ak[n][2 * hf + e];
        const float dkbv = dkb[n][2 * hf + e];
        const float kb = bb * kv * __expf(gv);  // as the wmma kernel's emit_a
        dg[e] = dqg * qv * eg - dkg * kv * egl + dkbv * kb;
        dq[e] = dqg * eg;
        dk[e] = dkg * egl + bb * eg * dkbv;
        if (r < len) colp[n][e] += dkg * kv * egl;
        rowp[hf] += dkbv * kv * eg;
        if (r == rl) dglast[n][e] = dg[e];
      }
      if (r < len) {
        const int64_t off = ((tok0 + r) * HV + hv) * kK + k0 + col;
        *reinterpret_cast<float2*>(p.dq_hv + off) = make_float2(dq[0], dq[1]);
        *reinterpret_cast<float2*>(p.dk_hv + off) = make_float2(dk[0], dk[1]);
        if (r != rl) *reinterpret_cast<float2*>(p.dG + off) = make_float2(dg[0], dg[1]);
      }
    }
  }
  // Column partials: the 8 lanes of a column (xor 4, 8, 16), then by row block below.
#pragma unroll
  for (int n = 0; n < 4; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float s = colp[n][e];
      s += __shfl_xor_sync(0xffffffffu, s, 4);
      s += __shfl_xor_sync(0xffffffffu, s, 8);
      s += __shfl_xor_sync(0xffffffffu, s, 16);
      if (g == 0) vcol[mb * 64 + 32 * nh + 8 * n + 2 * t4 + e] = s;
    }
  }
  // Row partials: the 4 lanes of a quad (xor 1, 2), then by column half below.
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float s = rowp[hf];
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    if (t4 == 0) vrow[nh * 64 + 16 * mb + g + 8 * hf] = s;
  }
  __syncthreads();  // B4: the partial sums visible
  if (tid < len)
    p.dbeta_part[(ks * p.B * p.T + tok0 + tid) * HV + hv] = vrow[tid] + vrow[64 + tid];
  // Row len - 1: dG += e^{Gl} sds + sum over the row blocks (in order) of the column partials.
  if (mb == rl / 16 && g == rl % 8) {
    const int64_t off0 = ((tok0 + rl) * HV + hv) * kK + k0;
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const int col = 32 * nh + 8 * n + 2 * t4;
      float out[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = col + e;
        const float cs = ((vcol[c] + vcol[64 + c]) + vcol[128 + c]) + vcol[192 + c];
        out[e] = dglast[n][e] + (__expf(gs[rl * kLdg + c]) * sds[c] + cs);
      }
      *reinterpret_cast<float2*>(p.dG + off0 + col) = make_float2(out[0], out[1]);
    }
  }
}

}  // namespace bwd
}  // namespace cuda
}  // namespace kda_ext

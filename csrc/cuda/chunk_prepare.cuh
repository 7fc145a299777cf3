// kda_ext CUDA: kernel 0 (varlen chunk offsets) and kernel 1 "chunk_prepare" of the forward
// (preprocessing, gate cumsum, Aqk, Lkk, Akk = (I + Lkk)^-1, w, u, qg, kg) for one chunk.
//
// Design (and why it departs from the suggested one where it does):
// - One CTA of 256 threads per (chunk slot, value head), grid (NT, HV, B).
// - K is processed in slices of 32 columns. The gate cumsum runs along time and is independent
//   per column, so gate, cumsum, qg, kg, g_cum and the Aqk/Lkk contributions of a slice need only
//   that slice; K therefore is a run-time size (no head-dim template), K = 60/100 are masked
//   columns of the last slice, and shared memory stays ~96 KB even for K = 256. The l2norm rstd
//   (which needs whole rows) is computed first, straight from global memory.
// - Aqk/Lkk use tf32 MMAs on fp32 operands for every input dtype: the safe_gate diagonal operand
//   k*exp(G_n - G_j) reaches e^40 (fp16 would overflow) and FLA's own inter/solve dots are tf32.
//   w/u/o/state MMAs use the storage dtype (fp16/bf16 m16n16k16, tf32 for fp32 inputs), matching
//   FLA's casts of their operands.
// - Akk = (I + L)^-1 in fp32 SIMT: forward substitution inside the 16x16 diagonal blocks (all
//   blocks at once), then the off-diagonal blocks by block diagonals (FLA's merge order, but in
//   full fp32 rather than tf32 dots), instead of one thread per column over all BT rows.
// - Global loads of a slice are issued into registers before any is used (two 95 KB CTAs per
//   SM leave little latency hiding). Measured on H100, bf16 B4 T4096 H16 K128 safe_gate: the
//   first version (one load in flight per thread, whole-chunk substitution) 2.2 ms, now 1.46 ms;
//   ncu then showed ~21K instructions per warp, about half the issue slots used, so the next
//   gain needs fewer instructions (wider slices/vector loads, fewer passes), not more overlap.
// - exp in the hot loops is __expf (ex2.approx of x*log2e, ~2 ulp plus |x|*2^-24 relative): the
//   same class of error as FLA's exp2 on log2-scaled cumsums, at a fraction of expf's
//   instructions (the kernel is issue-bound after the load fix). The gates keep expf/log1pf.
// - w needs exp(G) of all K columns after Akk is known; g_cum was already written to global
//   memory by this CTA, so the second pass reads it back (same block, after __syncthreads: the
//   writes are visible; the pointer is deliberately not const/__restrict__ so no .nc load is used).
#pragma once

#include "cuda/mma.cuh"
#include "cuda/params.h"

namespace kda_ext {
namespace cuda {

constexpr int kPrepThreads = 256;
constexpr int kSlice = 32;        // K (and V) columns per pass
constexpr int kLdf = kSlice + 4;  // fp32 slice tiles: 16-byte row padding against bank conflicts

// ---- kernel 0 ------------------------------------------------------------------------------

constexpr int kOffsetsThreads = 1024;

// chunk_offsets[n] = sum_{m<n} ceil(len_m / BT), chunk_offsets[N] = total chunks. One block.
__global__ void __launch_bounds__(kOffsetsThreads) chunk_offsets_kernel(const ChunkKdaFwdParams p) {
  __shared__ int64_t part[kOffsetsThreads];
  const int tid = threadIdx.x;
  const int64_t per = (p.N + kOffsetsThreads - 1) / kOffsetsThreads;
  const int64_t n0 = tid * per;
  const int64_t n1 = n0 + per < p.N ? n0 + per : p.N;
  int64_t own = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const SeqRange r = seq_range(p, n);
    own += (r.eos - r.bos + p.BT - 1) / p.BT;
  }
  part[tid] = own;
  __syncthreads();
  for (int off = 1; off < kOffsetsThreads; off *= 2) {
    const int64_t add = tid >= off ? part[tid - off] : 0;
    __syncthreads();
    part[tid] += add;
    __syncthreads();
  }
  int64_t run = part[tid] - own;
  for (int64_t n = n0; n < n1; ++n) {
    p.chunk_offsets[n] = run;
    const SeqRange r = seq_range(p, n);
    run += (r.eos - r.bos + p.BT - 1) / p.BT;
  }
  if (tid == kOffsetsThreads - 1) p.chunk_offsets[p.N] = part[kOffsetsThreads - 1];
}

// ---- shared helpers ------------------------------------------------------------------------

// Where chunk slot `x` of batch row `b` lives: flattened first token row0 (b*T + start) and
// valid rows L (0: the slot holds no chunk).
struct ChunkLoc {
  int64_t row0;
  int L;
};

__device__ __forceinline__ ChunkLoc locate_chunk(const ChunkKdaFwdParams& p, int64_t x,
                                                 int64_t b) {
  const int64_t BT = p.BT;
  if (!p.varlen) {
    const int64_t start = x * BT;
    const int64_t rem = p.T - start;
    return {b * p.T + start, static_cast<int>(rem <= 0 ? 0 : (rem < BT ? rem : BT))};
  }
  const int64_t* off = p.chunk_offsets;
  if (x >= off[p.N]) return {0, 0};
  int64_t lo = 0, hi = p.N - 1;  // largest n with off[n] <= x
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (off[mid] <= x) lo = mid; else hi = mid - 1;
  }
  const SeqRange r = seq_range(p, lo);
  const int64_t start = r.bos + (x - off[lo]) * BT;
  const int64_t rem = r.eos - start;
  if (start < 0 || rem <= 0) return {0, 0};
  return {start, static_cast<int>(rem < BT ? rem : BT)};
}

// The in-kernel gate of one element: lower_bound * sigmoid(a (g + bias)) (the a factor only with
// A_log) or -a softplus(g + bias). bias = dt_bias[hv, col] (0 without one) and a = exp(A_log[hv])
// (1 without) are computed by the caller once per slice / block.
__device__ __forceinline__ float gate_of(const ChunkKdaFwdParams& p, float graw,
                                                 float bias, float a) {
  if (!p.use_gate_in_kernel) return graw;
  float x = graw + bias;
  if (p.use_lower_bound_gate) {
    if (p.A_log != nullptr) x *= a;
    return p.lower_bound / (1.f + expf(-x));
  }
  const float sp = x > 20.f ? x : log1pf(expf(x));
  return -a * sp;
}

__device__ __forceinline__ float beta_of(const ChunkKdaFwdParams& p, float raw) {
  if (!p.use_beta_sigmoid) return raw;
  const float s = p.allow_neg_eigval ? 2.f : 1.f;
  return s / (1.f + expf(-raw));
}

// ---- kernel 1 ------------------------------------------------------------------------------

struct PrepLayout {
  // pass 1 (fp32 slice tiles)
  int64_t qs, ks, gs, qop, kop, kc;
  // pass 2, aliasing pass 1
  int64_t akk, kb, stage;
  // persistent
  int64_t aacc, lacc, beta, rq, rk;
  int64_t total;
};

template <typename T, int BT>
struct PrepDims {
  static constexpr int NC = BT / 16;
  static constexpr int kOffRows = 16 * NC * (NC - 1) / 2;  // rows of all off-diagonal col operands
  static constexpr int kKcRows = kOffRows > BT ? kOffRows : BT;
  static constexpr int kLda = BT + 4;     // fp32 BT x BT accumulators
  static constexpr int kLdk = BT + 8;     // Akk in T
  static constexpr int kLdb = kSlice + 8; // w/u operand slice in T
};

template <typename T, int BT>
__host__ __device__ inline PrepLayout prep_layout() {
  using D = PrepDims<T, BT>;
  PrepLayout l{};
  SmemCarver c1;
  l.qs = c1.take<float>(BT * kLdf);
  l.ks = c1.take<float>(BT * kLdf);
  l.gs = c1.take<float>(BT * kLdf);
  l.qop = c1.take<float>(BT * kLdf);
  l.kop = c1.take<float>(BT * kLdf);
  l.kc = c1.take<float>(D::kKcRows * kLdf);
  SmemCarver c2;
  l.akk = c2.take<T>(BT * D::kLdk);
  l.kb = c2.take<T>(BT * D::kLdb);
  l.stage = c2.take<float>(BT * kLdf);
  SmemCarver c;
  c.offset = c1.offset > c2.offset ? c1.offset : c2.offset;
  l.aacc = c.take<float>(BT * D::kLda);
  l.lacc = c.take<float>(BT * D::kLda);
  l.beta = c.take<float>(BT);
  l.rq = c.take<float>(BT);
  l.rk = c.take<float>(BT);
  l.total = align_up(c.offset, 128);
  return l;
}

template <typename T, int BT>
__global__ void __launch_bounds__(kPrepThreads, 2) chunk_prepare_kernel(const ChunkKdaFwdParams p) {
  using D = PrepDims<T, BT>;
  constexpr int NC = D::NC;
  constexpr int LDA = D::kLda, LDK = D::kLdk, LDB = D::kLdb;
  constexpr int kWarps = kPrepThreads / 32;
  extern __shared__ __align__(128) unsigned char smem[];
  const PrepLayout lay = prep_layout<T, BT>();
  float* qs = reinterpret_cast<float*>(smem + lay.qs);
  float* ks = reinterpret_cast<float*>(smem + lay.ks);
  float* gs = reinterpret_cast<float*>(smem + lay.gs);
  float* qop = reinterpret_cast<float*>(smem + lay.qop);
  float* kop = reinterpret_cast<float*>(smem + lay.kop);
  float* kc = reinterpret_cast<float*>(smem + lay.kc);
  T* akk = reinterpret_cast<T*>(smem + lay.akk);
  T* kb = reinterpret_cast<T*>(smem + lay.kb);
  float* stage = reinterpret_cast<float*>(smem + lay.stage);
  float* aacc = reinterpret_cast<float*>(smem + lay.aacc);
  float* lacc = reinterpret_cast<float*>(smem + lay.lacc);
  float* beta_s = reinterpret_cast<float*>(smem + lay.beta);
  float* rq = reinterpret_cast<float*>(smem + lay.rq);
  float* rk = reinterpret_cast<float*>(smem + lay.rk);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  static_assert(kSlice == 32, "slice loops map one column per lane");
  const int64_t HV = p.HV, K = p.K, V = p.V, H = p.H;
  const int64_t hv = blockIdx.y;  // grid (NT, HV, B)
  const int64_t b = blockIdx.z;
  const int64_t hq = hv / (HV / H);
  const ChunkLoc loc = locate_chunk(p, blockIdx.x, b);
  const int L = loc.L;
  if (L <= 0) return;  // uniform across the block
  const int64_t row0 = loc.row0;

  const T* __restrict__ q = static_cast<const T*>(p.q);
  const T* __restrict__ k = static_cast<const T*>(p.k);
  const T* __restrict__ v = static_cast<const T*>(p.v);
  T* Aqk = static_cast<T*>(p.Aqk);
  T* Akk = static_cast<T*>(p.Akk);
  T* w = static_cast<T*>(p.w);
  T* u = static_cast<T*>(p.u);
  T* qg = static_cast<T*>(p.qg);
  T* kg = static_cast<T*>(p.kg);
  float* g_cum = p.g_cum;  // written here and read back below: no __restrict__/const

  // Element offsets of row i of the chunk: base + i * row stride.
  const int64_t qk0 = (row0 * H + hq) * K, qks = H * K;
  const int64_t hk0 = (row0 * HV + hv) * K, hks = HV * K;
  const int64_t hv0 = (row0 * HV + hv) * V, hvs = HV * V;
  const int64_t ha0 = (row0 * HV + hv) * BT, has = HV * BT;
  // Uniform across the grid: the recompute of the backward, with Akk known.
  const bool reuse_akk = p.Akk_saved != nullptr;
  auto qk_off = [&](int i) { return qk0 + i * qks; };
  auto hk_off = [&](int i) { return hk0 + i * hks; };
  auto hv_off = [&](int i) { return hv0 + i * hvs; };
  auto ha_off = [&](int i) { return ha0 + i * has; };

  // ---- per-row scalars: l2norm rstd, beta -------------------------------------------------
  // kTpr threads per row, each summing a strided part of the row (loads unrolled so that several
  // are in flight), then a shuffle reduction inside the kTpr-lane group.
  {
    constexpr int kTpr = kPrepThreads / BT;
    const int i = tid / kTpr, part = tid % kTpr;
    float sq = 0.f, sk = 0.f;
    if (p.use_qk_l2norm && i < L) {
      const T* qr = q + qk_off(i);
      const T* kr = k + qk_off(i);
#pragma unroll 8
      for (int64_t c = part; c < K; c += kTpr) {
        const float a = to_float<T>(qr[c]);
        const float e = to_float<T>(kr[c]);
        sq += a * a;
        sk += e * e;
      }
    }
#pragma unroll
    for (int o = kTpr / 2; o > 0; o /= 2) {
      sq += __shfl_xor_sync(0xffffffffu, sq, o);
      sk += __shfl_xor_sync(0xffffffffu, sk, o);
    }
    if (part == 0) {
      rq[i] = p.use_qk_l2norm ? 1.f / sqrtf(sq + 1e-6f) : 1.f;
      rk[i] = p.use_qk_l2norm ? 1.f / sqrtf(sk + 1e-6f) : 1.f;
    }
  }
  for (int i = tid; i < BT; i += kPrepThreads)
    beta_s[i] = i < L ? beta_of(p, load_any(p.beta, p.beta_dtype, (row0 + i) * HV + hv)) : 0.f;
  for (int idx = tid; idx < BT * LDA; idx += kPrepThreads) {
    aacc[idx] = 0.f;
    lacc[idx] = 0.f;
  }
  __syncthreads();

  // ---- pass 1: gate, cumsum, g_cum/qg/kg, Aqk and Lkk accumulation, per K slice ----------
  // The in-kernel gate's per-head factor exp(A_log) once per block (it was a global load and an
  // expf per element); same value, same bits.
  const float gate_a = (p.use_gate_in_kernel && p.A_log != nullptr) ? expf(p.A_log[hv]) : 1.f;
  for (int64_t k0 = 0; k0 < K; k0 += kSlice) {
    // Every thread's column in the slice loops below is its lane: dt_bias once per slice.
    const float gate_bias = (p.use_gate_in_kernel && p.dt_bias != nullptr && k0 + lane < K)
                                ? p.dt_bias[hv * K + k0 + lane]
                                : 0.f;
    // All global loads of the slice are issued before any is used (fixed trip count, unrolled).
    constexpr int kIters = BT * kSlice / kPrepThreads;
    float ra[kIters], re[kIters], rg[kIters];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int i = warp + it * kWarps, c = lane;
      const int64_t col = k0 + c;
      ra[it] = re[it] = rg[it] = 0.f;
      if (i < L && col < K) {
        ra[it] = to_float<T>(q[qk_off(i) + col]);
        re[it] = to_float<T>(k[qk_off(i) + col]);
        rg[it] = load_any(p.g, p.g_dtype, hk_off(i) + col);
      }
    }
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int i = warp + it * kWarps, c = lane;
      const int64_t col = k0 + c;
      float a = 0.f, e = 0.f, gt = 0.f;
      if (i < L && col < K) {
        a = p.use_qk_l2norm ? round_to<T>(ra[it] * rq[i]) : ra[it];
        e = p.use_qk_l2norm ? round_to<T>(re[it] * rk[i]) : re[it];
        gt = gate_of(p, rg[it], gate_bias, gate_a);
      }
      qs[i * kLdf + c] = a;
      ks[i * kLdf + c] = e;
      gs[i * kLdf + c] = gt;
    }
    __syncthreads();
    // Rows past L carry gate 0, so their G equals G_last: every exp(G_i - G_r) below stays <= 1.
    if (tid < kSlice) {
      float run = 0.f;
      for (int i = 0; i < BT; ++i) {
        run += gs[i * kLdf + tid];
        gs[i * kLdf + tid] = run;
      }
    }
    __syncthreads();
    for (int i = warp; i < BT; i += kWarps) {
      const int c = lane;
      const int64_t col = k0 + c;
      const float G = gs[i * kLdf + c];
      const float e = __expf(G - gs[(i & ~15) * kLdf + c]);
      const float a = qs[i * kLdf + c], kk = ks[i * kLdf + c];
      qop[i * kLdf + c] = a * e;
      kop[i * kLdf + c] = kk * e;
      if (i < L && col < K) {
        const float glast = gs[(L - 1) * kLdf + c];
        const int64_t o = hk_off(i) + col;
        g_cum[o] = G;
        qg[o] = from_float<T>(a * __expf(G));
        kg[o] = from_float<T>(kk * __expf(glast - G));
      }
    }
    if (reuse_akk) {
      __syncthreads();  // the slice tiles are reloaded by the next slice
      continue;
    }
    // Column operands of the off-diagonal blocks: for row block bb the rows j < 16*bb, scaled by
    // exp(G_r - G_j) with r = 16*bb (<= 1 since G is non-increasing).
    for (int rr = warp; rr < D::kOffRows; rr += kWarps) {
      const int c = lane;
      int bb = 1, base = 0;
      while (rr >= base + 16 * bb) {
        base += 16 * bb;
        ++bb;
      }
      const int j = rr - base;
      kc[rr * kLdf + c] = ks[j * kLdf + c] * __expf(gs[16 * bb * kLdf + c] - gs[j * kLdf + c]);
    }
    __syncthreads();

    // Off-diagonal 16x16 blocks (bb, aa), aa < bb, on tensor cores: Aqk from qop, Lkk from kop.
    constexpr int kPairs = NC * (NC - 1) / 2;
    for (int job = warp; job < 2 * kPairs; job += kWarps) {
      const bool is_l = job >= kPairs;
      int pr = is_l ? job - kPairs : job;
      int bb = 1;
      while (pr >= bb) {
        pr -= bb;
        ++bb;
      }
      const int aa = pr;
      const int base = 16 * bb * (bb - 1) / 2;
      float* acc_ptr = (is_l ? lacc : aacc) + 16 * bb * LDA + 16 * aa;
      AccFrag<float> acc;
      wmma::load_matrix_sync(acc, acc_ptr, LDA, wmma::mem_row_major);
      mma_16x16<float, wmma::row_major, wmma::col_major>(acc, (is_l ? kop : qop) + 16 * bb * kLdf,
                                                         kLdf, kc + (base + 16 * aa) * kLdf, kLdf,
                                                         kSlice);
      wmma::store_matrix_sync(acc_ptr, acc, LDA, wmma::mem_row_major);
    }
    if (!p.safe_gate) {
      // Diagonal blocks element-wise with exp(G_i - G_j) itself: exact for any gate.
      for (int pidx = tid; pidx < NC * 136; pidx += kPrepThreads) {
        const int blk = pidx / 136, t = pidx % 136;
        int ii = static_cast<int>((sqrtf(8.f * t + 1.f) - 1.f) * 0.5f);
        while ((ii + 1) * (ii + 2) / 2 <= t) ++ii;
        while (ii * (ii + 1) / 2 > t) --ii;
        const int jj = t - ii * (ii + 1) / 2;
        const int i = 16 * blk + ii, j = 16 * blk + jj;
        float sa = 0.f, sl = 0.f;
#pragma unroll 8
        for (int c = 0; c < kSlice; ++c) {
          const float e = __expf(gs[i * kLdf + c] - gs[j * kLdf + c]);
          const float kj = ks[j * kLdf + c] * e;
          sa += qs[i * kLdf + c] * kj;
          sl += ks[i * kLdf + c] * kj;
        }
        aacc[i * LDA + j] += sa;
        if (jj < ii) lacc[i * LDA + j] += sl;
      }
    }
    __syncthreads();
    if (p.safe_gate) {
      // Diagonal blocks with the median shift: reference row n = min(8, L_sub - 1) of the
      // sub-chunk; bounded because every step's gate is >= lower_bound >= -5.
      for (int i = warp; i < BT; i += kWarps) {
        const int c = lane;
        const int blk = i / 16;
        const int lsub = L - 16 * blk;
        const int n = 16 * blk + (lsub <= 0 ? 0 : (lsub - 1 < 8 ? lsub - 1 : 8));
        const float d = gs[i * kLdf + c] - gs[n * kLdf + c];
        const float e = __expf(d);
        qop[i * kLdf + c] = qs[i * kLdf + c] * e;
        kop[i * kLdf + c] = ks[i * kLdf + c] * e;
        kc[i * kLdf + c] = ks[i * kLdf + c] * __expf(-d);
      }
      __syncthreads();
      for (int job = warp; job < 2 * NC; job += kWarps) {
        const bool is_l = job >= NC;
        const int blk = is_l ? job - NC : job;
        float* acc_ptr = (is_l ? lacc : aacc) + 16 * blk * LDA + 16 * blk;
        AccFrag<float> acc;
        wmma::load_matrix_sync(acc, acc_ptr, LDA, wmma::mem_row_major);
        mma_16x16<float, wmma::row_major, wmma::col_major>(
            acc, (is_l ? kop : qop) + 16 * blk * kLdf, kLdf, kc + 16 * blk * kLdf, kLdf, kSlice);
        wmma::store_matrix_sync(acc_ptr, acc, LDA, wmma::mem_row_major);
      }
      __syncthreads();
    }
  }

  if (reuse_akk) {
    // Akk rows of the chunk as the forward stored them (the same rounded values the forward put
    // in `akk` below, so w and u come out bit-identical); rows past the chunk are never stored.
    const T* saved = static_cast<const T*>(p.Akk_saved);
    for (int idx = tid; idx < BT * BT; idx += kPrepThreads) {
      const int i = idx / BT, j = idx % BT;
      akk[i * LDK + j] = i < L ? saved[ha_off(i) + j] : from_float<T>(0.f);
    }
    __syncthreads();
  } else {
  // ---- Aqk (stored), Lkk masked and row-scaled by beta --------------------------------------
  const float scale = p.scale;
  for (int idx = tid; idx < BT * BT; idx += kPrepThreads) {
    const int i = idx / BT, j = idx % BT;
    const bool row_ok = i < L;
    if (row_ok) Aqk[ha_off(i) + j] = from_float<T>(j <= i ? scale * aacc[i * LDA + j] : 0.f);
    lacc[i * LDA + j] = (row_ok && j < i) ? beta_s[i] * lacc[i * LDA + j] : 0.f;
  }
  __syncthreads();

  // ---- Akk = (I + L)^-1 in fp32, into aacc ---------------------------------------------------
  // Diagonal 16x16 blocks by forward substitution (one thread per column of each block), then
  // the off-diagonal blocks by block diagonals d = bb - aa:
  //   X[bb][aa] = -X[bb][bb] * sum_{m=aa}^{bb-1} L[bb][m] X[m][aa].
  // Only entries on or below the diagonal are meaningful; the store below masks the rest.
  if (tid < BT) {
    const int blk = tid / 16, c = tid % 16;
    float* X = aacc + 16 * blk * LDA + 16 * blk;
    const float* Lb = lacc + 16 * blk * LDA + 16 * blk;
    for (int r = 0; r < c; ++r) X[r * LDA + c] = 0.f;
    X[c * LDA + c] = 1.f;
    for (int r = c + 1; r < 16; ++r) {
      float s = 0.f;
      for (int j = c; j < r; ++j) s += Lb[r * LDA + j] * X[j * LDA + c];
      X[r * LDA + c] = -s;
    }
  }
  __syncthreads();
  {
    float* tmp = qs;  // pass-1 scratch is free now; needs (NC-1)*256 floats
    for (int d = 1; d < NC; ++d) {
      const int npairs = NC - d;
      for (int idx = tid; idx < npairs * 256; idx += kPrepThreads) {
        const int aa = idx / 256, bb = aa + d, r = (idx % 256) / 16, c = idx % 16;
        float s = 0.f;
        for (int m = 16 * aa; m < 16 * bb; ++m)
          s += lacc[(16 * bb + r) * LDA + m] * aacc[m * LDA + 16 * aa + c];
        tmp[idx] = s;
      }
      __syncthreads();
      for (int idx = tid; idx < npairs * 256; idx += kPrepThreads) {
        const int aa = idx / 256, bb = aa + d, r = (idx % 256) / 16, c = idx % 16;
        float s = 0.f;
        for (int m = 0; m <= r; ++m)
          s += aacc[(16 * bb + r) * LDA + 16 * bb + m] * tmp[aa * 256 + m * 16 + c];
        aacc[(16 * bb + r) * LDA + 16 * aa + c] = -s;
      }
      __syncthreads();
    }
  }
  for (int idx = tid; idx < BT * BT; idx += kPrepThreads) {
    const int i = idx / BT, j = idx % BT;
    const T x = from_float<T>(j <= i ? aacc[i * LDA + j] : 0.f);
    akk[i * LDK + j] = x;
    if (i < L) Akk[ha_off(i) + j] = x;
  }
  __syncthreads();
  }  // !reuse_akk

  // ---- pass 2: w = Akk_r (beta * k-hat * exp(G)), u = Akk_r (beta * v) ---------------------
  auto akk_times_slice = [&]() {
    for (int job = warp; job < NC * (kSlice / 16); job += kWarps) {
      const int mi = job / (kSlice / 16), ni = job % (kSlice / 16);
      AccFrag<T> acc;
      wmma::fill_fragment(acc, 0.f);
      mma_16x16<T, wmma::row_major, wmma::row_major>(acc, akk + 16 * mi * LDK, LDK, kb + 16 * ni,
                                                     LDB, BT);
      wmma::store_matrix_sync(stage + 16 * mi * kLdf + 16 * ni, acc, kLdf, wmma::mem_row_major);
    }
  };
  for (int64_t k0 = 0; k0 < K; k0 += kSlice) {
    constexpr int kIters = BT * kSlice / kPrepThreads;
    float re[kIters], rg[kIters];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int i = warp + it * kWarps, c = lane;
      const int64_t col = k0 + c;
      re[it] = rg[it] = 0.f;
      if (i < L && col < K) {
        re[it] = to_float<T>(k[qk_off(i) + col]);
        rg[it] = g_cum[hk_off(i) + col];
      }
    }
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int i = warp + it * kWarps, c = lane;
      const float e = p.use_qk_l2norm ? round_to<T>(re[it] * rk[i]) : re[it];
      // rows/columns outside the chunk hold e = 0 (and G = 0), so x = 0 there
      kb[i * LDB + c] = from_float<T>(beta_s[i] * e * __expf(rg[it]));
    }
    __syncthreads();
    akk_times_slice();
    __syncthreads();
    for (int i = warp; i < BT; i += kWarps) {
      const int c = lane;
      const int64_t col = k0 + c;
      if (i < L && col < K) w[hk_off(i) + col] = from_float<T>(stage[i * kLdf + c]);
    }
    __syncthreads();
  }
  for (int64_t v0 = 0; v0 < V; v0 += kSlice) {
    constexpr int kIters = BT * kSlice / kPrepThreads;
    float rv[kIters];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int i = warp + it * kWarps, c = lane;
      const int64_t col = v0 + c;
      rv[it] = (i < L && col < V) ? to_float<T>(v[hv_off(i) + col]) : 0.f;
    }
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int i = warp + it * kWarps, c = lane;
      kb[i * LDB + c] = from_float<T>(beta_s[i] * rv[it]);
    }
    __syncthreads();
    akk_times_slice();
    __syncthreads();
    for (int i = warp; i < BT; i += kWarps) {
      const int c = lane;
      const int64_t col = v0 + c;
      if (i < L && col < V) u[hv_off(i) + col] = from_float<T>(stage[i * kLdf + c]);
    }
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace kda_ext

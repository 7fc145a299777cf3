// kda_ext CUDA: "chunk_prepare_lean", the forward's intra-chunk stage for the Kimi configuration
// (bf16, chunk 64, K = V = 128, any gate): gate, chunk cumsum, l2norm, Aqk, L, Akk = (I + L)^-1,
// w, u, qg, kg, with the same outputs and contract as chunk_prepare_kernel (chunk_prepare.cuh).
//
// Why a second kernel for the same stage: chunk_prepare is issue-bound (H100, (2, 8192, 32, 128):
// ~16.7K instructions per warp, 8 warps a chunk, 1.6 ms of the forward's 2.0) because it walks K in
// 32-column slices with a barrier-heavy fp32 operand pipeline that serves every dtype, K, V, chunk
// size and gate regime. This one is written for one configuration and for few instructions, and it
// is the intra-chunk step that the persistent Hopper forward (issue 17) will run per chunk:
// - one CTA of 256 threads per (chunk slot, value head), two CTAs per SM (~107 KB of shared memory);
// - q, k, v arrive by cp.async as whole 64 x 128 tiles, all in flight at once with the g loads;
// - K is processed in two halves of 64 columns; in each half warp w owns rows 8w .. 8w + 7 and
//   lane l the column pair 2l, 2l + 1, so the gate cumsum is a running sum in registers plus seven
//   row-group totals, every element-wise value (qg, kg, the w operand, the product operands) is
//   computed once by the thread that holds its G in a register, and each shared, global and
//   conversion instruction of that phase moves two columns;
// - Aqk and L: ten 16 x 16 block pairs, two products each, on mma.sync m16n8k16 (bf16 operands,
//   fp32 accumulators carried across the two halves in registers). Off-diagonal blocks (I, J < I)
//   use the first row of block I as reference (every factor <= 1, any gate); the diagonal blocks
//   use the median row of the block when the block's cumulative gate stays within
//   kDiagSpanMax of that row in every column (always so under safe_gate with lower_bound >= -7,
//   whose bound keeps the factors below e^40); a block outside that range (the unbounded gate with
//   large entries, -1000 gates) is computed element by element instead (exact_diagonal_block);
// - (I + L)^-1 in fp32: forward substitution in the 16x16 diagonal blocks, one thread per column,
//   the block's column in registers; the off-diagonal blocks by block diagonals, one 1 x 4 output
//   strip per thread (fp32 throughout, as chunk_prepare, so Akk matches it up to the order of sums);
// - w = Akk (beta k e^G) and u = Akk (beta v) on mma.sync with Akk rounded to bf16 (FLA's and
//   chunk_prepare's rounding points), only the k-steps on or below the diagonal.
// Numerics follow chunk_prepare's bf16 safe_gate build: the same rounding points (q-hat/k-hat,
// operands, Akk in bf16), ex2.approx for the exponentials, fp32 accumulation; results differ from it
// in the order of fp32 sums and, for the off-diagonal column operands, by one fp32 rounding
// (e^{G_ref - G_j} is formed as e^{G_ref' - G_j} e^{G_ref - G_ref'} with ref' the next block's
// first row, one exponential per element instead of up to three).
// Not handled here (the launcher keeps chunk_prepare for them): fp16/fp32, chunk 32, other K/V
// and unaligned tensors.
#pragma once

#include "cuda/chunk_prepare.cuh"
#include "cuda/mma.cuh"
#include "cuda/mma_sync.cuh"
#include "cuda/params.h"

namespace kda_ext {
namespace cuda {

namespace prep_lean {

constexpr int kThreads = 256;
constexpr int kBT = 64;        // chunk
constexpr int kK = 128;        // K == V
constexpr int kHalf = 64;      // K columns per half
constexpr int kLdFull = kK + 8;     // 16-bit [64][128] tiles: 272-byte rows (conflict-free ldmatrix)
constexpr int kLdHalf = kHalf + 8;  // 16-bit [.][64] tiles: 144-byte rows
constexpr int kLdF = kBT + 4;       // fp32 [64][64] tiles
constexpr int kPairs = 10;          // lower 16 x 16 block pairs (I, J <= I) of the 64 x 64 matrices
// The median-reference products of a diagonal block scale q and k by e^{+-(G_i - G_m)}; they stay
// exact to the bf16 rounding of each operand as long as those factors neither overflow nor leave
// bf16's normal range (e^{+-87}), with room for |q|, |k| up to ~e^20. Beyond this the block is
// computed element by element.
constexpr float kDiagSpanMax = 60.f;
constexpr int kLdX = kK + 4;        // fp32 [16][128] G tile of the element-wise diagonal path

// Pair p -> (I, J): the four diagonal blocks first, then the off-diagonal ones.
__host__ __device__ constexpr int pair_row(int p) {
  return p < 4 ? p : (p < 5 ? 1 : (p < 7 ? 2 : 3));
}
__host__ __device__ constexpr int pair_col(int p) {
  // {0, 1, 2, 3, 0, 0, 1, 0, 1, 2} by selects: a run-time index into a table would put it in
  // local memory.
  return p < 4 ? p : (p == 6 || p == 8 ? 1 : (p == 9 ? 2 : 0));
}
// exp_ftz: cuda/elementwise.cuh (shared with the fused forward).
using cuda::exp_ftz;

// Rows of the off-diagonal column-operand tile: block I's reference version holds rows [0, 16 I)
// at row offset 8 I (I - 1): I = 1 at 0, 2 at 16, 3 at 48 (96 rows).
__host__ __device__ constexpr int kc_base(int I) { return 8 * I * (I - 1); }

struct Layout {
  int64_t sq, sk, sv;            // [64][kLdFull] T: raw q (then the off-diagonal q row operand),
                                 //   raw k (then the w operand), raw v (then the u operand)
  int64_t qd, kd, kcd, ko, kc;   // per-half operands [.][kLdHalf] T (kc: 96 rows)
  int64_t lf, ai, akk, tmp;      // after both halves (aliasing the operands): L and Akk in fp32,
                                 //   Akk in T, the inverse's partial products
  int64_t rq, rk, beta, tot, gref, diag_bad;
  int64_t total;
};

// kRecompute: the backward's recompute (Akk given): no operand tiles, L or inverse scratch.
template <typename T, bool kRecompute = false>
__host__ __device__ inline Layout layout() {
  Layout l{};
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    const int64_t o = at;
    at += (bytes + 127) / 128 * 128;
    return o;
  };
  const int64_t full = kBT * kLdFull * sizeof(T);
  const int64_t half = kBT * kLdHalf * sizeof(T);
  l.sq = take(full);
  l.sk = take(full);
  l.sv = take(full);
  // Operands of one half; after the second half's products the same bytes hold L, Akk (fp32 and
  // T) and the inverse's scratch.
  if (kRecompute) {
    l.akk = take(kBT * kLdHalf * sizeof(T));
  } else {
  const int64_t ops = at;
  l.qd = take(half);
  l.kd = take(half);
  l.kcd = take(half);
  l.ko = take(half);
  l.kc = take(96 * kLdHalf * sizeof(T));
  const int64_t ops_end = at;
  at = ops;
  l.lf = take(kBT * kLdF * sizeof(float));
  l.ai = take(kBT * kLdF * sizeof(float));
  l.akk = take(kBT * kLdHalf * sizeof(T));
  l.tmp = take(3 * 16 * 20 * sizeof(float));
  at = at > ops_end ? at : ops_end;
  }
  l.rq = take(kBT * sizeof(float));
  l.rk = take(kBT * sizeof(float));
  l.beta = take(kBT * sizeof(float));
  l.tot = take(8 * kHalf * sizeof(float));  // per warp's 8 rows: column sums of the gate
  l.gref = take(9 * kHalf * sizeof(float));  // first row of each block, median of each, last row
  l.diag_bad = take(4 * sizeof(int));  // per diagonal block: 1 if it takes the element-wise path
  l.total = at;
  return l;
}

}  // namespace prep_lean

// Whether chunk_prepare_lean serves this call (the launcher's dispatch; every other call keeps
// chunk_prepare): the forward (any gate: diagonal blocks out of the median path's range take the
// element-wise one), or the backward's recompute (Akk given, no output; no Aqk or L).
inline bool chunk_prepare_lean_applies(const ChunkKdaFwdParams& p) {
  const bool recompute = p.Akk_saved != nullptr && p.o == nullptr;
  const bool fixed = p.dtype == DType::kBFloat16 && p.BT == 64 && p.K == 128 && p.V == 128 &&
                     aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.g) &&
                     aligned16(p.w) && aligned16(p.u);
  if (recompute) return fixed && aligned16(p.Akk_saved);
  return fixed && p.Akk_saved == nullptr && p.rstd_qk == nullptr &&
         aligned16(p.Aqk) && aligned16(p.Akk);
}

// kRecompute: the backward's recompute: Akk comes from p.Akk_saved; no Aqk, L or inverse; the
// l2norm rstd of the rows goes to p.rstd_qk when given.
template <typename T, bool kRecompute>
__global__ void __launch_bounds__(prep_lean::kThreads, 2)
    chunk_prepare_lean_kernel(const ChunkKdaFwdParams p) {
  using namespace prep_lean;
  static_assert(std::is_same<T, __nv_bfloat16>::value, "bf16 only (the diagonal operands' range)");
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout lay = layout<T, kRecompute>();
  T* sq = reinterpret_cast<T*>(smem + lay.sq);
  T* sk = reinterpret_cast<T*>(smem + lay.sk);
  T* sv = reinterpret_cast<T*>(smem + lay.sv);
  T* qd = reinterpret_cast<T*>(smem + lay.qd);
  T* kd = reinterpret_cast<T*>(smem + lay.kd);
  T* kcd = reinterpret_cast<T*>(smem + lay.kcd);
  T* ko = reinterpret_cast<T*>(smem + lay.ko);
  T* kc = reinterpret_cast<T*>(smem + lay.kc);
  float* lf = reinterpret_cast<float*>(smem + lay.lf);
  float* ai = reinterpret_cast<float*>(smem + lay.ai);
  T* akk = reinterpret_cast<T*>(smem + lay.akk);
  float* tmp = reinterpret_cast<float*>(smem + lay.tmp);
  float* rq = reinterpret_cast<float*>(smem + lay.rq);
  float* rk = reinterpret_cast<float*>(smem + lay.rk);
  float* beta_s = reinterpret_cast<float*>(smem + lay.beta);
  float* tot = reinterpret_cast<float*>(smem + lay.tot);
  float* gref = reinterpret_cast<float*>(smem + lay.gref);
  int* diag_bad = reinterpret_cast<int*>(smem + lay.diag_bad);
  float* gfirst = gref;              // [4][64]: G of row 16 r
  float* gmed = gref + 4 * kHalf;    // [4][64]: G of block r's median reference row
  float* glast = gref + 8 * kHalf;   // [64]: G of row L - 1

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g8 = lane / 4, t4 = lane % 4;  // mma fragment coordinates
  const int64_t HV = p.HV, H = p.H;
  const int hv = blockIdx.y;
  const int hq = hv / (static_cast<int>(HV) / static_cast<int>(H));
  const ChunkLoc loc = locate_chunk(p, blockIdx.x, blockIdx.z);
  const int L = loc.L;
  if (L <= 0) return;  // uniform across the block
  const int64_t row0 = loc.row0;

  const int qks = static_cast<int>(H * kK);   // row strides (launch_fwd.cu bounds them by 2^31 / 64)
  const int hks = static_cast<int>(HV * kK);
  const int has = static_cast<int>(HV * kBT);
  const T* q = static_cast<const T*>(p.q) + (row0 * H + hq) * kK;
  const T* k = static_cast<const T*>(p.k) + (row0 * H + hq) * kK;
  const T* v = static_cast<const T*>(p.v) + (row0 * HV + hv) * kK;
  const int64_t hk0 = (row0 * HV + hv) * kK;
  T* w = static_cast<T*>(p.w) + hk0;
  T* u = static_cast<T*>(p.u) + hk0;
  T* qg = static_cast<T*>(p.qg) + hk0;
  T* kg = static_cast<T*>(p.kg) + hk0;
  float* g_cum = p.g_cum + hk0;
  const int64_t ha0 = (row0 * HV + hv) * kBT;
  // The state pass reads only the last row of g_cum; the whole tile is kept when the caller saves
  // the intermediates (disable_recompute: the backward reads it).
  const bool full_g_cum = p.v_new != nullptr;

  // ---- loads: q, k, v tiles (zero rows past L) and the first half's g, all in flight ---------
  {
#pragma unroll
    for (int it = 0; it < 4; ++it) {
      const int idx = tid + it * kThreads;  // 64 rows x 16 vectors of 8
      const int i = idx / 16, c = (idx % 16) * 8;
      const bool ok = i < L;
      const int src = ok ? i : 0;
      cp_async16(sq + i * kLdFull + c, q + src * qks + c, ok);
      cp_async16(sk + i * kLdFull + c, k + src * qks + c, ok);
      cp_async16(sv + i * kLdFull + c, v + src * hks + c, ok);
    }
    if constexpr (kRecompute) {
      const T* saved = static_cast<const T*>(p.Akk_saved) + ha0;
#pragma unroll
      for (int it = 0; it < 2; ++it) {
        const int idx = tid + it * kThreads;  // 64 rows x 8 vectors of 8
        const int i = idx / 8, c = (idx % 8) * 8;
        const bool ok = i < L;
        cp_async16(akk + i * kLdHalf + c, saved + (ok ? i : 0) * has + c, ok);
      }
    }
    cp_async_commit();
  }
  // Element-wise work of a half: warp w owns rows 8 w .. 8 w + 7 (half of the 16-row block
  // w / 2), lane l the column pair 2 l, 2 l + 1 of the half, so the cumsum runs in registers
  // along the warp's rows and every shared, global and conversion instruction moves two columns.
  const int cp = 2 * lane;      // first column of this thread's pair within a half
  const int blk = warp / 2;     // its 16-row block (uniform per warp)
  const int r0 = 8 * warp;      // its first row
  auto load_g = [&](int h, float2 (&graw)[8]) {
    int off[8];  // from hk0: below 64 * HV * K < 2^31 (launch_fwd.cu checks)
#pragma unroll
    for (int it = 0; it < 8; ++it) {
      const int i = r0 + it;
      off[it] = (i < L ? i * hks : 0) + h * kHalf + cp;
    }
    gather_pairs_any(graw, p.g, p.g_dtype, hk0, off);
  };

  // Gate constants of this head.
  const float gate_a = (p.use_gate_in_kernel && p.A_log != nullptr) ? __expf(p.A_log[hv]) : 1.f;

  // ---- per-row scalars: beta, l2norm rstd ---------------------------------------------------
  if (!kRecompute && tid < 4) diag_bad[tid] = 0;  // read after the half loop's barriers
  if (tid < kBT) {
    const int i = tid;
    beta_s[i] = i < L ? beta_of(p, load_any(p.beta, p.beta_dtype, (row0 + i) * HV + hv)) : 0.f;
  }
  cp_async_wait<0>();
  __syncthreads();
  if (p.use_qk_l2norm) {
    // Warp w: rows 8w .. 8w + 7; lane: columns 4 lane .. 4 lane + 3.
#pragma unroll
    for (int it = 0; it < 8; ++it) {
      const int i = 8 * warp + it;
      const uint2 qa = *reinterpret_cast<const uint2*>(sq + i * kLdFull + 4 * lane);
      const uint2 ka = *reinterpret_cast<const uint2*>(sk + i * kLdFull + 4 * lane);
      const float2 q0 = unpack2<T>(qa.x), q1 = unpack2<T>(qa.y);
      const float2 k0 = unpack2<T>(ka.x), k1 = unpack2<T>(ka.y);
      float sq2 = q0.x * q0.x + q0.y * q0.y + q1.x * q1.x + q1.y * q1.y;
      float sk2 = k0.x * k0.x + k0.y * k0.y + k1.x * k1.x + k1.y * k1.y;
#pragma unroll
      for (int o = 16; o > 0; o /= 2) {
        sq2 += __shfl_xor_sync(0xffffffffu, sq2, o);
        sk2 += __shfl_xor_sync(0xffffffffu, sk2, o);
      }
      if (lane == 0) {
        rq[i] = 1.f / sqrtf(sq2 + 1e-6f);
        rk[i] = 1.f / sqrtf(sk2 + 1e-6f);
        // The recompute hands the rstd on to the backward (one CTA per q/k head: the group's
        // first value head), as chunk_prepare does.
        if (kRecompute && p.rstd_qk != nullptr && i < L && hv % (HV / H) == 0) {
          p.rstd_qk[(row0 + i) * H + hq] = rq[i];
          p.rstd_qk[(p.B * p.T + row0 + i) * H + hq] = rk[i];
        }
      }
    }
  }
  // u's operand in place of v: beta * v rounded to T (chunk_prepare's kbu tile).
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    const int idx = tid + it * kThreads;
    const int i = idx / 16, c = (idx % 16) * 8;
    uint4 raw = *reinterpret_cast<const uint4*>(sv + i * kLdFull + c);
    uint32_t* pr = reinterpret_cast<uint32_t*>(&raw);
    const float b = beta_s[i];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 x = unpack2<T>(pr[e]);
      pr[e] = pack2<T>(b * x.x, b * x.y);
    }
    *reinterpret_cast<uint4*>(sv + i * kLdFull + c) = raw;
  }
  __syncthreads();  // rq, rk visible

  // ---- Aqk / L accumulators: unit = (pair, n-tile of 8 columns); warp w owns units w, w+8, w+16
  float acc_q[3][4], acc_l[3][4];
#pragma unroll
  for (int s = 0; s < 3; ++s)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_q[s][e] = acc_l[s][e] = 0.f;

  float2 bias = make_float2(0.f, 0.f);
#pragma unroll 1
  for (int h = 0; h < 2; ++h) {
    const int col = h * kHalf + cp;  // first column of the pair within K
    if (p.use_gate_in_kernel && p.dt_bias != nullptr)
      bias = make_float2(p.dt_bias[hv * kK + col], p.dt_bias[hv * kK + col + 1]);
    // -- gate and cumsum: running sums over the warp's 8 rows, then the row groups before it
    // g of this half: loaded here, not during the previous half (held through that half's row
    // loop, its 16 registers made the kernel spill at the 128-register cap).
    float2 graw[8];
    load_g(h, graw);
    float2 G[8];
    float2 run = make_float2(0.f, 0.f);
#pragma unroll
    for (int it = 0; it < 8; ++it) {
      const bool ok = r0 + it < L;
      run.x += ok ? gate_of(p, graw[it].x, bias.x, gate_a) : 0.f;
      run.y += ok ? gate_of(p, graw[it].y, bias.y, gate_a) : 0.f;
      G[it] = run;
    }
    *reinterpret_cast<float2*>(tot + warp * kHalf + cp) = run;
    __syncthreads();
    float2 before = make_float2(0.f, 0.f);
    for (int w2 = 0; w2 < warp; ++w2) {
      const float2 t = *reinterpret_cast<const float2*>(tot + w2 * kHalf + cp);
      before.x += t.x;
      before.y += t.y;
    }
    // Reference rows: the block's first row, its median row (safe_gate's median_ref_row: row
    // min(8, L_sub - 1) of the block), the chunk's last row; written by the warp that owns them.
    const int lsub = L - 16 * blk;
    const int med_row = 16 * blk + (lsub <= 0 ? 0 : (lsub - 1 < 8 ? lsub - 1 : 8));
#pragma unroll
    for (int it = 0; it < 8; ++it) {
      G[it].x += before.x;
      G[it].y += before.y;
      const int i = r0 + it;
      if (i == 16 * blk) *reinterpret_cast<float2*>(gfirst + blk * kHalf + cp) = G[it];
      if (i == med_row) *reinterpret_cast<float2*>(gmed + blk * kHalf + cp) = G[it];
      if (i == L - 1) *reinterpret_cast<float2*>(glast + cp) = G[it];
    }
    __syncthreads();  // reference rows visible; tot free

    // -- element-wise values of this thread's 8 rows x 2 columns
    const float2 gl = *reinterpret_cast<const float2*>(glast + cp);
    const float2 gm = *reinterpret_cast<const float2*>(gmed + blk * kHalf + cp);
    const float2 g_own_first = *reinterpret_cast<const float2*>(gfirst + blk * kHalf + cp);
    if constexpr (!kRecompute) {
      // The median path's range (rows past L carry gate 0: no span beyond the last row's).
      float span = 0.f;
#pragma unroll
      for (int it = 0; it < 8; ++it)
        span = fmaxf(span, fmaxf(fabsf(G[it].x - gm.x), fabsf(G[it].y - gm.y)));
      if (!(span <= kDiagSpanMax)) atomicOr(diag_bad + blk, 1);  // NaN spans too
    }
    // The row loop once per 16-row block (kBlk == blk, uniform per warp): which operand versions a
    // row writes depends on its block, and as run-time branches those cost a divergence region
    // per row. Unsigned 32-bit element offsets from the CTA's base pointers: one wide
    // multiply-add per store address (signed ones cost a sign extension and a 64-bit shift-add).
    const uint32_t o_first = static_cast<uint32_t>(r0 * hks + col);
    const uint32_t o_stride = static_cast<uint32_t>(hks);
    auto pack = [](float x, float y) { return pack2<T>(x, y); };
    auto rows = [&](auto blk_constant) {
      constexpr int kBlk = decltype(blk_constant)::value;
      // Off-diagonal column operands of rows in block kBlk, for the reference blocks I > kBlk:
      // e^{G_16I - G_j} = e^{G_16(kBlk+1) - G_j} * e^{G_16I - G_16(kBlk+1)} (both factors <= 1).
      float2 g_next = make_float2(0.f, 0.f);
      float2 s_ref[4];
#pragma unroll
      for (int I = 0; I < 4; ++I) s_ref[I] = make_float2(1.f, 1.f);
      if constexpr (!kRecompute && kBlk < 3) {
        g_next = *reinterpret_cast<const float2*>(gfirst + (kBlk + 1) * kHalf + cp);
#pragma unroll
        for (int I = kBlk + 2; I < 4; ++I) {
          const float2 gI = *reinterpret_cast<const float2*>(gfirst + I * kHalf + cp);
          s_ref[I] = make_float2(exp_ftz(gI.x - g_next.x), exp_ftz(gI.y - g_next.y));
        }
      }
#pragma unroll
      for (int it = 0; it < 8; ++it) {
        const int i = r0 + it;
        const float2 Gi = G[it];
        float2 a = unpack2<T>(*reinterpret_cast<const uint32_t*>(sq + i * kLdFull + col));
        float2 e = unpack2<T>(*reinterpret_cast<const uint32_t*>(sk + i * kLdFull + col));
        if (p.use_qk_l2norm) {
          const float sq_i = rq[i], sk_i = rk[i];
          a = make_float2(round_to<T>(a.x * sq_i), round_to<T>(a.y * sq_i));
          e = make_float2(round_to<T>(e.x * sk_i), round_to<T>(e.y * sk_i));
        }
        const float2 eg = make_float2(exp_ftz(Gi.x), exp_ftz(Gi.y));
        if (i < L) {
          const uint32_t o = o_first + it * o_stride;
          *reinterpret_cast<uint32_t*>(qg + o) = pack(a.x * eg.x, a.y * eg.y);
          *reinterpret_cast<uint32_t*>(kg + o) =
              pack(e.x * exp_ftz(gl.x - Gi.x), e.y * exp_ftz(gl.y - Gi.y));
          if (full_g_cum || i == L - 1) *reinterpret_cast<float2*>(g_cum + o) = Gi;
        }
        const float b = beta_s[i];
        *reinterpret_cast<uint32_t*>(sk + i * kLdFull + col) =  // w operand (0 past L)
            pack(b * e.x * eg.x, b * e.y * eg.y);
        if constexpr (!kRecompute) {
          const int c = i * kLdHalf + cp;
          // diagonal blocks: median reference
          const float2 x = make_float2(exp_ftz(Gi.x - gm.x), exp_ftz(Gi.y - gm.y));
          *reinterpret_cast<uint32_t*>(qd + c) = pack(a.x * x.x, a.y * x.y);
          *reinterpret_cast<uint32_t*>(kd + c) = pack(e.x * x.x, e.y * x.y);
          *reinterpret_cast<uint32_t*>(kcd + c) =
              pack(e.x * exp_ftz(gm.x - Gi.x), e.y * exp_ftz(gm.y - Gi.y));
          // off-diagonal row operands (blocks 1..3): reference = the block's first row
          if constexpr (kBlk > 0) {
            const float2 y =
                make_float2(exp_ftz(Gi.x - g_own_first.x), exp_ftz(Gi.y - g_own_first.y));
            *reinterpret_cast<uint32_t*>(sq + i * kLdFull + col) = pack(a.x * y.x, a.y * y.y);
            *reinterpret_cast<uint32_t*>(ko + c) = pack(e.x * y.x, e.y * y.y);
          }
          // off-diagonal column operands (blocks 0..2), one version per later reference block
          if constexpr (kBlk < 3) {
            const float2 z = make_float2(e.x * exp_ftz(g_next.x - Gi.x),
                                         e.y * exp_ftz(g_next.y - Gi.y));
#pragma unroll
            for (int I = kBlk + 1; I < 4; ++I)
              *reinterpret_cast<uint32_t*>(kc + (kc_base(I) + i) * kLdHalf + cp) =
                  pack(z.x * s_ref[I].x, z.y * s_ref[I].y);
          }
        }
        // Rows apart: hoisted above the previous rows' stores, every row's loads stay live at
        // once and the kernel spills at the register cap.
        asm volatile("" ::: "memory");
      }
    };
    switch (blk) {
      case 0: rows(std::integral_constant<int, 0>{}); break;
      case 1: rows(std::integral_constant<int, 1>{}); break;
      case 2: rows(std::integral_constant<int, 2>{}); break;
      default: rows(std::integral_constant<int, 3>{}); break;
    }
    __syncthreads();  // operands of this half visible
    // -- products of this half: 4 k-steps of 16 for each unit
#pragma unroll
    for (int s = 0; s < (kRecompute ? 0 : 3); ++s) {
      const int unit = warp + 8 * s;
      if (unit >= 2 * kPairs) break;  // warp-uniform
      const int pr = unit / 2, nt = unit % 2;
      const int I = pair_row(pr), J = pair_col(pr);
      const bool diag = I == J;
      // A (16 x 16 of row operands) and B (8 columns of the column operand) per k-step.
      const T* qa_base = diag ? qd + 16 * I * kLdHalf : sq + 16 * I * kLdFull + h * kHalf;
      const int qa_ld = diag ? kLdHalf : kLdFull;
      const T* ka_base = (diag ? kd : ko) + 16 * I * kLdHalf;
      const T* b_base = diag ? kcd + (16 * J + 8 * nt) * kLdHalf
                             : kc + (kc_base(I) + 16 * J + 8 * nt) * kLdHalf;
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        uint32_t aq[4], ak[4], bb[2];
        ldmatrix_x4(aq, qa_base + (lane % 16) * qa_ld + 16 * ks + 8 * (lane / 16));
        ldmatrix_x4(ak, ka_base + (lane % 16) * kLdHalf + 16 * ks + 8 * (lane / 16));
        ldmatrix_x2(bb, b_base + (lane % 8) * kLdHalf + 16 * ks + 8 * ((lane / 8) % 2));
        mma_16x8x16<T>(acc_q[s], aq, bb[0], bb[1]);
        mma_16x8x16<T>(acc_l[s], ak, bb[0], bb[1]);
      }
    }
    __syncthreads();  // operand tiles free for the next half (or for L / Akk)
  }

  if constexpr (!kRecompute) {
  T* Aqk = static_cast<T*>(p.Aqk) + ha0;
  T* Akk = static_cast<T*>(p.Akk) + ha0;
  const float scale = p.scale;
  // ---- diagonal blocks out of the median path's range: element by element (rare) -------------
  // Written straight to Aqk and to the L tile (free now: the operand tiles are dead); the
  // fragments of these blocks are skipped below. Scratch: the q tile (its last reader was the
  // second half's products). Per block: q-hat, k-hat and the block-local cumsum G of its 16 rows
  // over all 128 columns, then thread (i, j) sums q-hat_i k-hat_j e^{G_i - G_j} (and k-hat_i ...)
  // over the columns in fp32, as chunk_prepare does without safe_gate.
  if (diag_bad[0] | diag_bad[1] | diag_bad[2] | diag_bad[3]) {  // uniform
    T* xq = sq;
    T* xk = sq + 16 * kLdFull;
    float* xg = reinterpret_cast<float*>(sq + 32 * kLdFull);  // 16 x kLdX floats fit the rest
#pragma unroll 1
    for (int I = 0; I < 4; ++I) {
      if (!diag_bad[I]) continue;  // uniform
      const int rb = 16 * I;
      if (tid < kK) {
        const int c = tid;
        const float bias_c =
            (p.use_gate_in_kernel && p.dt_bias != nullptr) ? p.dt_bias[hv * kK + c] : 0.f;
        float gr[16];
        int64_t off[16];
#pragma unroll
        for (int it = 0; it < 16; ++it)
          off[it] = (rb + it < L ? static_cast<int64_t>(rb + it) * hks : 0) + hk0 + c;
        gather_any(gr, p.g, p.g_dtype, off);
        float run = 0.f;
#pragma unroll
        for (int it = 0; it < 16; ++it) {
          const int i = rb + it;
          float a = 0.f, e = 0.f;
          if (i < L) {
            run += gate_of(p, gr[it], bias_c, gate_a);
            a = to_float<T>(q[i * qks + c]);
            e = to_float<T>(k[i * qks + c]);
            if (p.use_qk_l2norm) {
              a = round_to<T>(a * rq[i]);
              e = round_to<T>(e * rk[i]);
            }
          }
          xg[it * kLdX + c] = run;
          xq[it * kLdFull + c] = from_float<T>(a);
          xk[it * kLdFull + c] = from_float<T>(e);
        }
      }
      __syncthreads();
      {
        const int i = tid / 16, j = tid % 16;  // entry (i, j) of the block
        float aq = 0.f, al = 0.f;
        if (j <= i) {
#pragma unroll 4
          for (int c = 0; c < kK; ++c) {
            const float f = to_float<T>(xk[j * kLdFull + c]) *
                            exp_ftz(xg[i * kLdX + c] - xg[j * kLdX + c]);
            aq += to_float<T>(xq[i * kLdFull + c]) * f;
            al += to_float<T>(xk[i * kLdFull + c]) * f;
          }
        }
        const int gi = rb + i, gj = rb + j;
        if (gi < L) Aqk[gi * has + gj] = from_float<T>(j <= i ? scale * aq : 0.f);
        lf[gi * kLdF + gj] = j < i ? beta_s[gi] * al : 0.f;
      }
      __syncthreads();  // the scratch is refilled for the next block
    }
  }
  // ---- Aqk to global (scaled, j <= i), L (beta-scaled, j < i) to shared --------------------
#pragma unroll
  for (int s = 0; s < 3; ++s) {
    const int unit = warp + 8 * s;
    if (unit >= 2 * kPairs) break;
    const int pr = unit / 2, nt = unit % 2;
    const int I = pair_row(pr), J = pair_col(pr);
    if (I == J && diag_bad[I]) continue;  // written element by element above
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {  // fragment rows g8 and g8 + 8
      const int i = 16 * I + g8 + 8 * hr;
      const int j = 16 * J + 8 * nt + 2 * t4;
      const float q0 = acc_q[s][2 * hr], q1 = acc_q[s][2 * hr + 1];
      const float l0 = acc_l[s][2 * hr], l1 = acc_l[s][2 * hr + 1];
      if (i < L) {
        *reinterpret_cast<uint32_t*>(Aqk + i * has + j) =
            pack2<T>(j <= i ? scale * q0 : 0.f, j + 1 <= i ? scale * q1 : 0.f);
      }
      const float b = beta_s[i];
      lf[i * kLdF + j] = j < i ? b * l0 : 0.f;
      lf[i * kLdF + j + 1] = j + 1 < i ? b * l1 : 0.f;
    }
  }
  // Aqk's blocks above the diagonal are stored zeros (as chunk_prepare stores them).
  for (int idx = tid; idx < kBT * 8; idx += kThreads) {
    const int i = idx / 8, c = (idx % 8) * 8;
    if (i < L && c >= 16 * (i / 16 + 1))
      *reinterpret_cast<uint4*>(Aqk + i * has + c) = make_uint4(0u, 0u, 0u, 0u);
  }
  __syncthreads();

  // ---- Akk = (I + L)^-1 in fp32 --------------------------------------------------------------
  // Diagonal blocks: thread (b, c) of the first 64 computes column c of block b's inverse,
  // X[r] = -sum_{j < r} L[r][j] X[j] for r > c (X[j] = 0 for j < c, X[c] = 1).
  if (tid < kBT) {
    const int b = tid / 16, c = tid % 16;
    const float* Lb = lf + 16 * b * kLdF + 16 * b;
    float X[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) X[r] = r == c ? 1.f : 0.f;
#pragma unroll
    for (int r = 1; r < 16; ++r) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < r; ++j) s += Lb[r * kLdF + j] * X[j];
      if (r > c) X[r] = -s;
    }
#pragma unroll
    for (int r = 0; r < 16; ++r) ai[(16 * b + r) * kLdF + 16 * b + c] = X[r];
  }
  __syncthreads();
  // Off-diagonal blocks by block diagonals d: X[bb][aa] = -X[bb][bb] sum_{m} L[bb][m] X[m][aa],
  // m over rows 16 aa .. 16 bb - 1. Thread: one row r and four columns c4 .. c4 + 3 of one block.
#pragma unroll 1
  for (int d = 1; d < 4; ++d) {
    const int npairs = 4 - d;
    if (tid < npairs * 64) {
      const int aa = tid / 64, bb = aa + d, r = (tid % 64) / 4, c4 = (tid % 4) * 4;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      // (A multiple of 16 iterations: unrolled by 4 so that the shared loads of four steps are
      // in flight together instead of one round trip a step.)
#pragma unroll 4
      for (int m = 16 * aa; m < 16 * bb; ++m) {
        const float lv = lf[(16 * bb + r) * kLdF + m];
        const float4 xv = *reinterpret_cast<const float4*>(ai + m * kLdF + 16 * aa + c4);
        s0 += lv * xv.x;
        s1 += lv * xv.y;
        s2 += lv * xv.z;
        s3 += lv * xv.w;
      }
      *reinterpret_cast<float4*>(tmp + aa * 320 + r * 20 + c4) = make_float4(s0, s1, s2, s3);
    }
    __syncthreads();
    if (tid < npairs * 64) {
      const int aa = tid / 64, bb = aa + d, r = (tid % 64) / 4, c4 = (tid % 4) * 4;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma unroll 4
      for (int m = 0; m <= r; ++m) {
        const float xv = ai[(16 * bb + r) * kLdF + 16 * bb + m];
        const float4 tv = *reinterpret_cast<const float4*>(tmp + aa * 320 + m * 20 + c4);
        s0 += xv * tv.x;
        s1 += xv * tv.y;
        s2 += xv * tv.z;
        s3 += xv * tv.w;
      }
      *reinterpret_cast<float4*>(ai + (16 * bb + r) * kLdF + 16 * aa + c4) =
          make_float4(-s0, -s1, -s2, -s3);
    }
    __syncthreads();
  }
  // Akk rounded to T (zeros above the diagonal) into shared memory, then to global.
  for (int idx = tid; idx < kBT * kBT / 2; idx += kThreads) {
    const int i = idx / 32, j = (idx % 32) * 2;
    const float x0 = j <= i ? ai[i * kLdF + j] : 0.f;
    const float x1 = j + 1 <= i ? ai[i * kLdF + j + 1] : 0.f;
    *reinterpret_cast<uint32_t*>(akk + i * kLdHalf + j) = pack2<T>(x0, x1);
  }
  __syncthreads();
  for (int idx = tid; idx < kBT * 8; idx += kThreads) {
    const int i = idx / 8, c = (idx % 8) * 8;
    if (i < L)
      *reinterpret_cast<uint4*>(Akk + i * has + c) =
          *reinterpret_cast<const uint4*>(akk + i * kLdHalf + c);
  }
  }  // !kRecompute

  // ---- w = Akk (beta k e^G), u = Akk (beta v): warp w owns columns 16 w .. 16 w + 15 --------
  // Only the k-steps J <= I of row block I (Akk is lower triangular).
#pragma unroll 1
  for (int which = 0; which < 2; ++which) {
    const T* bsrc = which == 0 ? sk : sv;
    T* dst = which == 0 ? w : u;
    float acc[4][2][4];
#pragma unroll
    for (int I = 0; I < 4; ++I)
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[I][n][e] = 0.f;
#pragma unroll
    for (int J = 0; J < 4; ++J) {
      uint32_t bb[4];
      ldmatrix_x4_trans(bb, bsrc + (16 * J + 8 * ((lane / 8) % 2) + lane % 8) * kLdFull +
                                16 * warp + 8 * (lane / 16));
#pragma unroll
      for (int I = J; I < 4; ++I) {
        uint32_t aa[4];
        ldmatrix_x4(aa, akk + (16 * I + lane % 16) * kLdHalf + 16 * J + 8 * (lane / 16));
        mma_16x8x16<T>(acc[I][0], aa, bb[0], bb[1]);
        mma_16x8x16<T>(acc[I][1], aa, bb[2], bb[3]);
      }
    }
#pragma unroll
    for (int I = 0; I < 4; ++I)
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int i = 16 * I + g8 + 8 * hr;
          const int c = 16 * warp + 8 * n + 2 * t4;
          if (i < L)
            *reinterpret_cast<uint32_t*>(dst + i * hks + c) =
                pack2<T>(acc[I][n][2 * hr], acc[I][n][2 * hr + 1]);
        }
  }
}

}  // namespace cuda
}  // namespace kda_ext

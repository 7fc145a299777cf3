// kda_ext CUDA: kernel 0 (varlen chunk offsets) and kernel 1 "chunk_prepare" of the forward
// (preprocessing, gate cumsum, Aqk, Lkk, Akk = (I + Lkk)^-1, w, u, qg, kg) for one chunk.
//
// Design (and why it departs from the suggested one where it does):
// - One CTA of 256 threads per (chunk slot, value head), grid (NT, HV, B).
// - K is processed in slices of 32 columns. The gate cumsum runs along time and is independent
//   per column, so gate, cumsum, qg, kg, g_cum and the Aqk/Lkk contributions of a slice need only
//   that slice; K therefore is a run-time size (no head-dim template), K = 60/100 are masked
//   columns of the last slice, and shared memory stays at 88 KiB (bf16, BT = 64) for any K. The
//   l2norm rstd (which needs whole rows) is computed first, straight from global memory.
// - A slice costs four barriers: warp w owns BT/8 consecutive rows, so the gate cumsum is a
//   running sum in registers plus the sums of the warps before it (one exchange through shared
//   memory) instead of one warp walking all BT rows; the Aqk/Lkk blocks accumulate in register
//   fragments across the slices; under safe_gate one operand set (median reference row per 16-row
//   block) serves the diagonal and the off-diagonal blocks alike (fp16: see below). Pass 2
//   computes the w and u slices together with double-buffered operand tiles; 16-bit inputs at
//   chunk 64 on register-level mma.sync, storing the results from registers (one barrier a
//   slice), the other builds on wmma through fp32 result tiles (two barriers a slice).
// - Aqk/Lkk: fp32 inputs use tf32 MMAs on fp32 operands (FLA's own inter/solve dots are tf32);
//   fp16/bf16 inputs use 16-bit operands and MMAs wherever the range allows: the safe_gate
//   diagonal operand k*exp(G_n - G_j) reaches e^40, so fp16 keeps tf32 for the diagonal blocks
//   (see "pass 1's Aqk/Lkk products" below; the error margins over FLA's matrices did not move).
//   w/u/o/state MMAs use the storage dtype (fp16/bf16 m16n16k16 or m16n8k16, tf32 for fp32
//   inputs), matching FLA's casts of their operands.
// - Akk = (I + L)^-1 in fp32 SIMT: forward substitution inside the 16x16 diagonal blocks (all
//   blocks at once), then the off-diagonal blocks by block diagonals (FLA's merge order, but in
//   full fp32 rather than tf32 dots), instead of one thread per column over all BT rows.
// - Global loads of a slice are issued into registers before any is used, and the next slice's
//   before this slice's shared-memory work (two CTAs per SM leave little latency hiding). They
//   are branch-free (offsets clamped to a valid element, invalid entries zeroed afterwards): a
//   load under `if (row < L)` followed by its conversion inside the branch waits for memory
//   before the next load issues, and that had made each load of a slice a round trip of its own.
//   Measured on H100 (docs/perf-notes.md has each step): the fewer barriers above did not change
//   the time; the branch-free loads cut the kernel by 27%.
// - exp in the hot loops is __expf (ex2.approx of x*log2e, ~2 ulp plus |x|*2^-24 relative): the
//   same class of error as FLA's exp2 on log2-scaled cumsums, at a fraction of expf's
//   instructions (the kernel is issue-bound after the load fix). The gates keep expf/log1pf.
// - w needs exp(G) of all K columns after Akk is known; g_cum was already written to global
//   memory by this CTA, so the second pass reads it back (same block, after __syncthreads: the
//   writes are visible; the pointer is deliberately not const/__restrict__ so no .nc load is used).
#pragma once

#include "cuda/elementwise.cuh"
#include "cuda/mma.cuh"
#include "cuda/mma_sync.cuh"
#include "cuda/params.h"

namespace kda_ext {
namespace cuda {

constexpr int kPrepThreads = 256;
constexpr int kSlice = 32;        // K (and V) columns per pass
constexpr int kLdf = kSlice + 4;  // fp32 slice tiles: 16-byte row padding against bank conflicts
constexpr int kLd16 = kSlice + 8;  // 16-bit slice tiles: 16-byte row padding (conflict-free LDSM)

// ---- pass 1's Aqk/Lkk products: operand precision per input dtype -------------------------
// For fp16/bf16 inputs the products run as T-typed wmma m16n16k16 with fp32 accumulators on
// gate-scaled operands rounded to T and kept in 16-bit tiles:
//   - the off-diagonal 16x16 blocks always;
//   - the diagonal blocks under safe_gate for bf16 only: their factors reach e^{8 |lb|} (~e^40),
//     beyond fp16's 65504, while bf16 has fp32's range; fp16 keeps tf32 on fp32 tiles there.
// fp32 inputs keep every product in tf32 on fp32 tiles (the original pass 1, "!kNew" below).
// Measured (docs/perf-notes.md, session 7; H100): forward -8.9% at (2, 8192, 32, 128) bf16 kimi,
// error margins over FLA's matrices unchanged (worst 0.71 of the tolerance).
// The 16-bit builds use a restructured pass 1 ("new layout" in the kernel): the column operand
// rows of the diagonal blocks get a tile of their own, written by the thread that owns the row
// in section B (no separate pass over them), and, when under safe_gate the off-diagonal blocks
// are 16-bit but the diagonal ones are not (fp16), the off-diagonal blocks use FLA's reference
// row (the first row of their row block: every factor <= 1, so fp16 cannot overflow) instead of
// the median row the diagonal blocks need. The new layout's off-diagonal products are always on
// 16-bit operands (an fp32 variant was measured and dropped).
template <typename T>
struct Prep16 {
  static constexpr bool k16 = std::is_same<T, __half>::value ||
                              std::is_same<T, __nv_bfloat16>::value;
  // Layout-level switches (the safe_gate build's; a build without safe_gate has no diagonal jobs).
  static constexpr bool kDiag = std::is_same<T, __nv_bfloat16>::value;  // never for fp16
  static constexpr bool kNew = k16;
};

// One chunk_prepare build's mode (a struct rather than constexpr locals in the kernel: those, even
// unused, renumbered the default build's PTX registers). kNew selects the restructured pass 1
// (16-bit off-diagonal products); kDiagH: the diagonal products on 16-bit operands too;
// kOffOwnRef: under safe_gate with fp32 diagonal products (fp16), the off-diagonal operands use
// the first row of the row block as reference (factors <= 1) in tiles of their own (qh/kh, kch).
// kRowF / kRowH: the row operands scaled with the block's own reference row (safe_gate: the
// median; without: the first row) go to the fp32 tiles qop/kop (fp32 inputs, and fp16 under
// safe_gate for its tf32 diagonal products) or to the 16-bit qh/kh (the other 16-bit builds).
template <typename T, bool kSafe>
struct PrepMode {
  static constexpr bool kNew = Prep16<T>::kNew;
  static constexpr bool kDiagH = kSafe && Prep16<T>::kDiag;
  static constexpr bool kOffOwnRef = kSafe && kNew && !kDiagH;
  static constexpr bool kRowF = !kNew || kOffOwnRef;
  static constexpr bool kRowH = !kRowF;
};

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

// ---- kernel 1 ------------------------------------------------------------------------------

struct PrepLayout {
  // pass 1 (fp32 slice tiles, and the per-warp column sums of the gate cumsum). With
  // Prep16<T>::kNew: qop/kop are the fp32 row-operand tiles (absent when no product uses them),
  // qh/kh the 16-bit ones, kc the off-diagonal column operand (in T), kcd the diagonal one.
  int64_t qs, ks, gs, qop, kop, kc, tot, kc_src, diag_src;
  int64_t qh, kh, kcd;
  // pass 2, aliasing pass 1: Akk in T, and the w/u operand and result tiles, double-buffered
  // (the result tiles stw/stu are empty in the mma.sync builds, PrepDims::kPass2Mma)
  int64_t akk, kbw[2], kbu[2], stw[2], stu[2];
  // persistent
  int64_t aacc, lacc, beta, rq, rk;
  int64_t total;
};

template <typename T, int BT, bool kSafe>
struct PrepDims {
  static constexpr int NC = BT / 16;
  static constexpr int kWarps = kPrepThreads / 32;
  // Pass 1: warp w owns the kRows consecutive rows from w * kRows, lane = column of the slice.
  static constexpr int kRows = BT / kWarps;
  // 16x16 blocks (bb, aa) of Aqk and of Lkk that go through tensor cores, per matrix: with
  // safe_gate every block on or below the diagonal, without it the off-diagonal ones (the
  // diagonal ones are then exact element-wise sums).
  static constexpr int kSafePairs = NC * (NC + 1) / 2;
  static constexpr int kOffPairs = NC * (NC - 1) / 2;
  static constexpr int kJobs = 2 * (kSafe ? kSafePairs : kOffPairs);
  static constexpr int kMaxJobs = (kJobs + kWarps - 1) / kWarps;  // per warp
  // Column-operand rows: block row bb uses rows 0..16bb+15 with safe_gate, 0..16bb-1 without.
  static constexpr int kKcRows = 16 * kSafePairs;
  // Prep16<T>::kNew's job order: the 2 NC diagonal jobs first (Aqk blocks bb = 0..NC-1, then
  // Lkk; safe_gate only), then the off-diagonal ones (Aqk pairs, then Lkk pairs, block rows from
  // 1, as the plain build orders them). Job warp + s * kWarps is this warp's slot s; a slot whose
  // jobs are all of one kind holds one accumulator type (at chunk 64 slot 0 is the 8 diagonal
  // jobs, slots 1-2 the 12 off-diagonal ones; at chunk 32 slot 0 mixes 4 diagonal and 2
  // off-diagonal jobs: a warp-uniform branch, and two accumulators if their precisions differ).
  static constexpr int kDiagJobs = kSafe ? 2 * NC : 0;
  static constexpr bool slot_all_diag(int s) { return (s + 1) * kWarps <= kDiagJobs; }
  static constexpr bool slot_all_off(int s) { return s * kWarps >= kDiagJobs; }
  // Element-wise diagonal entries (i >= j inside a 16x16 diagonal block) without safe_gate.
  static constexpr int kDiagPairs = kSafe ? 0 : NC * 136;
  static constexpr int kDiagPer = kSafe ? 1 : (kDiagPairs + kPrepThreads - 1) / kPrepThreads;
  static constexpr int kLda = BT + 4;     // fp32 BT x BT accumulators
  static constexpr int kLdk = BT + 8;     // Akk in T
  static constexpr int kLdb = kSlice + 8; // w/u operand slice in T (80-byte rows: conflict-free
                                          // ldmatrix, 8 rows hit 8 distinct 16-byte bank groups)
  // Pass 2 on register-level mma.sync (16-bit inputs, chunk 64): the products' accumulators stay
  // in registers and are stored to global memory from there, so the fp32 result tiles stw/stu
  // and the barrier before their read-out go away. fp32 inputs (tf32) and chunk 32 keep wmma.
  static constexpr bool kPass2Mma = Prep16<T>::k16 && BT == 64;
  static_assert(BT % kWarps == 0 && kKcRows >= BT, "pass-1 row ownership");
};

// Pass 2's tiles (Akk in T, the w / u operand tiles and, without the mma.sync pass 2, their fp32
// staging), carved from their own region: the same in the full and the recompute-only layout.
template <typename T, int BT>
__host__ __device__ inline void take_pass2_tiles(PrepLayout& l, SmemCarver& c2) {
  using D = PrepDims<T, BT, true>;
  l.akk = c2.take<T>(BT * D::kLdk);
  const int st_elems = D::kPass2Mma ? 0 : BT * kLdf;
  for (int b = 0; b < 2; ++b) {
    l.kbw[b] = c2.take<T>(BT * D::kLdb);
    l.kbu[b] = c2.take<T>(BT * D::kLdb);
    l.stw[b] = c2.take<float>(st_elems);
    l.stu[b] = c2.take<float>(st_elems);
  }
}

template <typename T, int BT>
__host__ __device__ inline PrepLayout prep_layout() {
  using D = PrepDims<T, BT, true>;  // the larger column-operand count; same layout for both
  PrepLayout l{};
  SmemCarver c1;
  l.qs = c1.take<float>(BT * kLdf);
  l.ks = c1.take<float>(BT * kLdf);
  l.gs = c1.take<float>(BT * kLdf);
  using P = Prep16<T>;
  if constexpr (!P::kNew) {
    l.qop = c1.take<float>(BT * kLdf);
    l.kop = c1.take<float>(BT * kLdf);
    l.kc = c1.take<float>(D::kKcRows * kLdf);
  } else {
    // The union of the safe_gate and the plain build: fp32 row operands if some product reads
    // them, 16-bit ones likewise, the off-diagonal column rows (16 per block pair) and the
    // diagonal ones (16 per block; safe_gate only) each in its products' precision.
    // (The off-diagonal operands are always 16-bit here.)
    const bool row_f = !P::kDiag;
    l.qop = c1.take<float>(row_f ? BT * kLdf : 0);
    l.kop = c1.take<float>(row_f ? BT * kLdf : 0);
    l.qh = c1.take<T>(BT * kLd16);
    l.kh = c1.take<T>(BT * kLd16);
    constexpr int kOffRows = 16 * D::kOffPairs, kDiagRows = 16 * D::NC;
    l.kc = c1.take<T>(kOffRows * kLd16);
    l.kcd = P::kDiag ? c1.take<T>(kDiagRows * kLd16) : c1.take<float>(kDiagRows * kLdf);
  }
  l.tot = c1.take<float>(D::kWarps * kSlice);
  l.kc_src = c1.take<int>(D::kKcRows);
  l.diag_src = c1.take<int>(PrepDims<T, BT, false>::kDiagPairs);
  SmemCarver c2;
  take_pass2_tiles<T, BT>(l, c2);
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

// The recompute-only build's layout (chunk_prepare_kernel<..., kRecompute = true>: the backward's
// recompute, which reuses the forward's Akk): pass 1 keeps only the slice tiles qs/ks/gs and the
// per-warp column sums, pass 2 (aliasing them) Akk in T and the w/u operand tiles; no Aqk/Lkk
// accumulators, operand tiles or job tables. Same roles and row strides as prep_layout, so the
// same addresses relative to each tile (only the tiles' bases move). bf16, chunk 64: 30.5 KiB
// instead of 88.
template <typename T, int BT>
__host__ __device__ inline PrepLayout prep_layout_recompute() {
  using D = PrepDims<T, BT, true>;
  PrepLayout l{};
  SmemCarver c1;
  l.qs = c1.take<float>(BT * kLdf);
  l.ks = c1.take<float>(BT * kLdf);
  l.gs = c1.take<float>(BT * kLdf);
  l.tot = c1.take<float>(D::kWarps * kSlice);
  SmemCarver c2;
  take_pass2_tiles<T, BT>(l, c2);
  SmemCarver c;
  c.offset = c1.offset > c2.offset ? c1.offset : c2.offset;
  l.beta = c.take<float>(BT);
  l.rq = c.take<float>(BT);
  l.rk = c.take<float>(BT);
  l.total = align_up(c.offset, 128);
  return l;
}

template <typename T, int BT, bool kRecompute>
__host__ __device__ inline PrepLayout prep_layout_for() {
  if constexpr (kRecompute) return prep_layout_recompute<T, BT>();
  else return prep_layout<T, BT>();
}

// Row of the median reference of 16-row block blk under safe_gate: row min(8, L_sub - 1) of the
// block (its first row when the block lies past the chunk's end).
__device__ __forceinline__ int median_ref_row(int blk, int L) {
  const int lsub = L - 16 * blk;
  return 16 * blk + (lsub <= 0 ? 0 : (lsub - 1 < 8 ? lsub - 1 : 8));
}

// kSafe == p.safe_gate: a template parameter so that each regime holds only its own
// accumulators in registers (the kernel runs at the 128-register limit of two CTAs per SM).
// kFixedKV: 0 for any K and V, or a multiple of kSlice that K and V both equal exactly (the host
// picks 128, the Kimi head size, with chunk 64 and 16-bit inputs). The kernel is issue-bound on
// integer address arithmetic and fp32 element work, not on its MMAs, so folding sizes into
// constants pays: the strides H*K, HV*K, HV*V and the per-head bases become shifts, the slice
// counts of both passes are constants, every slice is whole (the `col < K` / `col < V` masks of the
// loads, stores and the gate are always true, and pass 2's per-job slice check drops), K == V makes
// the w and u offsets of pass 2 one expression, and the l2norm's scalar fallback (K % 8 != 0) is
// dead code. Only constant folding: results are bitwise identical to the general build. The slice
// loops stay rolled (unrolled they would raise register pressure at the 128-register cap). Most of
// the static saving is in pass 2 (its slice loop 819 -> 645 SASS instructions, bf16 chunk 64); pass
// 1's loop barely shrinks (~2%: its integer work is the MMA job and operand-row bookkeeping, which
// does not depend on K).
//
// kRecompute: the backward's recompute only (p.Akk_saved set, no output): reuse_akk is a
// compile-time true, so the Aqk/Lkk products, their accumulators, operand tiles and the inverse
// are compiled out, shared memory is prep_layout_recompute's, and the launch bound asks for
// kPrepRecomputeCtas CTAs per SM. The code it runs is the same source as the run-time
// reuse_akk path of the default build (same arithmetic, same order).
// Registers keep it at 2 CTAs per SM for now: unbounded it takes 118 registers (bf16/fp16,
// chunk 64, K = V = 128; 256 threads), and a bound of 3 (80 registers) spilled 60 bytes, still
// 20-24 with pass 2's Akk fragments reloaded per slice or the l2norm's row loads halved. Shared
// memory alone would allow 7 (30.5 KiB).
constexpr int kPrepRecomputeCtas = 2;
template <typename T, int BT, bool kSafe, int kFixedKV = 0, bool kRecompute = false>
__global__ void __launch_bounds__(kPrepThreads, kRecompute ? kPrepRecomputeCtas : 2)
    chunk_prepare_kernel(const ChunkKdaFwdParams p) {
  using D = PrepDims<T, BT, kSafe>;
  constexpr int NC = D::NC;
  constexpr int LDA = D::kLda, LDK = D::kLdk, LDB = D::kLdb;
  constexpr int kWarps = D::kWarps, kRows = D::kRows;
  extern __shared__ __align__(128) unsigned char smem[];
  const PrepLayout lay = prep_layout_for<T, BT, kRecompute>();
  float* qs = reinterpret_cast<float*>(smem + lay.qs);
  float* ks = reinterpret_cast<float*>(smem + lay.ks);
  float* gs = reinterpret_cast<float*>(smem + lay.gs);
  float* qop = reinterpret_cast<float*>(smem + lay.qop);
  float* kop = reinterpret_cast<float*>(smem + lay.kop);
  float* kc = reinterpret_cast<float*>(smem + lay.kc);
  float* tot = reinterpret_cast<float*>(smem + lay.tot);
  int* kc_src = reinterpret_cast<int*>(smem + lay.kc_src);
  int* diag_src = reinterpret_cast<int*>(smem + lay.diag_src);
  // Prep16<T>::kNew only: the 16-bit row operands, the 16-bit off-diagonal column operand (same
  // place as kc), the diagonal column operand (fp32 or 16-bit). (Accessors, not pointers: declared
  // pointers, even unused, renumbered the default build's PTX registers.)
  auto qh = [&] { return reinterpret_cast<T*>(smem + lay.qh); };
  auto kh = [&] { return reinterpret_cast<T*>(smem + lay.kh); };
  auto kch = [&] { return reinterpret_cast<T*>(smem + lay.kc); };
  auto kcdf = [&] { return reinterpret_cast<float*>(smem + lay.kcd); };
  auto kcdh = [&] { return reinterpret_cast<T*>(smem + lay.kcd); };
  T* akk = reinterpret_cast<T*>(smem + lay.akk);
  float* aacc = reinterpret_cast<float*>(smem + lay.aacc);
  float* lacc = reinterpret_cast<float*>(smem + lay.lacc);
  float* beta_s = reinterpret_cast<float*>(smem + lay.beta);
  float* rq = reinterpret_cast<float*>(smem + lay.rq);
  float* rk = reinterpret_cast<float*>(smem + lay.rk);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  static_assert(kSlice == 32, "slice loops map one column per lane");
  const int64_t HV = p.HV, H = p.H;
  static_assert(kFixedKV >= 0 && kFixedKV % kSlice == 0, "kFixedKV: whole slices only");
  // <= 256 (host-checked); with kFixedKV the host has checked K == V == kFixedKV.
  const int K = kFixedKV > 0 ? kFixedKV : static_cast<int>(p.K);
  const int V = kFixedKV > 0 ? kFixedKV : static_cast<int>(p.V);
  // Every 32-column slice lies inside K and V: the column masks below fold to true.
  constexpr bool kWhole = kFixedKV > 0;
  const int64_t b = blockIdx.z;
  // Head indices in int (HV <= 65535, the grid's y limit): a 64-bit division is a subroutine of
  // dozens of instructions.
  const int hv = blockIdx.y;  // grid (NT, HV, B)
  const int heads_per_q = static_cast<int>(HV) / static_cast<int>(H);
  const int hq = hv / heads_per_q;
  const ChunkLoc loc = locate_chunk(p, blockIdx.x, b);
  const int L = loc.L;
  if (L <= 0) return;  // uniform across the block
  const int64_t row0 = loc.row0;

  // Addressing: each tensor's pointer below is advanced once, in 64-bit arithmetic, to the
  // chunk's first row of this head; element (i, col) of the chunk is then i * stride + col in
  // int, one 32-bit multiply-add and a widening address add per load or store instead of a chain
  // of 64-bit integer instructions (the kernel is issue-bound). launch_fwd.cu checks that
  // BT * stride < 2^31 for every stride here.
  const int64_t qk0 = (row0 * H + hq) * K;   // q, k: rows of H * K
  const int64_t hk0 = (row0 * HV + hv) * K;  // g, g_cum, qg, kg, w: rows of HV * K
  const int64_t hv0 = (row0 * HV + hv) * V;  // v, u: rows of HV * V
  const int64_t ha0 = (row0 * HV + hv) * BT; // Aqk, Akk, the saved Akk: rows of HV * BT
  const int qks = static_cast<int>(H * K), hks = static_cast<int>(HV * K);
  const int hvs = static_cast<int>(HV * V), has = static_cast<int>(HV * BT);
  const T* __restrict__ q = static_cast<const T*>(p.q) + qk0;
  const T* __restrict__ k = static_cast<const T*>(p.k) + qk0;
  const T* __restrict__ v = static_cast<const T*>(p.v) + hv0;
  T* w = static_cast<T*>(p.w) + hk0;
  T* u = static_cast<T*>(p.u) + hv0;
  T* qg = static_cast<T*>(p.qg) + hk0;
  T* kg = static_cast<T*>(p.kg) + hk0;
  // w is written twice: pass 1 leaves the w operand beta * k-hat * e^G there and pass 2 reads it
  // back and overwrites it with w (no __restrict__/const: same block, after barriers).
  float* g_cum = p.g_cum + hk0;
  // (Aqk and Akk are null in the recompute: their chunk pointers are formed where they are used.)

  // Uniform across the grid: the recompute of the backward, with Akk known.
  const bool reuse_akk = kRecompute || p.Akk_saved != nullptr;
  constexpr bool safe = kSafe;
  // The build's operand precision and pass-1 layout (see PrepMode).
  using M = PrepMode<T, kSafe>;

  // All global loads of a slice are issued before any is used, and the next slice's loads are
  // issued before this slice's shared-memory work (fixed trip counts, unrolled).
  const int r0 = warp * kRows;
  // (Returned by value, not written through a captured array: a captured array's address is
  // taken and it would live in local memory.)
  struct SliceIn {
    float q[kRows], k[kRows], g[kRows];
    float bias;  // dt_bias of the lane's column (0 without one)
  };
  // Loads are branch-free (see gather): an invalid (row, column) reads the chunk's first element
  // of that tensor, always valid, and is zeroed after. q and k stay raw until g's loads are out.
  auto load_slice = [&](int k0) {
    SliceIn r;
    const int col = k0 + lane;
    r.bias = (p.use_gate_in_kernel && p.dt_bias != nullptr && (kWhole || col < K))
                 ? p.dt_bias[hv * K + col]
                 : 0.f;
    int oqk[kRows], ohk[kRows];
    bool ok[kRows];
#pragma unroll
    for (int it = 0; it < kRows; ++it) {
      const int i = r0 + it;
      ok[it] = i < L && (kWhole || col < K);
      oqk[it] = ok[it] ? i * qks + col : 0;
      ohk[it] = ok[it] ? i * hks + col : 0;
    }
    T rawq[kRows], rawk[kRows];
#pragma unroll
    for (int it = 0; it < kRows; ++it) {
      rawq[it] = q[oqk[it]];
      rawk[it] = k[oqk[it]];
    }
    switch (p.g_dtype) {
      case DType::kBFloat16:
        gather(r.g, static_cast<const __nv_bfloat16*>(p.g) + hk0, ohk);
        break;
      case DType::kFloat16:
        gather(r.g, static_cast<const __half*>(p.g) + hk0, ohk);
        break;
      case DType::kFloat64:
        gather(r.g, static_cast<const double*>(p.g) + hk0, ohk);
        break;
      case DType::kFloat32:
      default:  // the host validated the tag
        gather(r.g, static_cast<const float*>(p.g) + hk0, ohk);
        break;
    }
#pragma unroll
    for (int it = 0; it < kRows; ++it) {
      r.q[it] = ok[it] ? to_float<T>(rawq[it]) : 0.f;
      r.k[it] = ok[it] ? to_float<T>(rawk[it]) : 0.f;
      r.g[it] = ok[it] ? r.g[it] : 0.f;
    }
    return r;
  };
  // kFixedKV builds: slice 0's loads go out first, before the l2norm's row loads below: both
  // are then in flight together instead of one memory round trip after the other (the
  // recompute waits on global memory more than it issues). Values and arithmetic are unchanged.
  // (The general builds load it after the row scalars, as before: hoisted, the 16-bit chunk-64
  // build without safe_gate spilled 4 bytes and fp32 chunk 32 went from 96 to 123 registers.)
  SliceIn in;
  if constexpr (kWhole) in = load_slice(0);

  // ---- per-row scalars: l2norm rstd, beta -------------------------------------------------
  // kTpr threads per row, each summing a strided part of the row (16-byte loads where rows are
  // whole vectors), then a shuffle reduction inside the kTpr-lane group.
  {
    constexpr int kTpr = kPrepThreads / BT;
    const int i = tid / kTpr, part = tid % kTpr;
    float sq = 0.f, sk = 0.f;
    if (p.use_qk_l2norm && i < L) {
      const T* qr = q + i * qks;
      const T* kr = k + i * qks;
      if (K % 8 == 0 && aligned16(q) && aligned16(k)) {
#pragma unroll 4
        for (int c = part * 8; c < K; c += kTpr * 8) {
          const F8 a = load8<T>(qr + c), e = load8<T>(kr + c);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            sq += a.v[j] * a.v[j];
            sk += e.v[j] * e.v[j];
          }
        }
      } else {
#pragma unroll 8
        for (int c = part; c < K; c += kTpr) {
          const float a = to_float<T>(qr[c]);
          const float e = to_float<T>(kr[c]);
          sq += a * a;
          sk += e * e;
        }
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
      // One CTA per q/k head (the group's first value head) hands the row's rstd on.
      if (p.rstd_qk != nullptr && p.use_qk_l2norm && i < L && hv % heads_per_q == 0) {
        p.rstd_qk[(row0 + i) * H + hq] = rq[i];
        p.rstd_qk[(p.B * p.T + row0 + i) * H + hq] = rk[i];
      }
    }
  }
  for (int i = tid; i < BT; i += kPrepThreads)
    beta_s[i] = i < L ? beta_of(p, load_any(p.beta, p.beta_dtype, (row0 + i) * HV + hv)) : 0.f;
  // (The recompute reads neither accumulator: it skips the 2 * BT * LDA shared stores.)
  if (!reuse_akk) {
    for (int idx = tid; idx < BT * LDA; idx += kPrepThreads) {
      aacc[idx] = 0.f;
      lacc[idx] = 0.f;
    }
  }
  if constexpr (!kWhole) in = load_slice(0);
  __syncthreads();  // rq/rk/beta_s are read by other threads below

  // ---- pass 1: gate, cumsum, g_cum/qg/kg, Aqk and Lkk accumulation, per K slice ----------
  // The tensor-core blocks of Aqk/Lkk accumulate in registers across the slices (each warp owns
  // up to kMaxJobs 16x16 blocks) and go to shared memory once at the end.
  // safe_gate: every block (bb, aa <= bb) uses one reference row per block row, the median row
  // n of block bb: row operand x_i e^{G_i - G_n} (<= e^{8 * 5}, since every step is >= -5),
  // column operand k_j e^{G_n - G_j} (<= e^{8 * 5} on the diagonal, <= 1 before it).
  // Without safe_gate the reference is the block's first row r = 16bb (both factors <= 1 for
  // the off-diagonal blocks) and the diagonal blocks are summed element-wise with e^{G_i - G_j}.
  constexpr int npairs = safe ? D::kSafePairs : D::kOffPairs;
  const int njobs = reuse_akk ? 0 : D::kJobs;
  // Source of column-operand row rr, the same for every slice: row j of the chunk scaled by
  // e^{G_ref - G_j}, packed as j + 256 * ref (read after the first barrier of pass 1).
  if constexpr (!M::kNew) {
    for (int rr = tid; rr < 16 * npairs; rr += kPrepThreads) {
      int bb = safe ? 0 : 1, base = 0;
      while (rr >= base + 16 * (safe ? bb + 1 : bb)) {
        base += 16 * (safe ? bb + 1 : bb);
        ++bb;
      }
      kc_src[rr] = (rr - base) + 256 * (safe ? median_ref_row(bb, L) : 16 * bb);
    }
  } else {
    // New layout: kc holds only the off-diagonal column rows (block row bb >= 1: rows
    // 0..16bb-1, at 16 bb (bb - 1) / 2); the diagonal ones are written in section B. (Only
    // products read kc_src: the recompute skips it.)
    for (int rr = tid; !reuse_akk && rr < 16 * D::kOffPairs; rr += kPrepThreads) {
      int bb = 1, base = 0;
      while (rr >= base + 16 * bb) {
        base += 16 * bb;
        ++bb;
      }
      const int ref = (safe && !M::kOffOwnRef) ? median_ref_row(bb, L) : 16 * bb;
      // Byte offsets of rows j and ref in an fp32 slice tile, packed 16 + 16 bits.
      static_assert(BT * kLdf * 4 <= 0x7fff, "kc_src packs two 16-bit byte offsets");
      kc_src[rr] = (rr - base) * kLdf * 4 + ((ref * kLdf * 4) << 16);
    }
  }
  // Block (bb, aa) of job j of this warp, and where its operands and result live (decoded where
  // used: registers are the scarce resource here, the decode is a few integer instructions).
  struct Job {
    const float* a;  // row operand rows 16bb..
    const float* b;  // column operand rows (column-major B)
    float* c;        // the block in aacc / lacc
  };
  auto job_of = [&](int j) {
    const bool is_l = j >= npairs;
    int pr = is_l ? j - npairs : j;
    int bb = safe ? 0 : 1;
    while (pr >= (safe ? bb + 1 : bb)) {
      pr -= safe ? bb + 1 : bb;
      ++bb;
    }
    const int aa = pr;
    const int base = safe ? 16 * bb * (bb + 1) / 2 : 16 * bb * (bb - 1) / 2;
    return Job{(is_l ? kop : qop) + 16 * bb * kLdf, kc + (base + 16 * aa) * kLdf,
               (is_l ? lacc : aacc) + 16 * bb * LDA + 16 * aa};
  };
  AccFrag<float> acc[D::kMaxJobs];
  // New layout: slot s accumulates in acc[s] (fp32 operands) or accH[s] (16-bit operands), both
  // only in a chunk-32 slot that mixes diagonal and off-diagonal jobs of different precisions.
  AccFrag<T> accH[D::kMaxJobs];
  struct Blk {
    int bb, aa;
    bool is_l;
  };
  auto diag_job = [&](int j) {  // new layout, j < kDiagJobs
    const bool is_l = j >= NC;
    const int bb = is_l ? j - NC : j;
    return Blk{bb, bb, is_l};
  };
  auto off_job = [&](int j) {  // new layout, j >= kDiagJobs
    int pr = j - D::kDiagJobs;
    const bool is_l = pr >= D::kOffPairs;
    if (is_l) pr -= D::kOffPairs;
    int bb = 1;
    while (pr >= bb) {
      pr -= bb;
      ++bb;
    }
    return Blk{bb, pr, is_l};
  };
  if constexpr (!M::kNew) {
#pragma unroll
    for (int s = 0; s < D::kMaxJobs; ++s) wmma::fill_fragment(acc[s], 0.f);
  } else {
#pragma unroll
    for (int s = 0; s < D::kMaxJobs; ++s) {
      const bool has_d = !D::slot_all_off(s), has_o = !D::slot_all_diag(s);
      if (has_d && !M::kDiagH) wmma::fill_fragment(acc[s], 0.f);
      if ((has_d && M::kDiagH) || has_o) wmma::fill_fragment(accH[s], 0.f);
    }
  }
  // Element-wise diagonal entries (no safe_gate): entry s of this thread is pair tid + s * threads
  // of the NC * 136 (i >= j) pairs, summed in registers across the slices. The pairs are decoded
  // once into shared memory, packed as i + 256 * j (read after the first barrier of pass 1):
  // decoded in the slice loop, the compiler hoists the per-thread square roots out of it and,
  // at the register limit, spills them.
  const bool elementwise_diag = !safe && !reuse_akk;
  if (elementwise_diag) {
    for (int pidx = tid; pidx < D::kDiagPairs; pidx += kPrepThreads) {
      const int blk = pidx / 136, t = pidx % 136;
      int ii = static_cast<int>((sqrtf(8.f * t + 1.f) - 1.f) * 0.5f);
      while ((ii + 1) * (ii + 2) / 2 <= t) ++ii;
      while (ii * (ii + 1) / 2 > t) --ii;
      diag_src[pidx] = (16 * blk + ii) + 256 * (16 * blk + t - ii * (ii + 1) / 2);
    }
  }
  auto diag_entry = [&](int s, int& i, int& j) {
    const int pidx = tid + s * kPrepThreads;
    if (pidx >= D::kDiagPairs) return false;
    const int src = diag_src[pidx];
    i = src % 256;
    j = src / 256;
    return true;
  };
  float diag_a[D::kDiagPer], diag_l[D::kDiagPer];
#pragma unroll
  for (int s = 0; s < D::kDiagPer; ++s) diag_a[s] = diag_l[s] = 0.f;

  // The in-kernel gate's per-head factor exp(A_log) once per block.
  const float gate_a = (p.use_gate_in_kernel && p.A_log != nullptr) ? expf(p.A_log[hv]) : 1.f;
  // (Rolled: one slice's registers at a time; with kFixedKV the trip count is a constant.)
#pragma unroll 1
  for (int k0 = 0; k0 < K; k0 += kSlice) {
    const int c = lane;
    const int col = k0 + c;
    const bool col_ok = kWhole || col < K;
    // A. inputs, gate, and the cumsum of the warp's own rows in registers. Rows past L carry
    // gate 0, so their G equals G_last: every exp(G_i - G_r) below with i >= r stays <= 1.
    float Gv[kRows];
    float run = 0.f;
#pragma unroll
    for (int it = 0; it < kRows; ++it) {
      const int i = r0 + it;
      float a = 0.f, e = 0.f, gt = 0.f;
      if (i < L && col_ok) {
        a = p.use_qk_l2norm ? round_to<T>(in.q[it] * rq[i]) : in.q[it];
        e = p.use_qk_l2norm ? round_to<T>(in.k[it] * rk[i]) : in.k[it];
        gt = gate_of(p, in.g[it], in.bias, gate_a);
      }
      run += gt;
      Gv[it] = run;
      qs[i * kLdf + c] = a;
      ks[i * kLdf + c] = e;
    }
    tot[warp * kSlice + c] = run;
    __syncthreads();
    float before = 0.f;  // the column's gate sum over the rows of the warps before this one
    for (int w2 = 0; w2 < warp; ++w2) before += tot[w2 * kSlice + c];
#pragma unroll
    for (int it = 0; it < kRows; ++it) {
      Gv[it] += before;
      gs[(r0 + it) * kLdf + c] = Gv[it];
    }
    if (k0 + kSlice < K) in = load_slice(k0 + kSlice);
    __syncthreads();

    // B. g_cum/qg/kg, and the tensor-core operands of the slice.
    const float glast = gs[(L - 1) * kLdf + c];
    // New layout under safe_gate: the warp's kRows rows lie in one 16-row block, so G of its
    // reference rows is loaded once (gsafe: the median row; g16: the first row, for kOffOwnRef).
    // (Without safe_gate the reference is read per row, as before: hoisted, the general-K bf16
    // build spilled 4 bytes.)
    static_assert(16 % kRows == 0, "a warp's pass-1 rows lie in one 16-row block");
    float gsafe = 0.f, g16 = 0.f;
    if (M::kNew && safe && !reuse_akk) {
      const int blk = r0 / 16;
      gsafe = gs[median_ref_row(blk, L) * kLdf + c];
      if (M::kOffOwnRef) g16 = gs[16 * blk * kLdf + c];
    }
#pragma unroll
    for (int it = 0; it < kRows; ++it) {
      const int i = r0 + it;
      const float G = Gv[it];
      const float a = qs[i * kLdf + c], e = ks[i * kLdf + c];  // this thread's own values
      if (!reuse_akk) {
        if constexpr (!M::kNew) {
          const int ref = safe ? median_ref_row(i / 16, L) : (i & ~15);
          const float x = __expf(G - gs[ref * kLdf + c]);
          qop[i * kLdf + c] = a * x;
          kop[i * kLdf + c] = e * x;
        } else {
          const float gref = safe ? gsafe : gs[(i & ~15) * kLdf + c];
          const float x = __expf(G - gref);
          if constexpr (M::kRowF) {
            qop[i * kLdf + c] = a * x;
            kop[i * kLdf + c] = e * x;
          }
          if constexpr (M::kRowH) {
            qh()[i * kLd16 + c] = from_float<T>(a * x);
            kh()[i * kLd16 + c] = from_float<T>(e * x);
          }
          if constexpr (M::kOffOwnRef) {  // reference row 16 blk: e^{G_i - G_ref} <= 1
            const float x0 = __expf(G - g16);
            qh()[i * kLd16 + c] = from_float<T>(a * x0);
            kh()[i * kLd16 + c] = from_float<T>(e * x0);
          }
          if constexpr (safe) {
            // The diagonal column operand of row i (the same value the old kc pass computed
            // from ks/gs of row i; rows past L hold 0: e = 0 there).
            const float kd = e * __expf(gref - G);
            if constexpr (M::kDiagH) kcdh()[i * kLd16 + c] = from_float<T>(kd);
            else kcdf()[i * kLdf + c] = kd;
          }
        }
      }
      if (i < L && col_ok) {
        const int o = i * hks + col;
        const float eg = __expf(G);
        g_cum[o] = G;
        qg[o] = from_float<T>(a * eg);
        kg[o] = from_float<T>(e * __expf(glast - G));
        // Pass 2's w operand, rounded as the operand tile stores it (bit-identical to computing
        // it there from k and g_cum, which pass 2 then would have to read back).
        w[o] = from_float<T>(beta_s[i] * e * eg);
      }
    }
    if (!reuse_akk) {
      if constexpr (!M::kNew) {
        // Column operands, block row after block row (see above for the reference rows).
        const int kc_rows = 16 * npairs;
        for (int rr = warp; rr < kc_rows; rr += kWarps) {
          const int src = kc_src[rr];
          const int j = src % 256, ref = src / 256;
          kc[rr * kLdf + c] = ks[j * kLdf + c] * __expf(gs[ref * kLdf + c] - gs[j * kLdf + c]);
        }
      } else {
        // The off-diagonal column operands only (e^{G_ref - G_j} <= 1 for j < 16 bb <= ref).
        const unsigned char* kscol = reinterpret_cast<const unsigned char*>(ks + c);
        const unsigned char* gscol = reinterpret_cast<const unsigned char*>(gs + c);
        auto at = [](const unsigned char* base, unsigned off) {
          return *reinterpret_cast<const float*>(base + off);
        };
        for (int rr = warp; rr < 16 * D::kOffPairs; rr += kWarps) {
          const unsigned src = static_cast<unsigned>(kc_src[rr]);
          const unsigned oj = src & 0xffffu, oref = src >> 16;  // byte offsets of rows j, ref
          const float x = at(kscol, oj) * __expf(at(gscol, oref) - at(gscol, oj));
          kch()[rr * kLd16 + c] = from_float<T>(x);
        }
      }
    }
    __syncthreads();
    if (reuse_akk) continue;

    // C. the slice's products.
    if constexpr (!M::kNew) {
#pragma unroll
      for (int s = 0; s < D::kMaxJobs; ++s) {
        if (warp + s * kWarps < njobs) {
          const Job jb = job_of(warp + s * kWarps);
          mma_16x16<float, wmma::row_major, wmma::col_major>(acc[s], jb.a, kLdf, jb.b, kLdf,
                                                             kSlice);
        }
      }
    } else {
      using wmma::col_major;
      using wmma::row_major;
#pragma unroll
      for (int s = 0; s < D::kMaxJobs; ++s) {
        const int j = warp + s * kWarps;
        if (j >= njobs) continue;
        if (D::slot_all_diag(s) || (!D::slot_all_off(s) && j < D::kDiagJobs)) {
          const Blk jb = diag_job(j);
          if constexpr (M::kDiagH) {
            const T* ra = (jb.is_l ? kh() : qh()) + 16 * jb.bb * kLd16;
            const T* cb = kcdh() + 16 * jb.bb * kLd16;
            mma_16x16<T, row_major, col_major>(accH[s], ra, kLd16, cb, kLd16, kSlice);
          } else {
            const float* ra = (jb.is_l ? kop : qop) + 16 * jb.bb * kLdf;
            const float* cb = kcdf() + 16 * jb.bb * kLdf;
            mma_16x16<float, row_major, col_major>(acc[s], ra, kLdf, cb, kLdf, kSlice);
          }
        } else {
          const Blk jb = off_job(j);
          const int crow = 16 * (jb.bb * (jb.bb - 1) / 2 + jb.aa);
          const T* ra = (jb.is_l ? kh() : qh()) + 16 * jb.bb * kLd16;
          mma_16x16<T, row_major, col_major>(accH[s], ra, kLd16, kch() + crow * kLd16, kLd16,
                                             kSlice);
        }
      }
    }
#pragma unroll
    for (int s = 0; s < D::kDiagPer; ++s) {
      int i, j;
      if (!elementwise_diag || !diag_entry(s, i, j)) continue;
      float sa = diag_a[s], sl = diag_l[s];
#pragma unroll 8
      for (int cc = 0; cc < kSlice; ++cc) {
        const float kj = ks[j * kLdf + cc] * __expf(gs[i * kLdf + cc] - gs[j * kLdf + cc]);
        sa += qs[i * kLdf + cc] * kj;
        sl += ks[i * kLdf + cc] * kj;
      }
      diag_a[s] = sa;
      diag_l[s] = sl;
    }
    __syncthreads();  // the next slice overwrites the tiles
  }
  if (!reuse_akk) {
    if constexpr (!M::kNew) {
#pragma unroll
      for (int s = 0; s < D::kMaxJobs; ++s) {
        if (warp + s * kWarps < njobs)
          store_acc_shared<float>(job_of(warp + s * kWarps).c, acc[s], LDA);
      }
    } else {
#pragma unroll
      for (int s = 0; s < D::kMaxJobs; ++s) {
        const int j = warp + s * kWarps;
        if (j >= njobs) continue;
        const bool diag = D::slot_all_diag(s) || (!D::slot_all_off(s) && j < D::kDiagJobs);
        const Blk jb = diag ? diag_job(j) : off_job(j);
        float* cp = (jb.is_l ? lacc : aacc) + 16 * jb.bb * LDA + 16 * jb.aa;
        if (!diag || M::kDiagH) store_acc_shared<T>(cp, accH[s], LDA);
        else store_acc_shared<float>(cp, acc[s], LDA);
      }
    }
#pragma unroll
    for (int s = 0; s < D::kDiagPer; ++s) {
      int i, j;
      if (!elementwise_diag || !diag_entry(s, i, j)) continue;
      aacc[i * LDA + j] = diag_a[s];
      if (j < i) lacc[i * LDA + j] = diag_l[s];
    }
  }
  __syncthreads();

  if (!reuse_akk) {
  // ---- Aqk (stored), Lkk masked and row-scaled by beta --------------------------------------
  T* Aqk = static_cast<T*>(p.Aqk) + ha0;
  T* Akk = static_cast<T*>(p.Akk) + ha0;
  const float scale = p.scale;
  for (int idx = tid; idx < BT * BT; idx += kPrepThreads) {
    const int i = idx / BT, j = idx % BT;
    const bool row_ok = i < L;
    if (row_ok) Aqk[i * has + j] = from_float<T>(j <= i ? scale * aacc[i * LDA + j] : 0.f);
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
    if (i < L) Akk[i * has + j] = x;
  }
  __syncthreads();
  }  // !reuse_akk

  // ---- pass 2: w = Akk_r (beta * k-hat * exp(G)), u = Akk_r (beta * v) ---------------------
  // One loop over 32-column slices of K and V together (two operand tiles, 4*NC products per
  // slice); the operand tiles are double-buffered and the next slice's loads are in flight
  // during this slice's products. The w operand comes from w itself (pass 1 stored it there):
  // one 2-byte load per element instead of k and the fp32 g_cum, and no exp or l2norm rounding
  // here. Two variants (PrepDims::kPass2Mma): 16-bit chunk 64 keeps the products' results in
  // mma.sync accumulators and stores them from there (one barrier a slice; its hazards are
  // argued below); the others go through double-buffered fp32 result tiles (wmma's fragments
  // are opaque), two barriers a slice, and there a thread reads slice s + 1 of w before it
  // writes slice s, and each element is read and then written by the same thread.
  {
    constexpr int kIt2 = BT * kSlice / kPrepThreads;
    const int nslices = ((K > V ? K : V) + kSlice - 1) / kSlice;
    struct SliceWU {
      T kb[kIt2];  // the w operand pass 1 left in w, as stored
      float v[kIt2];
    };
    auto load_wu = [&](int s) {  // branch-free, as load_slice
      SliceWU r;
      const int col = s * kSlice + lane;
      int hk_o[kIt2], hv_o[kIt2];
      bool okk[kIt2], okv[kIt2];
#pragma unroll
      for (int it = 0; it < kIt2; ++it) {
        const int i = warp + it * kWarps;
        okk[it] = i < L && (kWhole || col < K);
        okv[it] = i < L && (kWhole || col < V);
        hk_o[it] = okk[it] ? i * hks + col : 0;
        hv_o[it] = okv[it] ? i * hvs + col : 0;
      }
      T rawv[kIt2];
#pragma unroll
      for (int it = 0; it < kIt2; ++it) {
        r.kb[it] = w[hk_o[it]];
        rawv[it] = v[hv_o[it]];
      }
#pragma unroll
      for (int it = 0; it < kIt2; ++it) {
        r.kb[it] = okk[it] ? r.kb[it] : from_float<T>(0.f);
        r.v[it] = okv[it] ? to_float<T>(rawv[it]) : 0.f;
      }
      return r;
    };
    SliceWU in2;
    if constexpr (kWhole) in2 = load_wu(0);
    if (reuse_akk) {
      // Akk rows of the chunk as the forward stored them (the same rounded values the forward
      // put in `akk` above, so w and u come out bit-identical); rows past the chunk are never
      // stored. Loaded after slice 0's w/v loads above, so that both are in flight together
      // (before, the w/v loads went out only after the Akk tile had landed and been stored: two
      // round trips). Branch-free, as load_slice; 16-byte loads and stores where the saved Akk
      // is 16-byte aligned (its row stride HV * BT and the chunk base are multiples of 8
      // elements), 8 (16-bit) elements a load instead of one. The mma.sync pass 2 skips Akk's
      // blocks above the diagonal; entries above the diagonal are zeroed here as the forward
      // zeroes them in its own tile, so that skip is exact whatever the saved upper triangle
      // holds (the forward stores zeros there: a no-op for its Akk).
      const T* saved = static_cast<const T*>(p.Akk_saved) + ha0;
      constexpr int kVec = 16 / static_cast<int>(sizeof(T));
      constexpr int kPerV = BT * BT / kVec / kPrepThreads;  // 16-byte vectors per thread
      constexpr bool kVecOk = kWhole && (BT * BT / kVec) % kPrepThreads == 0 && kPerV > 0 &&
                              (LDK * sizeof(T)) % 16 == 0 && BT % kVec == 0;
      if (kVecOk && aligned16(saved)) {
        uint4 raw[kPerV > 0 ? kPerV : 1];
#pragma unroll
        for (int it = 0; it < kPerV; ++it) {
          const int idx = tid + it * kPrepThreads, i = idx / (BT / kVec);
          const int j0 = (idx % (BT / kVec)) * kVec;
          raw[it] = *reinterpret_cast<const uint4*>(saved + (i < L ? i * has + j0 : 0));
        }
#pragma unroll
        for (int it = 0; it < kPerV; ++it) {
          const int idx = tid + it * kPrepThreads, i = idx / (BT / kVec);
          const int j0 = (idx % (BT / kVec)) * kVec;
          T* e = reinterpret_cast<T*>(&raw[it]);
#pragma unroll
          for (int x = 0; x < kVec; ++x) {
            const int j = j0 + x;
            e[x] = (i < L && (!D::kPass2Mma || j <= i)) ? e[x] : from_float<T>(0.f);
          }
          *reinterpret_cast<uint4*>(akk + i * LDK + j0) = raw[it];
        }
      } else {
        constexpr int kPer = BT * BT / kPrepThreads;
        T raw[kPer];
#pragma unroll
        for (int it = 0; it < kPer; ++it) {
          const int idx = tid + it * kPrepThreads, i = idx / BT, j = idx % BT;
          raw[it] = saved[i < L ? i * has + j : 0];
        }
#pragma unroll
        for (int it = 0; it < kPer; ++it) {
          const int idx = tid + it * kPrepThreads, i = idx / BT, j = idx % BT;
          akk[i * LDK + j] = (i < L && (!D::kPass2Mma || j <= i)) ? raw[it] : from_float<T>(0.f);
        }
      }
      __syncthreads();
    }
    if constexpr (!kWhole) in2 = load_wu(0);
    // Slice s's operand tiles: buffer s & 1 (selects, not lay.x[s & 1]: a run-time index into the
    // layout would put it in local memory). stage_slice writes in2 (slice s's operands; rows and
    // columns outside the chunk hold 0) into them, starts slice s + 1's loads and waits at the
    // slice's barrier; both pass-2 variants below begin each slice with it.
    auto operand_tiles = [&](int s, T*& kbw, T*& kbu) {
      const bool odd = (s & 1) != 0;
      kbw = reinterpret_cast<T*>(smem + (odd ? lay.kbw[1] : lay.kbw[0]));
      kbu = reinterpret_cast<T*>(smem + (odd ? lay.kbu[1] : lay.kbu[0]));
    };
    auto stage_slice = [&](int s, T* kbw, T* kbu) {
#pragma unroll
      for (int it = 0; it < kIt2; ++it) {
        const int i = warp + it * kWarps, c = lane;
        kbw[i * LDB + c] = in2.kb[it];
        kbu[i * LDB + c] = from_float<T>(beta_s[i] * in2.v[it]);
      }
      if (s + 1 < nslices) in2 = load_wu(s + 1);
      __syncthreads();
    };
    if constexpr (D::kPass2Mma) {
      // 16-bit chunk 64 on mma.sync m16n8k16 (fp32 accumulators, the operands as wmma read them:
      // akk and the T-rounded tiles kbw/kbu; only the summation order differs).
      // Warps 0-3 compute w, warps 4-7 u; a warp owns one 16-row block mi of its result and all
      // 32 columns of the slice (four m16n8 tiles). Akk is lower triangular (zeros above the
      // diagonal, stored so by both paths above), so block row mi needs the k-blocks kk <= mi
      // only: mi + 1 k-steps of four MMAs (the skipped ones add exact zeros; only a non-finite
      // operand row, which wmma's 0 * inf would have turned into NaN in rows that do not depend
      // on it, comes out differently). The u warps take the row blocks in reverse order:
      // warps w and w + 4 share an SM sub-partition (warp % 4) and its tensor core, so every
      // sub-partition gets 5 k-steps a slice (w block w, u block 3 - w), where mi = warp % 4
      // would give sub-partition 3 eight and sub-partition 0 two.
      static_assert(NC == 4 && kWarps == 8, "pass 2 mma.sync: 4 row blocks each of w and u");
      const bool is_u = warp >= NC;
      const int mi = is_u ? kWarps - 1 - warp : warp;
      const int g = lane / 4, t4 = lane % 4;  // the C fragment's row / column pair in its tile
      // The warp's A fragments of Akk (rows 16 mi.., k-blocks kk <= mi) are the same for every
      // slice: loaded once (akk is complete after the barrier above, in both paths, and pass 2
      // does not write it). Unrolled with constant indices so they stay in registers.
      uint32_t afrag[NC][4];
#pragma unroll
      for (int kk = 0; kk < NC; ++kk) {
        if (kk <= mi)
          ldmatrix_x4(afrag[kk], akk + (16 * mi + lane % 16) * LDK + 16 * kk + 8 * (lane / 16));
      }
      T* out = is_u ? u : w;
      const int out_ld = is_u ? hvs : hks;
      const int ncols = is_u ? V : K;
      // 4-byte pair stores: the pair's first column is even, so its address is 4-byte aligned
      // when the row stride and the chunk base are even element counts, i.e. when K (w) or V (u)
      // is even (w and u are allocated by the extension, with aligned bases).
      const bool pair_ok = kWhole || (ncols % 2) == 0;
      // Hazards with one barrier per slice (slice s stages into buffer s & 1, then the barrier
      // B_s, then the reads of that buffer and the global stores of slice s):
      // - buffer reuse: slice s + 1 writes buffer (s + 1) & 1, which slice s - 1's ldmatrix read.
      //   Every warp does those reads before it arrives at B_s, and a thread writes slice s + 1's
      //   tile only after B_s, so all of slice s - 1's reads of that buffer are done. (Slice s
      //   reads the other buffer; slice s + 2 writes buffer s & 1 only after B_{s+1}.)
      // - w, read as the operand and written as the result: load_wu(s) (issued in iteration
      //   s - 1, or before the loop) lands in registers that the thread stores into the tile
      //   before it arrives at B_s; the results of slice s go to global memory after B_s. So
      //   every read of slice s's w operand precedes every write of slice s's w, even though
      //   the thread that writes an element (C fragment layout) is not the one that read it.
      //   The other reads and writes of w in this loop are of other slices: disjoint columns.
      // - the result tiles and the second barrier are gone: accumulators go straight to global.
      // (Rolled as in pass 1.)
#pragma unroll 1
      for (int s = 0; s < nslices; ++s) {
        T *kbw, *kbu;
        operand_tiles(s, kbw, kbu);
        stage_slice(s, kbw, kbu);
        const int c0 = s * kSlice;
        if (!kWhole && c0 >= ncols) continue;  // warp-uniform (K == V: every slice is in both)
        const T* kb = is_u ? kbu : kbw;
        float acc[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < NC; ++kk) {
          if (kk > mi) continue;  // Akk block (mi, kk) is zero
          // B of k-block kk: one ldmatrix.trans per two n-tiles (columns +0..15, +16..31).
          const T* brow =
              kb + (16 * kk + 8 * ((lane / 8) % 2) + lane % 8) * LDB + 8 * (lane / 16);
          uint32_t b01[4], b23[4];
          ldmatrix_x4_trans(b01, brow);
          ldmatrix_x4_trans(b23, brow + 16);
          mma_16x8x16<T>(acc[0], afrag[kk], b01[0], b01[1]);
          mma_16x8x16<T>(acc[1], afrag[kk], b01[2], b01[3]);
          mma_16x8x16<T>(acc[2], afrag[kk], b23[0], b23[1]);
          mma_16x8x16<T>(acc[3], afrag[kk], b23[2], b23[3]);
        }
        // Row 16 mi + g (+ 8), columns c0 + 8 j + 2 t4 (+ 1) of w or u. (One pointer per row:
        // the four n-tiles' stores then differ by constant offsets.)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int i = 16 * mi + g + 8 * hf;
          if (i >= L) continue;
          T* orow = out + (i * out_ld + c0 + 2 * t4);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int col = c0 + 8 * j + 2 * t4;
            const float x = acc[j][2 * hf], y = acc[j][2 * hf + 1];
            T* dst = orow + 8 * j;
            if (pair_ok && (kWhole || col < ncols)) {
              *reinterpret_cast<uint32_t*>(dst) = pack2<T>(x, y);
            } else {
              if (col < ncols) dst[0] = from_float<T>(x);
              if (col + 1 < ncols) dst[1] = from_float<T>(y);
            }
          }
        }
      }
    } else {
      // (Rolled as in pass 1; unrolled by 2 the buffer selects below would fold, at twice the
      // code.)
#pragma unroll 1
      for (int s = 0; s < nslices; ++s) {
        T *kbw, *kbu;
        operand_tiles(s, kbw, kbu);
        const bool odd = (s & 1) != 0;
        float* stw = reinterpret_cast<float*>(smem + (odd ? lay.stw[1] : lay.stw[0]));
        float* stu = reinterpret_cast<float*>(smem + (odd ? lay.stu[1] : lay.stu[0]));
        const int c0 = s * kSlice;
        stage_slice(s, kbw, kbu);
        for (int job = warp; job < 4 * NC; job += kWarps) {
          const bool is_u = job >= 2 * NC;
          if (!kWhole && c0 >= (is_u ? V : K)) continue;  // (K == V: every slice is in both)
          const int jj = is_u ? job - 2 * NC : job;
          const int mi = jj / 2, ni = jj % 2;
          AccFrag<T> acc2;
          wmma::fill_fragment(acc2, 0.f);
          mma_16x16<T, wmma::row_major, wmma::row_major>(acc2, akk + 16 * mi * LDK, LDK,
                                                         (is_u ? kbu : kbw) + 16 * ni, LDB, BT);
          store_acc_shared<T>((is_u ? stu : stw) + 16 * mi * kLdf + 16 * ni, acc2, kLdf);
        }
        __syncthreads();
#pragma unroll
        for (int it = 0; it < kIt2; ++it) {
          const int i = warp + it * kWarps, c = lane;
          const int col = c0 + c;
          if (i < L && (kWhole || col < K)) w[i * hks + col] = from_float<T>(stw[i * kLdf + c]);
          if (i < L && (kWhole || col < V)) u[i * hvs + col] = from_float<T>(stu[i * kLdf + c]);
        }
      }
    }
  }
}

}  // namespace cuda
}  // namespace kda_ext

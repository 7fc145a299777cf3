// kda_ext CUDA, Hopper path: the fused forward (issue 17). One persistent CTA (or a 2-CTA cluster,
// FusedFwdConfig's kCluster) per (sequence, value head) runs the whole chunked pipeline for that
// sequence with nothing but q, k, v, g, beta read and o (and the final state) written: no
// intermediate reaches HBM.
//
// Why a chunk of 16 inside the kernel: the intra-chunk work (gate, cumsum, l2norm, the decayed
// operands, Aqk, L, (I + L)^-1, w, u) of a 64-row chunk is 10 block pairs of 16 x 16 products, a
// 64 x 64 inverse and several operand versions per element (chunk_prepare_lean.cuh, ~18 us of an
// SM per chunk at the main shape). With 16 rows it is one block: one median-row reference under
// safe_gate's bounded gate (every factor within e^{+-40} for lower_bound >= -5), a 16 x 16 forward
// substitution, two operand versions fewer per element. The state then advances every 16 rows
// instead of 64 (four times the steps of the same total tensor work). The numerics of the scheme
// against the fp64 reference are those of the landed chunk-64 kernels to a few percent
// (scripts/dev/fused16_numerics.py: o 3.7e-3 vs 3.6e-3 at the suite's 5e-3 bar).
//
// Three or four warpgroups, warp-specialized, joined by a shared-memory ring
// (cutlass::PipelineAsync, one full/empty mbarrier pair a stage):
// - kProducers (1 or 2) intra-chunk producer warpgroups; with two, warpgroup j takes chunks
//   j, j + 2, ... with its own buffers and pipeline. Thread t owns key column t of every row. A
//   producer streams the raw q, k, v, g rows of its next chunk with cp.async into a two-deep
//   private buffer while it works on this one; computes the gate and its cumsum down its column in
//   registers, the l2norm row norms (four threads a row), beta; the decayed operands; Aqk and L
//   on mma.sync (one 16 x 8 tile per warp), (I + L)^-1 by forward substitution (16 threads, one
//   column each), and w = Akk (beta k e^G), u = Akk (beta v) on mma.sync; and writes w, qg, kg,
//   Aqk, u and the chunk's decay e^{G_last} into its ring stage in the layouts the consumers'
//   wgmma reads.
// - the last two warpgroups (one in the cluster variant, a value half each CTA), the consumers:
//   value columns 0..63 and 64..127. Each holds its slice of the
//   transposed state S^T [64 v][128 k] in fp32 wgmma accumulators for the whole sequence and runs,
//   per chunk, the four products of state_output_sm90.cuh with N = 16 chunk rows:
//     v_new^T = u^T - Sh^T w^T,  o^T = Sh^T qg^T + v_new^T Aqk^T (qg and Aqk carry the scale),
//     S^T = e^{G_last} S^T + v_new^T kg.
// Rows past the sequence's end (the last chunk) are zero-filled by the loads and masked out of
// v_new, so they reach neither S nor a stored o row.
// Applies to (fused_fwd_sm90_applies): bf16 (fp16's range is too narrow for the median-row
// factors), K = V = 128, every gate mode (FusedFwdConfig's kBoundedGate: the lower-bound gate with
// lower_bound in [-5, 0) needs no range check; other gates check each chunk and compute the
// out-of-range ones exactly), no intermediates wanted. Everything else keeps the two-kernel path.
#pragma once

#include "cuda/elementwise.cuh"  // gate_as, beta_of, exp_ftz
#include "cuda/mma.cuh"
#include "cuda/mma_sync.cuh"
#include "cuda/section_clock.cuh"
#include "cuda/sm90/state_output_sm90.cuh"

namespace kda_ext {
namespace cuda {
namespace sm90 {

// kProducers intra-chunk warpgroups (1 or 2: chunks by parity, each with its own buffers and
// its own kStagesPer-deep pipeline, which the consumers take in turn). kBoundedGate: the gate is
// the in-kernel lower-bound one with lower_bound in [-5, 0), so every chunk's cumulative gate lies
// in [-80, 0] and the median-row products always apply; otherwise (softplus gate, a given g,
// lower bounds below -5) each chunk checks its gate's range and takes an exact path where the
// median-row factors could leave fp32/bf16's range (a -1000 gate entry, say).
//
// kCluster: a 2-CTA cluster per (sequence, value head) instead of one CTA. Each CTA keeps one value
// half (one consumer warpgroup) and runs two producer warpgroups; the cluster's four producers take
// the chunks in turn (chunk c from producer c % 4 = 2 rank + j), each writing its ring stage in its
// own CTA and copying it to the peer's (one DSMEM bulk copy per tile, completing on the peer's full
// barrier). The producers' work per head spreads over two SMs, and twice the CTAs fill the GPU
// when sequences x heads are few (64 of 132 SMs at (2, 8192, 32, 128) without it).
template <int kProducers_ = 1, bool kBoundedGate_ = true, bool kCluster_ = false>
struct FusedFwdConfig {
  using T = __nv_bfloat16;
  using Elt = cutlass::bfloat16_t;
  static constexpr int kProducers = kProducers_;
  static constexpr bool kBoundedGate = kBoundedGate_;
  static constexpr bool kCluster = kCluster_;
  static constexpr int kClusterSize = kCluster ? 2 : 1;
  static constexpr int kConsumers = kCluster ? 1 : 2;          // value halves a CTA holds
  static constexpr int kRingProducers = kProducers * kClusterSize;  // producers taking turns
  // A chunk takes the median-row products when its cumulative gate lies within +-kGateSpan in
  // every column: every factor e^{G_i - G_m}, e^{-G_i} is then a normal fp32/bf16 number
  // (e^{-80} = 1.8e-35 > 2^-126) and products of a factor and its inverse stay finite.
  static constexpr float kGateSpan = 80.f;
  // The exact path's pair sums: Aqk's 136 pairs i >= j, then L's 120 pairs i > j.
  static constexpr int kAqkPairs = 16 * 17 / 2, kLPairs = 16 * 15 / 2, kPairs = kAqkPairs + kLPairs;
  static_assert(kProducers == 1 || kProducers == 2, "one or two producer warpgroups");
  static_assert(!kCluster || kProducers == 2, "the cluster variant runs two producers a CTA");
  // ring stages of one producer (in the cluster variant each of the four producers has one: its
  // next chunk's front half, raw rows to l2norm, runs while the consumers finish the stage)
  static constexpr int kStagesPer = kCluster ? 1 : (kProducers == 1 ? 3 : 2);
  static constexpr int kStages = kRingProducers * kStagesPer;  // the whole ring
  static constexpr int kC = 16;    // chunk rows
  static constexpr int kK = 128;   // K == V
  static constexpr int kBV = 64;   // value columns per consumer warpgroup
  static constexpr int kThreads = 128 * (kProducers + kConsumers);
  // The producer's operand tiles are stored transposed, [key column][chunk row]: a thread owns one
  // key column, so its 16 rows are two 16-byte stores (instead of 16 two-byte ones); rows of 48 B
  // keep both the stores and the ldmatrix reads of 8 rows conflict-free.
  static constexpr int kLdT = kC + 8;
  static constexpr int kLdAkk = kC + 8;  // [16][16] Akk tile: 48 B rows (16-byte aligned, conflict-free)
  static constexpr int kLdL = kC + 4;    // fp32 [16][16] L tile: rows of 4 float4
  static constexpr int kLdO = 16 + 8;    // o staging of one consumer warp: [16 rows][16 v], 48 B rows
  static constexpr int kGBytes = 4;      // raw g is staged at up to 4 bytes an element

  // v_new^T = Sh^T w^T: M = v (64), N = chunk rows (16), K = k (128); w is [row][k] (K-major B, as
  // the w/u products' fragments store it).
  using MmaVn = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elt, Elt, float, Shape<_64, _16, _128>, GMMA::Major::K, GMMA::Major::K>()));
  // o^T = Sh^T qg^T: qg is [k][row] (MN-major B), the producer thread of key column k writing its
  // 16 rows as two 16-byte stores.
  using MmaQ = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elt, Elt, float, Shape<_64, _16, _128>, GMMA::Major::K, GMMA::Major::MN>()));
  // o^T += v_new^T Aqk^T: K = chunk rows (16).
  using MmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elt, Elt, float, Shape<_64, _16, _16>, GMMA::Major::K, GMMA::Major::K>()));
  // S^T += v_new^T kg: N = k (128), K = chunk rows (16); kg is [k][row] (K-major B), written like qg.
  using MmaS = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elt, Elt, float, Shape<_64, _128, _16>, GMMA::Major::K, GMMA::Major::K>()));

  // Ring stages (the last mode). B operands as (N, K).
  using LayoutWs = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elt>{}, Shape<_16, _128, Int<kStages>>{}));
  using LayoutQgs = decltype(tile_to_shape(GMMA::Layout_MN_SW32_Atom<Elt>{}, Shape<_16, _128, Int<kStages>>{}));
  using LayoutAqks = decltype(tile_to_shape(GMMA::Layout_K_SW32_Atom<Elt>{}, Shape<_16, _16, Int<kStages>>{}));
  using LayoutKgs = decltype(tile_to_shape(GMMA::Layout_K_SW32_Atom<Elt>{}, Shape<_128, _16, Int<kStages>>{}));
  using LayoutUs = Layout<Shape<_16, _128, Int<kStages>>, Stride<_128, _1, _2048>>;  // [row][v]

  using Pipeline = cutlass::PipelineAsync<kStagesPer>;

  // One producer warpgroup's own: raw rows of two chunks, then a chunk's operands and small
  // matrices.
  struct ProducerStorage {
    alignas(128) T raw_q[2][kC * kK];
    alignas(128) T raw_k[2][kC * kK];
    alignas(128) T raw_v[2][kC * kK];
    alignas(128) unsigned char raw_g[2][kC * kK * kGBytes];
    // [key column][row], rows of kLdT. beta stays out of the operands: L's rows and Akk's columns
    // take it, and u's B operand is the raw v rows.
    alignas(128) T qm[kK * kLdT];   // q-hat e^{G - G_m}  (Aqk's A operand)
    alignas(128) T km[kK * kLdT];   // k-hat e^{G_m - G}  (Aqk's and L's B operand)
    alignas(128) T kmm[kK * kLdT];  // k-hat e^{G - G_m}  (L's A operand; L = diag(beta) kmm km^T)
    alignas(128) T ke[kK * kLdT];   // k-hat e^{G}        (w's B operand; w = Akk diag(beta) ke)
    alignas(128) T akk[kC * kLdAkk];
    alignas(16) float lkk[kC * kLdL];
    int range_ok[4];      // per warp: the chunk's gate within kGateSpan in all its columns
    float rstd[2 * kC];   // q rows, then k rows
    float beta[kC];
  };
  static_assert(4 * kPairs * sizeof(float) <= sizeof(ProducerStorage::qm),
                "the exact path's pair sums of four warps live in qm's space");

  struct SharedStorage {
    // the ring
    alignas(1024) cute::array_aligned<Elt, cosize_v<LayoutWs>> w;
    alignas(1024) cute::array_aligned<Elt, cosize_v<LayoutQgs>> qg;
    alignas(1024) cute::array_aligned<Elt, cosize_v<LayoutKgs>> kg;
    alignas(1024) cute::array_aligned<Elt, cosize_v<LayoutAqks>> aqk;
    alignas(128) cute::array_aligned<Elt, cosize_v<LayoutUs>> u;
    alignas(128) float decay[kStages][kK];  // e^{G_last} per key column
    ProducerStorage prod[kProducers];
    // consumers: o of one chunk as [row][v], per warpgroup
    alignas(128) T o_stage[kConsumers][4][kC * kLdO];
    typename Pipeline::SharedStorage pipeline[kProducers];  // producer j fills ring stages j * kStagesPer ..
    // the cluster variant's ring barriers, one pair a stage: full (one arrival: the local producer's,
    // or the peer producer's with the bytes of its copies) and empty (one arrival from each CTA's
    // consumer; only the producing CTA's is used)
    alignas(8) uint64_t cluster_full[kStages];
    alignas(8) uint64_t cluster_empty[kStages];
  };
  // The bytes of one ring stage the cluster variant copies to the peer.
  static constexpr uint32_t kStageBytes = 4 * (kC * kK * 2) + kC * kC * 2 + kK * 4;
};

// A producer thread's share of the raw-row copies of every chunk: the row, column and source
// offsets that do not change from chunk to chunk, computed once per sequence (per chunk, the
// 64-bit index arithmetic and the run-time division of the g loop cost ~35 instructions a
// 16-byte copy; now a chunk adds its first row's offset and the thread its fixed ones).
struct RawCopyPlan {
  int qk_row, col;    // rows qk_row and qk_row + 8 of q, k, v; element column col
  int g_row, g_byte;  // g: the thread's first row and its byte in the row (further rows below)
};

// g rows of 256 (16-bit) or 512 (fp32) bytes: 16 or 32 vectors of 16 bytes, 2 or 4 a thread.
__device__ __forceinline__ int g_vectors_per_row(const ChunkKdaFwdParams& p, int kK) {
  return p.g_dtype == DType::kFloat32 ? kK / 4 : kK / 8;
}

__device__ __forceinline__ RawCopyPlan raw_copy_plan(const ChunkKdaFwdParams& p, int tid, int kK) {
  const int vec_per_row = g_vectors_per_row(p, kK);
  return RawCopyPlan{tid / 16, (tid % 16) * 8, tid / vec_per_row, (tid % vec_per_row) * 16};
}

// Raw rows of one chunk into the producer's buffer (cp.async, 16 bytes a copy, zero past L). The
// strides come from the parameters (uniform values), the thread's offsets from its plan.
template <class Cfg>
__device__ __forceinline__ void issue_raw_chunk(const ChunkKdaFwdParams& p, const RawCopyPlan& c,
                                                typename Cfg::ProducerStorage& ps, int buf, int64_t row0, int L,
                                                int hq, int hv) {
  using T = typename Cfg::T;
  constexpr int kK = Cfg::kK;
  const int qk_stride = static_cast<int>(p.H) * kK, v_stride = static_cast<int>(p.HV) * kK;
  const T* q = static_cast<const T*>(p.q) + (row0 * p.H + hq) * kK + c.col;
  const T* k = static_cast<const T*>(p.k) + (row0 * p.H + hq) * kK + c.col;
  const T* v = static_cast<const T*>(p.v) + (row0 * p.HV + hv) * kK + c.col;
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int r = c.qk_row + 8 * it;
    const bool ok = r < L;
    const int rs = ok ? r : 0;  // rows past L copy nothing (zero fill) from a valid address
    const int dst = r * kK + c.col;
    cp_async16(ps.raw_q[buf] + dst, q + rs * qk_stride, ok);
    cp_async16(ps.raw_k[buf] + dst, k + rs * qk_stride, ok);
    cp_async16(ps.raw_v[buf] + dst, v + rs * v_stride, ok);
  }
  const int vec_per_row = g_vectors_per_row(p, kK);
  const int row_bytes = 16 * vec_per_row, stride_bytes = static_cast<int>(p.HV) * row_bytes;
  const unsigned char* g = static_cast<const unsigned char*>(p.g) + (row0 * p.HV + hv) * row_bytes + c.g_byte;
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    if (it < vec_per_row / 8) {
      const int r = c.g_row + (128 / vec_per_row) * it;
      const bool ok = r < L;
      cp_async16(ps.raw_g[buf] + r * row_bytes + c.g_byte, g + (ok ? r : 0) * stride_bytes, ok);
    }
  }
}

// One tile of this CTA's ring stage into the same place of the peer CTA's shared memory (a DSMEM
// bulk copy through the async proxy), completing its bytes on the peer's full barrier.
__device__ __forceinline__ void copy_tile_to_peer(const void* tile, uint32_t bytes, const uint64_t* full_barrier,
                                                  uint32_t peer) {
  const uint32_t src = cute::cast_smem_ptr_to_uint(tile);
  const uint32_t bar = cute::cast_smem_ptr_to_uint(full_barrier);
  asm volatile(
      "{\n\t.reg .b32 dst, rbar;\n\t"
      "mapa.shared::cluster.u32 dst, %0, %2;\n\t"
      "mapa.shared::cluster.u32 rbar, %1, %2;\n\t"
      "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [dst], [%0], %3, [rbar];\n\t}"
      :
      : "r"(src), "r"(bar), "r"(peer), "r"(bytes)
      : "memory");
}

// part[i] summed over the warp's lanes for i = lane, left in part[0]: at each step a lane keeps the
// half of its values whose index has its lane bit and sends the other half to its partner
// (31 shuffles instead of 32 x 5 for a butterfly of every value). Recursive so that every index is
// a compile-time constant (a loop bound depending on the step left the array in local memory).
// Started at O < 16 (2 O values), the sums run over the lanes that share lane bits above O.
template <int O, int N>
__device__ __forceinline__ void warp_reduce_scatter(float (&part)[N], int lane) {
  static_assert(N >= 2 * O, "2 O values at least");
  const bool upper = (lane & O) != 0;
#pragma unroll
  for (int i = 0; i < O; ++i) {
    const float send = upper ? part[i] : part[i + O];
    const float keep = upper ? part[i + O] : part[i];
    part[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
  }
  if constexpr (O > 1) warp_reduce_scatter<O / 2>(part, lane);
}

// The exact path's per-warp pair sums of one chunk (thread = key column): Aqk's pairs i >= j
// (q_i k_j e^{G_i - G_j}), then L's pairs i > j (k_i k_j e^{G_i - G_j}; beta_i comes after the
// sum), row-major lower triangles, 256 values summed over the warp's 32 columns in groups of 16
// (a reduce-scatter over lane bits 3..0, then lanes l and l ^ 16 added), lane l < 16 storing value
// 16 n + l of each. Every index is a compile-time constant once the loops are unrolled (the
// running count included), so the arrays stay in registers.
template <class Cfg>
__device__ __forceinline__ void exact_pair_sums(const float (&G)[16], const float (&qv)[16], const float (&kv)[16],
                                                float* warp_sums, int lane) {
  static_assert(Cfg::kPairs % 16 == 0, "whole groups of 16");
  float buf[16];
  int count = 0;
  auto push = [&](float x) {
    buf[count % 16] = x;
    if (count % 16 == 15) {
      warp_reduce_scatter<8>(buf, lane);
      const float sum = buf[0] + __shfl_xor_sync(0xffffffffu, buf[0], 16);
      if (lane < 16) warp_sums[count - 15 + lane] = sum;
    }
    ++count;
  };
#pragma unroll
  for (int i = 0; i < 16; ++i)
#pragma unroll
    for (int j = 0; j <= i; ++j) push(qv[i] * kv[j] * exp_ftz(G[i] - G[j]));
#pragma unroll
  for (int i = 1; i < 16; ++i)
#pragma unroll
    for (int j = 0; j < i; ++j) push(kv[i] * kv[j] * exp_ftz(G[i] - G[j]));
}

// Element index of ring coordinate (a, b, c) for plain shared-array access. GMMA's swizzled atoms
// (ComposedLayout<Swizzle, smem_ptr_flag, Layout>) swizzle the byte address, which equals the byte
// offset on a 1024-byte aligned array; checked against CuTe's own tensor addressing for the three
// ring layouts on the host (session 15).
template <class L, class T>
__device__ __forceinline__ int ring_index(int a, int b, int c) {
  const L layout{};
  if constexpr (cute::is_composed_layout<L>::value) {
    return layout.layout_a()(layout.layout_b()(a, b, c) * int(sizeof(T))) / int(sizeof(T));
  } else {
    return layout(a, b, c);
  }
}

// Column tid's cumulative gate over the chunk's rows (G[i] = the sum of rows 0..i, rows >= L adding
// nothing) from the raw g rows in shared memory. One branch-free 16-row loop per (gate form, g
// dtype), chosen once: with the choice made per element (raw_g_at / gate_of), the rows ran one
// after the other as ~150-cycle dependent chains (session 15's SASS).
template <GateKind kKind, class GT>
__device__ __forceinline__ void column_gates_as(const unsigned char* raw, int tid, int L, float bias, float a,
                                                float lower_bound, float (&G)[16]) {
  const GT* g = reinterpret_cast<const GT*>(raw);
  float run = 0.f;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const float gate = gate_as<kKind>(to_float<GT>(g[i * 128 + tid]), bias, a, lower_bound);
    run += i < L ? gate : 0.f;
    G[i] = run;
  }
}

template <GateKind kKind>
__device__ __forceinline__ void column_gates_of(const unsigned char* raw, DType g_dtype, int tid, int L, float bias,
                                                float a, float lower_bound, float (&G)[16]) {
  if (g_dtype == DType::kFloat32) column_gates_as<kKind, float>(raw, tid, L, bias, a, lower_bound, G);
  else if (g_dtype == DType::kBFloat16) column_gates_as<kKind, __nv_bfloat16>(raw, tid, L, bias, a, lower_bound, G);
  else column_gates_as<kKind, __half>(raw, tid, L, bias, a, lower_bound, G);
}

template <class Cfg>
__device__ __forceinline__ void column_gates(const unsigned char* raw, DType g_dtype, GateKind kind, int tid, int L,
                                             float bias, float a, float lower_bound, float (&G)[16]) {
  if constexpr (Cfg::kBoundedGate) {
    column_gates_of<GateKind::kLowerBound>(raw, g_dtype, tid, L, bias, a, lower_bound, G);
  } else {
    if (kind == GateKind::kGiven) column_gates_of<GateKind::kGiven>(raw, g_dtype, tid, L, bias, a, lower_bound, G);
    else if (kind == GateKind::kLowerBound)
      column_gates_of<GateKind::kLowerBound>(raw, g_dtype, tid, L, bias, a, lower_bound, G);
    else column_gates_of<GateKind::kSoftplus>(raw, g_dtype, tid, L, bias, a, lower_bound, G);
  }
}

// o^T [64 v][16 rows] to global, each warp its own 16 value columns: its 8 values a thread as
// [row][v] in the warp's staging tile, then rows < L as 16-byte vectors (16 rows x 2: one a lane).
// Warp-local, so no warpgroup barrier (two of them a chunk cost ~600 cycles of the consumer's
// ~2,550 in session 16's section profile).
template <class Cfg, class Acc>
__device__ __forceinline__ void store_o_rows(const Acc& acc, typename Cfg::T* warp_stage, const AccCoord& ac,
                                             int lane, typename Cfg::T* dst, int64_t row_stride, int L) {
  using T = typename Cfg::T;
  constexpr int kLd = Cfg::kLdO;
  __syncwarp();  // the previous chunk's reads of the tile are done
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int m = lane / 4 + 8 * ((i / 2) % 2), j = ac.n0 + 8 * (i / 4) + i % 2;
    warp_stage[j * kLd + m] = from_float<T>(acc(i));
  }
  __syncwarp();
  const int j = lane / 2, c = (lane % 2) * 8;
  if (j < L) *reinterpret_cast<uint4*>(dst + j * row_stride + c) = *reinterpret_cast<const uint4*>(warp_stage + j * kLd + c);
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) fused_fwd_sm90_kernel(const __grid_constant__ ChunkKdaFwdParams p) {
  using T = typename Cfg::T;
  using Elt = typename Cfg::Elt;
  using Pipeline = typename Cfg::Pipeline;
  using Storage = typename Cfg::SharedStorage;
  constexpr int kC = Cfg::kC, kK = Cfg::kK, kBV = Cfg::kBV, kLdT = Cfg::kLdT;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  Storage& st = *reinterpret_cast<Storage*>(smem_raw);
  constexpr int kProducers = Cfg::kProducers, kStagesPer = Cfg::kStagesPer;
  constexpr bool kCluster = Cfg::kCluster;
  constexpr int kRingProducers = Cfg::kRingProducers, kStages = Cfg::kStages;
  using ClusterBarrier = cutlass::arch::ClusterBarrier;
  // One producer, or the cluster variant (two producers, one consumer): no setmaxnreg, 168
  // registers a thread (the launch bound's share of 64K over 384 threads) is what both roles need.
  // Two producers and two consumers: 128 a thread by the launch bound, redistributed as 112 for the
  // producers and 144 for the consumers (ptxas allocates each role within its budget; 104/152
  // spilled 52 bytes in the producer loop, 112/144 spills 20 bytes, stored once before the loop).

  const int warp_group = threadIdx.x / 128;
  const int64_t HV = p.HV;
  // the cluster variant: CTAs 2 n and 2 n + 1 are the cluster of sequence n, rank = value half
  const int rank = kCluster ? static_cast<int>(cute::block_rank_in_cluster()) : 0;
  const uint32_t peer = static_cast<uint32_t>(rank ^ 1);
  const int64_t n = kCluster ? blockIdx.x / 2 : blockIdx.x;
  const int hv = blockIdx.y;
  const int hq = static_cast<int>(hv / (HV / p.H));
  const int64_t b = p.varlen ? 0 : n;
  const SeqRange r = seq_range(p, n);
  const int64_t seq_row0 = b * p.T + r.bos, seq_len = r.eos - r.bos;
  const int nchunks = static_cast<int>((seq_len + kC - 1) / kC);
  auto rows_in = [&](int c) {
    const int64_t left = seq_len - int64_t(c) * kC;
    return static_cast<int>(left < kC ? left : kC);
  };

  const bool is_producer = warp_group < kProducers;
  typename Pipeline::Params pp;
  pp.role = is_producer ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.producer_arv_count = 128;
  pp.consumer_arv_count = 256;
  // Producer j's pipeline drives ring stages j * kStagesPer .. (j + 1) * kStagesPer - 1.
  auto pipeline_of = [&](int j) { return Pipeline(st.pipeline[j], pp, cute::false_type{}); };
  if constexpr (kCluster) {
    if (threadIdx.x == 0) {
#pragma unroll
      for (int s = 0; s < kStages; ++s) {
        ClusterBarrier::init(&st.cluster_full[s], 1);
        ClusterBarrier::init(&st.cluster_empty[s], 2);
      }
      cutlass::arch::fence_barrier_init();
    }
    cute::cluster_sync();  // both CTAs' barriers initialised before either arrives on the other's
  } else {
    if (threadIdx.x < 32) {
#pragma unroll
      for (int j = 0; j < kProducers; ++j) Pipeline::init_barriers(st.pipeline[j], pp);
    }
    __syncthreads();  // barriers initialised before any arrive or wait
  }

  Tensor sW = make_tensor(make_smem_ptr(st.w.data()), typename Cfg::LayoutWs{});
  Tensor sQ = make_tensor(make_smem_ptr(st.qg.data()), typename Cfg::LayoutQgs{});
  Tensor sKg = make_tensor(make_smem_ptr(st.kg.data()), typename Cfg::LayoutKgs{});
  Tensor sA = make_tensor(make_smem_ptr(st.aqk.data()), typename Cfg::LayoutAqks{});

  if (is_producer) {
    // ==== producer: the intra-chunk work of chunks P, P + kRingProducers, ... ===================
    if constexpr (kProducers == 2 && !kCluster) cutlass::arch::warpgroup_reg_dealloc<112>();
    const int pw = warp_group;
    const int P = rank * kProducers + pw;  // this producer's turn among the ring's producers
    typename Cfg::ProducerStorage& ps = st.prod[pw];
    Pipeline pipeline = pipeline_of(pw);
    const int tid = threadIdx.x % 128;  // = key column
    const int warp = tid / 32, lane = tid % 32;
    const int bar_id = 3 + pw;  // this warpgroup's named barrier
    auto sync_wg = [bar_id] { cutlass::arch::NamedBarrier::sync(128, bar_id); };
    const float gate_a = (p.use_gate_in_kernel && p.A_log != nullptr) ? __expf(p.A_log[hv]) : 1.f;
    const float bias = (p.use_gate_in_kernel && p.dt_bias != nullptr) ? p.dt_bias[hv * kK + tid] : 0.f;
    const float scale = p.scale;
    const GateKind gate = gate_kind(p);
    // The ring as plain shared arrays indexed by the layouts' offsets: writing through CuTe's
    // swizzled tensors compiled to generic 64-bit stores with the swizzle applied to the address.
    T* const ring_qg = reinterpret_cast<T*>(st.qg.data());
    T* const ring_kg = reinterpret_cast<T*>(st.kg.data());
    T* const ring_aqk = reinterpret_cast<T*>(st.aqk.data());
    T* const ring_w = reinterpret_cast<T*>(st.w.data());
    T* const ring_u = reinterpret_cast<T*>(st.u.data());
    auto state = cutlass::make_producer_start_state<Pipeline>();
    const RawCopyPlan copy_plan = raw_copy_plan(p, tid, kK);
    float beta_raw = 0.f;  // this chunk's raw beta of row tid (tid < 16)
    if (P < nchunks) {
      const int64_t row = seq_row0 + int64_t(P) * kC;
      issue_raw_chunk<Cfg>(p, copy_plan, ps, 0, row, rows_in(P), hq, hv);
      cp_async_commit();
      if (tid < kC && tid < rows_in(P)) beta_raw = load_any(p.beta, p.beta_dtype, (row + tid) * HV + hv);
    }
    // KDA_EXT_PROFILE_SECTIONS builds: thread 0 of producer 0 of CTA (0, 0) times its sections.
    KDA_SECTIONS_DECLARE(clock, 8);
    KDA_SECTIONS_START(clock, blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0);
    for (int c = P, it = 0; c < nchunks; c += kRingProducers, ++it) {
      const int buf = it & 1;
      const int L = rows_in(c);
      const int64_t row0 = seq_row0 + int64_t(c) * kC;
      cp_async_wait<0>();  // this chunk's raw rows (the one group in flight)
      if (tid < kC) ps.beta[tid] = tid < L ? beta_of(p, beta_raw) : 0.f;
      // This chunk's raw rows and betas visible to the warpgroup; and every warp is past the
      // previous chunk's reads of the other raw buffer (the w/u products read its v rows), so the
      // next chunk's copies may overwrite it.
      sync_wg();
      float beta_next = 0.f;
      if (c + kRingProducers < nchunks) {  // this warpgroup's next chunk in flight meanwhile
        const int Ln = rows_in(c + kRingProducers);
        const int64_t next0 = row0 + int64_t(kRingProducers) * kC;
        issue_raw_chunk<Cfg>(p, copy_plan, ps, buf ^ 1, next0, Ln, hq, hv);
        if (tid < kC && tid < Ln) beta_next = load_any(p.beta, p.beta_dtype, (next0 + tid) * HV + hv);
      }
      cp_async_commit();
      KDA_SECTIONS_LAP(clock, 0);

      // -- column tid: gate and cumsum, q, k, v of every row
      const T* rq = ps.raw_q[buf];
      const T* rk = ps.raw_k[buf];
      const T* rv = ps.raw_v[buf];
      auto load_column = [&](float (&G)[kC], float (&qv)[kC], float (&kv)[kC]) {
        column_gates<Cfg>(ps.raw_g[buf], p.g_dtype, gate, tid, L, bias, gate_a, p.lower_bound, G);
#pragma unroll
        for (int i = 0; i < kC; ++i) {
          qv[i] = to_float<T>(rq[i * kK + tid]);
          kv[i] = to_float<T>(rk[i * kK + tid]);
        }
      };
      auto normalize_column = [&](float (&qv)[kC], float (&kv)[kC]) {  // once ps.rstd holds the rows'
        if (!p.use_qk_l2norm) return;
#pragma unroll
        for (int i = 0; i < kC; ++i) {
          qv[i] = round_to<T>(qv[i] * ps.rstd[i]);
          kv[i] = round_to<T>(kv[i] * ps.rstd[kC + i]);
        }
      };
      if (p.use_qk_l2norm) {
        // The 32 row norms (q rows 0..15, then k rows) from the raw rows, four threads a row and
        // 32 elements each (16-byte loads, their order rotated so that the eight threads of a
        // load phase hit distinct banks); issued before the column loads, which hide its latency.
        const int norm = tid / 4, quarter = tid % 4;
        const T* row = (norm < kC ? rq + norm * kK : rk + (norm - kC) * kK) + 32 * quarter;
        float ss = 0.f;
#pragma unroll
        for (int v4 = 0; v4 < 4; ++v4) {
          const int vv = (v4 + quarter / 2 + 2 * (norm & 1)) & 3;
          const uint4 x = *reinterpret_cast<const uint4*>(row + 8 * vv);
          const uint32_t words[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = unpack2<T>(words[e]);
            ss = fmaf(f.x, f.x, ss);
            ss = fmaf(f.y, f.y, ss);
          }
        }
        ss += __shfl_xor_sync(0xffffffffu, ss, 1);
        ss += __shfl_xor_sync(0xffffffffu, ss, 2);
        if (quarter == 0) ps.rstd[norm] = 1.f / sqrtf(ss + 1e-6f);
      }
      float G[kC], qv[kC], kv[kC];
      load_column(G, qv, kv);
      KDA_SECTIONS_LAP(clock, 1);
      if (p.use_qk_l2norm) {
        sync_wg();  // the row norms
        normalize_column(qv, kv);
      }

      KDA_SECTIONS_LAP(clock, 2);
      // The ring stage this chunk's results go to (the consumers released it).
      // (the cluster variant: stage P free in both CTAs; its first use waits for nothing)
      if constexpr (kCluster) ClusterBarrier::wait(&st.cluster_empty[P], (it & 1) ^ 1);
      else pipeline.producer_acquire(state);
      KDA_SECTIONS_LAP(clock, 3);
      const int s = kCluster ? P : pw * kStagesPer + state.index();  // the ring stage

      // -- the decayed operands of column tid. G is relative to the chunk's first row, so
      // e^{G} <= 1; under the bounded gate |G| <= 16 |lower_bound| <= 80 keeps e^{-G} finite and
      // e^{G} normal in fp32, and the median row m = min(8, L - 1) halves the diagonal factors.
      const int m = L - 1 < 8 ? L - 1 : 8;
      float Gm = 0.f, Gl = 0.f;
#pragma unroll
      for (int i = 0; i < kC; ++i) {
        Gm = i == m ? G[i] : Gm;
        Gl = i == L - 1 ? G[i] : Gl;
      }
      const float e_neg_m = exp_ftz(-Gm), e_pos_m = exp_ftz(Gm);
      const float e_last = exp_ftz(Gl);
      st.decay[s][tid] = e_last;
      if constexpr (!Cfg::kBoundedGate) {
        float lo = 0.f, hi = 0.f;
#pragma unroll
        for (int i = 0; i < kC; ++i) {
          lo = fminf(lo, G[i]);
          hi = fmaxf(hi, G[i]);
        }
        // (a NaN gate fails the test and takes the exact path, which passes the NaN on)
        const bool in_range = lo >= -Cfg::kGateSpan && hi <= Cfg::kGateSpan;
        const bool warp_ok = __all_sync(0xffffffffu, in_range);
        if (lane == 0) ps.range_ok[warp] = warp_ok;
      }
      // Two halves of 8 rows: each version of the column's 8 values packed in pairs and stored as
      // one 16-byte vector (the private tiles and both ring tiles are [k][row]), one version at a
      // time (few registers live: the two-producer build has 112 a thread).
      auto put = [](T* dst, auto value_of_row, int row0) {
        uint32_t v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = pack2<T>(value_of_row(row0 + 2 * e), value_of_row(row0 + 2 * e + 1));
        *reinterpret_cast<uint4*>(dst) = make_uint4(v[0], v[1], v[2], v[3]);
      };
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float E[8], R[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          E[e] = exp_ftz(G[8 * h + e]);
          R[e] = exp_ftz(-G[8 * h + e]);
        }
        const int r0 = 8 * h, col = tid * kLdT + r0;
        put(ps.qm + col, [&](int i) { return qv[i] * E[i - r0] * e_neg_m; }, r0);
        put(ps.km + col, [&](int i) { return kv[i] * R[i - r0] * e_pos_m; }, r0);
        put(ps.kmm + col, [&](int i) { return kv[i] * E[i - r0] * e_neg_m; }, r0);
        put(ps.ke + col, [&](int i) { return kv[i] * E[i - r0]; }, r0);
        put(ring_qg + ring_index<typename Cfg::LayoutQgs, T>(r0, tid, s),
            [&](int i) { return scale * qv[i] * E[i - r0]; }, r0);  // o = Sh (scale qg) + v_new Aqk
        // k e^{G_last - G}: in range, R e^{G_last}; else one exponential (R may overflow)
        put(ring_kg + ring_index<typename Cfg::LayoutKgs, T>(tid, r0, s),
            [&](int i) { return kv[i] * (Cfg::kBoundedGate ? R[i - r0] * e_last : exp_ftz(Gl - G[i])); }, r0);
      }
      sync_wg();
      KDA_SECTIONS_LAP(clock, 4);
      const bool median_products =
          Cfg::kBoundedGate || (ps.range_ok[0] && ps.range_ok[1] && ps.range_ok[2] && ps.range_ok[3]);

      // -- Aqk = scale qm km^T (i >= j) and L = diag(beta) kmm km^T (i > j): warp w one 16 x 8 tile,
      // operands from the [k][row] tiles by transposing loads
      if (median_products) {
        const int g4 = lane / 4, t4 = lane % 4;
        const bool is_l = warp >= 2;
        const int nt = warp & 1;  // columns 8 nt .. 8 nt + 7
        const T* a_tile = is_l ? ps.kmm : ps.qm;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int ks = 0; ks < kK / 16; ++ks) {
          uint32_t a[4], bb[2];
          ldmatrix_x4_trans(a, a_tile + (16 * ks + 8 * (lane / 16) + lane % 8) * kLdT + 8 * ((lane / 8) % 2));
          ldmatrix_x2_trans(bb, ps.km + (16 * ks + 8 * ((lane / 8) % 2) + lane % 8) * kLdT + 8 * nt);
          mma_16x8x16<T>(acc, a, bb[0], bb[1]);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = g4 + 8 * (e / 2), j = 8 * nt + 2 * t4 + e % 2;
          if (is_l) ps.lkk[i * Cfg::kLdL + j] = i > j ? ps.beta[i] * acc[e] : 0.f;
          else ring_aqk[ring_index<typename Cfg::LayoutAqks, T>(i, j, s)] = from_float<T>(i >= j ? scale * acc[e] : 0.f);
        }
      } else {
        // The exact path (warp-uniform: the vote above): the column reloaded from the raw rows
        // (registers are the producer's scarce resource, this path is rare), every pair's
        // product with its own e^{G_i - G_j} <= 1, summed over the columns. qm is free here:
        // its space holds the four warps' pair sums.
        float G2[kC], q2[kC], k2[kC];
        load_column(G2, q2, k2);
        normalize_column(q2, k2);
        float* pair_sums = reinterpret_cast<float*>(ps.qm);
        exact_pair_sums<Cfg>(G2, q2, k2, pair_sums + warp * Cfg::kPairs, lane);
        sync_wg();
        for (int e = tid; e < kC * kC; e += 128) {
          const int i = e / kC, j = e % kC;
          auto summed = [&](int idx) {
            return pair_sums[idx] + pair_sums[Cfg::kPairs + idx] + pair_sums[2 * Cfg::kPairs + idx] +
                   pair_sums[3 * Cfg::kPairs + idx];
          };
          const float aqk = j <= i ? summed(i * (i + 1) / 2 + j) : 0.f;
          const float l = j < i ? ps.beta[i] * summed(Cfg::kAqkPairs + i * (i - 1) / 2 + j) : 0.f;
          ring_aqk[ring_index<typename Cfg::LayoutAqks, T>(i, j, s)] = from_float<T>(scale * aqk);
          ps.lkk[i * Cfg::kLdL + j] = l;
        }
      }
      sync_wg();

      KDA_SECTIONS_LAP(clock, 5);
      // -- Akk = (I + L)^-1 by forward substitution: thread j < 16 computes column j
      if (tid < kC) {
        const int j = tid;
        float x[kC];
#pragma unroll
        for (int i = 0; i < kC; ++i) {
          float acc0 = i == j ? 1.f : 0.f, acc1 = 0.f;
#pragma unroll
          for (int k4 = 0; k4 < i; k4 += 4) {
            const float4 l4 = *reinterpret_cast<const float4*>(ps.lkk + i * Cfg::kLdL + k4);
            acc0 -= l4.x * x[k4];
            if (k4 + 1 < i) acc1 -= l4.y * x[k4 + 1];
            if (k4 + 2 < i) acc0 -= l4.z * x[k4 + 2];
            if (k4 + 3 < i) acc1 -= l4.w * x[k4 + 3];
          }
          x[i] = acc0 + acc1;
        }
        // Akk diag(beta): w = Akk (beta k e^G) and u = Akk (beta v) take k e^G and the raw v rows
        const float beta_j = ps.beta[j];
#pragma unroll
        for (int i = 0; i < kC; ++i) ps.akk[i * Cfg::kLdAkk + j] = from_float<T>(x[i] * beta_j);
      }
      sync_wg();

      KDA_SECTIONS_LAP(clock, 6);
      // -- w = Akk' ke, u = Akk' v with Akk' = Akk diag(beta): warp w the columns 32 w .. 32 w + 31
      // (four 16 x 8 tiles each); ke from its [k][row] tile, v from the raw [row][k] rows (zero past L)
      {
        const int g4 = lane / 4, t4 = lane % 4;
        uint32_t a[4];
        ldmatrix_x4(a, ps.akk + (lane % 16) * Cfg::kLdAkk + 8 * (lane / 16));
#pragma unroll
        for (int pair = 0; pair < 2; ++pair) {
          const int n0 = 32 * warp + 16 * pair;
          uint32_t bw[4], bu[4];
          ldmatrix_x4(bw, ps.ke + (n0 + 8 * (lane / 16) + lane % 8) * kLdT + 8 * ((lane / 8) % 2));
          ldmatrix_x4_trans(bu, rv + (8 * ((lane / 8) % 2) + lane % 8) * kK + n0 + 8 * (lane / 16));
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            float cw[4] = {0.f, 0.f, 0.f, 0.f}, cu[4] = {0.f, 0.f, 0.f, 0.f};
            mma_16x8x16<T>(cw, a, bw[2 * half], bw[2 * half + 1]);
            mma_16x8x16<T>(cu, a, bu[2 * half], bu[2 * half + 1]);
            const int col = n0 + 8 * half + 2 * t4;
#pragma unroll
            for (int rh = 0; rh < 2; ++rh) {
              const int i = g4 + 8 * rh;
              *reinterpret_cast<uint32_t*>(&ring_w[ring_index<typename Cfg::LayoutWs, T>(i, col, s)]) =
                  pack2<T>(cw[2 * rh], cw[2 * rh + 1]);
              *reinterpret_cast<uint32_t*>(&ring_u[ring_index<typename Cfg::LayoutUs, T>(i, col, s)]) =
                  pack2<T>(cu[2 * rh], cu[2 * rh + 1]);
            }
          }
        }
      }
      // The consumers read the stage with wgmma (the async proxy): make this thread's writes
      // visible to it, then arrive.
      cutlass::arch::fence_view_async_shared();
      if constexpr (kCluster) {
        // every thread's stage writes fenced for the async proxy, then one thread signals the
        // local consumer and sends the stage to the peer's
        sync_wg();
        if (tid == 0) {
          ClusterBarrier::arrive(&st.cluster_full[s]);
          cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&st.cluster_full[s], Cfg::kStageBytes, peer, 1);
          constexpr uint32_t kTile = kC * kK * 2;
          copy_tile_to_peer(st.w.data() + s * kC * kK, kTile, &st.cluster_full[s], peer);
          copy_tile_to_peer(st.qg.data() + s * kC * kK, kTile, &st.cluster_full[s], peer);
          copy_tile_to_peer(st.kg.data() + s * kC * kK, kTile, &st.cluster_full[s], peer);
          copy_tile_to_peer(st.u.data() + s * kC * kK, kTile, &st.cluster_full[s], peer);
          copy_tile_to_peer(st.aqk.data() + s * kC * kC, kC * kC * 2, &st.cluster_full[s], peer);
          copy_tile_to_peer(st.decay[s], kK * 4, &st.cluster_full[s], peer);
        }
      } else {
        pipeline.producer_commit(state);
        ++state;
      }
      beta_raw = beta_next;
      KDA_SECTIONS_LAP(clock, 7);
      // (The next chunk's first barrier also orders this chunk's reads of the raw buffers and of
      // the operand tiles before their next writes: the copies into a raw buffer are issued after it.)
    }
#ifdef KDA_EXT_PROFILE_SECTIONS
    const char* const names[8] = {"raw_wait", "gates_load", "l2norm", "acquire", "operands", "aqk_l", "inverse",
                                  "w_u_commit"};
    KDA_SECTIONS_REPORT(clock, "producer", names, (nchunks - P + kRingProducers - 1) / kRingProducers);
#endif
    // the cluster: no CTA leaves while its peer may still arrive on its barriers or copy into it
    if constexpr (kCluster) cute::cluster_sync();
    return;
  }

  // ==== consumers: the state and the output =====================================================
  if constexpr (kProducers == 2 && !kCluster) cutlass::arch::warpgroup_reg_alloc<144>();
  const int tid = threadIdx.x % 128;
  const int consumer = warp_group - kProducers;
  const int v0 = (kCluster ? rank : consumer) * kBV;
  const int bar = 1 + consumer;  // this warpgroup's named barrier (the cluster variant's stage release)
  typename Cfg::MmaVn mma_vn;
  typename Cfg::MmaQ mma_q;
  typename Cfg::MmaO mma_o;
  typename Cfg::MmaS mma_s;
  auto thr_vn = mma_vn.get_thread_slice(tid);
  auto thr_q = mma_q.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  auto thr_s = mma_s.get_thread_slice(tid);

  Tensor tBw = thr_vn.partition_fragment_B(sW);
  Tensor tBq = thr_q.partition_fragment_B(sQ);
  Tensor tBa = thr_o.partition_fragment_B(sA);
  Tensor tBk = thr_s.partition_fragment_B(sKg);

  Tensor accS = partition_fragment_C(mma_s, Shape<_64, _128>{});  // S^T [v][k]
  Tensor accV = partition_fragment_C(mma_vn, Shape<_64, _16>{});  // v_new^T [v][row]
  Tensor accO = partition_fragment_C(mma_vn, Shape<_64, _16>{});  // o^T [v][row]
  const AccCoord ac = acc_coord(tid);
  static_assert(decltype(size(accS))::value == 64 && decltype(size(accV))::value == 8,
                "one 64 x N wgmma tile per accumulator");
  Tensor aS = thr_vn.partition_fragment_A(make_tensor(static_cast<Elt*>(nullptr), Shape<_64, _128>{}));
  Tensor aV = thr_o.partition_fragment_A(make_tensor(static_cast<Elt*>(nullptr), Shape<_64, _16>{}));

  const bool vf = p.state_v_first;
  constexpr int64_t KV = int64_t(kK) * kK;
  {
    const float* h0 = p.h0 != nullptr ? p.h0 + (n * HV + hv) * KV : nullptr;
    if (h0 != nullptr)
      for_state_elements(ac, v0, vf, [&](int i, int off) { accS(i) = h0[off]; });
    else
      clear(accS);
  }
  T* o = static_cast<T*>(p.o);
  const T* const ring_u = reinterpret_cast<const T*>(st.u.data());
  const int64_t vs = HV * kK;  // row stride of o
  T* o_stage = st.o_stage[consumer][tid / 32];  // this warp's tile
  const int lane = tid % 32;
  T* const o_dst0 = o + hv * kK + v0 + 16 * (tid / 32);  // the warp's 16 value columns of row 0

  // KDA_EXT_PROFILE_SECTIONS builds: thread 0 of consumer 0 of CTA (0, 0) times its sections.
  KDA_SECTIONS_DECLARE(cclock, 6);
  KDA_SECTIONS_START(cclock, blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == kProducers * 128);
  // One chunk's products from ring stage s, up to the state update's completion (the stage may be
  // released after it).
  auto step = [&](int s, int L) {
    // the chunk's decay of this thread's 32 key columns, loaded while the products run
    float2 decay[16];
#pragma unroll
    for (int q = 0; q < 16; ++q) decay[q] = *reinterpret_cast<const float2*>(&st.decay[s][ac.n0 + 8 * q]);
    clear(accV);
    warpgroup_fence_operand(aS);
    warpgroup_fence_operand(accV);
    warpgroup_arrive();
    gemm(mma_vn, aS, tBw(_, _, _, s), accV);
    warpgroup_commit_batch();
    clear(accO);  // (qg carries the scale: the producer wrote scale q e^G)
    warpgroup_fence_operand(accO);
    warpgroup_arrive();
    gemm(mma_q, aS, tBq(_, _, _, s), accO);
    warpgroup_commit_batch();
    warpgroup_wait<1>();
    warpgroup_fence_operand(accV);
    KDA_SECTIONS_LAP(cclock, 1);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int vl = ac.m0 + 8 * ((i / 2) % 2), j = ac.n0 + 8 * (i / 4) + i % 2;
      const float uv = to_float<T>(ring_u[ring_index<typename Cfg::LayoutUs, T>(j, v0 + vl, s)]);
      accV(i) = j < L ? round_to<T>(uv - accV(i)) : 0.f;
    }
    acc_to_a_operand<Elt>(accV, aV);
    warpgroup_fence_operand(aV);
    KDA_SECTIONS_LAP(cclock, 2);
    // the state update first (the next chunk waits for it), then o += v_new Aqk^T behind the
    // in-flight o product (wgmma groups of a warpgroup run in order)
#pragma unroll
    for (int i = 0; i < 64; ++i) accS(i) *= (i % 2 == 0) ? decay[i / 4].x : decay[i / 4].y;
    warpgroup_fence_operand(accS);
    warpgroup_arrive();
    gemm(mma_s, aV, tBk(_, _, _, s), accS);
    warpgroup_commit_batch();
    KDA_SECTIONS_LAP(cclock, 3);
    warpgroup_arrive();
    gemm(mma_o, aV, tBa(_, _, _, s), accO);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(aS);
    warpgroup_fence_operand(aV);
    warpgroup_fence_operand(accO);
    warpgroup_fence_operand(accS);
  };
  if constexpr (kCluster) {
    // chunk c from ring stage c % kStages (producer c % 4 of the cluster)
    for (int c = 0; c < nchunks; ++c) {
      const int s = c % kStages;
      const int64_t row0 = seq_row0 + int64_t(c) * kC;
      const int L = rows_in(c);
      acc_to_a_operand<Elt>(accS, aS);  // Sh, the state rounded to T
      KDA_SECTIONS_LAP(cclock, 5);
      ClusterBarrier::wait(&st.cluster_full[s], (c / kStages) & 1);
      // CUTLASS's wait has no memory clobber: keep the stage's plain shared loads (u, decay) below it
      asm volatile("" ::: "memory");
      KDA_SECTIONS_LAP(cclock, 0);
      step(s, L);
      KDA_SECTIONS_LAP(cclock, 4);
      // the warpgroup is done with the stage: one arrival on the producing CTA's empty barrier
      cutlass::arch::NamedBarrier::sync(128, bar);
      if (tid == 0) ClusterBarrier::arrive(&st.cluster_empty[s], static_cast<uint32_t>(s / kProducers), 1u);
      store_o_rows<Cfg>(accO, o_stage, ac, lane, o_dst0 + row0 * vs, vs, L);
    }
  } else {
    // Chunk c comes from producer c % kProducers: the loop runs kProducers chunks a step so that
    // each producer's pipeline and state are compile-time choices.
    cutlass::PipelineState<kStagesPer> states[kProducers];
    for (int c0 = 0; c0 < nchunks; c0 += kProducers) {
#pragma unroll
      for (int j = 0; j < kProducers; ++j) {
        const int c = c0 + j;
        if (c >= nchunks) break;
        Pipeline pipeline = pipeline_of(j);
        auto& state = states[j];
        const int64_t row0 = seq_row0 + int64_t(c) * kC;
        const int L = rows_in(c);
        acc_to_a_operand<Elt>(accS, aS);  // Sh, the state rounded to T
        KDA_SECTIONS_LAP(cclock, 5);
        pipeline.consumer_wait(state);
        asm volatile("" ::: "memory");  // (as above)
        KDA_SECTIONS_LAP(cclock, 0);
        step(j * kStagesPer + state.index(), L);
        KDA_SECTIONS_LAP(cclock, 4);
        pipeline.consumer_release(state);
        ++state;
        store_o_rows<Cfg>(accO, o_stage, ac, lane, o_dst0 + row0 * vs, vs, L);
      }
    }
  }
#ifdef KDA_EXT_PROFILE_SECTIONS
  {
    const char* const names[6] = {"full_wait", "vnew_o_issue_wait1", "u_sub", "decay_state_issue", "o_issue_wait0",
                                  "release_store_o"};
    KDA_SECTIONS_REPORT(cclock, "consumer", names, nchunks);
  }
#endif
  if (p.final_state != nullptr) {
    float* fs = p.final_state + (n * HV + hv) * KV;
    for_state_elements(ac, v0, vf, [&](int i, int off) { fs[off] = accS(i); });
  }
  if constexpr (kCluster) cute::cluster_sync();  // (the producers' matching call: their exit)
}

}  // namespace sm90
}  // namespace cuda
}  // namespace kda_ext

// kda_ext CUDA, Hopper path: the forward's state/output pass on wgmma with TMA loads and a
// warp-specialized mbarrier pipeline (CuTe / CUTLASS). Same contract as chunk_state_output_mma
// (state_output_mma.cuh): per chunk, from the intermediates of the intra-chunk stage,
//   Sh = S rounded to T (what h stores), v_new = u - w Sh (rounded to T),
//   o = scale qg Sh + Aqk v_new, S <- exp(G_last) S + kg^T v_new.
//
// Layout of the work: one CTA per (sequence, value head, V half of 64 columns); two warpgroups:
// - warpgroup 0, the producer: one thread streams each chunk's w, qg, kg [64 x 128], Aqk [64 x 64],
//   the u slice [64 x 64] and the g_cum row of the chunk's last token into a kStages-deep ring of
//   shared-memory stages with TMA, each stage guarded by a full/empty mbarrier pair
//   (cutlass::PipelineTmaAsync);
// - warpgroup 1, the consumer: holds the transposed state slice S^T [64 (v) x 128 (k)] in fp32
//   wgmma accumulators (64 registers a thread) for the whole sequence and per chunk runs four
//   wgmma products with the register-sourced A operand (the state, then v_new, rounded to T and
//   re-read from the accumulator registers without a trip through shared memory):
//     v_new^T = u^T - Sh^T w^T          (64 x 64, k = 128; B = w, K-major)
//     o^T     = scale Sh^T qg^T         (64 x 64, k = 128; B = qg, K-major)
//           += v_new^T Aqk^T            (64 x 64, k = 64;  B = Aqk, K-major)
//     S^T     = e^{G_last} S^T + v_new^T kg   (64 x 128, k = 64; B = kg, MN-major)
// Working on S^T makes the value dimension the MMA's M (64 rows = one warpgroup) and the chunk
// rows / key dimension its N, so every product has a legal wgmma shape with the state as A.
// Rows past the chunk's end (the next sequence's rows under varlen, TMA's zero fill past T) are
// masked by zeroing v_new's columns there: nothing else of theirs reaches S or a stored o row.
// Numerics: the same rounding points as chunk_state_output_mma (Sh and v_new in T, fp32
// accumulation); only the order of the fp32 sums differs.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/pipeline.hpp>

#include "cuda/mma.cuh"
#include "cuda/params.h"

namespace kda_ext {
namespace cuda {
namespace sm90 {

using namespace cute;

template <typename T>
struct CuteType;
template <>
struct CuteType<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CuteType<__half> {
  using type = cutlass::half_t;
};

template <typename T_, int kStages_ = 2>
struct StateSm90Config {
  using T = T_;                            // the CUDA type (params, stores)
  using Elt = typename CuteType<T>::type;  // the same type for CuTe
  static constexpr int kStages = kStages_;
  static constexpr int kBT = 64, kK = 128, kBV = 64;
  static constexpr int kThreads = 256;  // producer warpgroup + consumer warpgroup
  static constexpr int kLdStage = 64 + 8;

  // v_new^T = Sh^T w^T and o^T = Sh^T qg^T: M = v (64), N = chunk rows (64), K = k (128).
  using MmaVn = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elt, Elt, float, Shape<_64, _64, _128>, GMMA::Major::K, GMMA::Major::K>()));
  // o^T += v_new^T Aqk^T: K = chunk rows (64).
  using MmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elt, Elt, float, Shape<_64, _64, _64>, GMMA::Major::K, GMMA::Major::K>()));
  // S^T += v_new^T kg: N = k (128), K = chunk rows (64); kg is stored [row][k]: MN-major B.
  using MmaS = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elt, Elt, float, Shape<_64, _128, _64>, GMMA::Major::K, GMMA::Major::MN>()));

  // Shared tiles, one per stage (the last mode). B operands as (N, K).
  using LayoutW = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elt>{}, Shape<_64, _128>{}));
  using LayoutAqk = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elt>{}, Shape<_64, _64>{}));
  using LayoutKg = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Elt>{}, Shape<_128, _64>{}));
  using LayoutU = Layout<Shape<_64, _64>, Stride<_64, _1>>;     // [row][v], plain
  using LayoutG = Layout<Shape<_128, _1>, Stride<_1, _128>>;    // g_cum row [k]
  using LayoutWs = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elt>{},
                                          Shape<_64, _128, Int<kStages>>{}));
  using LayoutAqks = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elt>{},
                                            Shape<_64, _64, Int<kStages>>{}));
  using LayoutKgs = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Elt>{},
                                           Shape<_128, _64, Int<kStages>>{}));
  using LayoutUs = Layout<Shape<_64, _64, Int<kStages>>, Stride<_64, _1, _4096>>;
  using LayoutGs = Layout<Shape<_128, _1, Int<kStages>>, Stride<_1, _128, _128>>;

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Elt, cosize_v<LayoutWs>> w;
    alignas(1024) cute::array_aligned<Elt, cosize_v<LayoutWs>> qg;
    alignas(1024) cute::array_aligned<Elt, cosize_v<LayoutKgs>> kg;
    alignas(1024) cute::array_aligned<Elt, cosize_v<LayoutAqks>> aqk;
    alignas(1024) cute::array_aligned<Elt, cosize_v<LayoutUs>> u;
    alignas(128) cute::array_aligned<float, cosize_v<LayoutGs>> g;
    // o and v_new of one chunk, [row][v] with 16-byte row padding: staged so that the global
    // stores are whole 16-byte vectors along rows instead of scattered 2-byte ones.
    alignas(128) cute::array_aligned<Elt, 64 * kLdStage> o_stage;
    alignas(128) cute::array_aligned<Elt, 64 * kLdStage> vn_stage;
    typename Pipeline::SharedStorage pipeline;
  };

  static constexpr uint32_t kTxBytes =
      sizeof(Elt) * (2 * 64 * 128 + 128 * 64 + 64 * 64 + 64 * 64) + sizeof(float) * 128;

  // Global tensors as TMA sees them: (rows, columns, head) with the head as the last mode, so one
  // descriptor serves every head; rows are the flattened B * T tokens.
  using ShapeRows = Shape<int32_t, int32_t, int32_t>;
  using StrideRows = Stride<int64_t, _1, int64_t>;   // [row][col], head stride
  using StrideCols = Stride<_1, int64_t, int64_t>;   // kg, g_cum: (col, row, head)

};

template <class Cfg>
struct StateSm90Params {
  using Elt = typename Cfg::Elt;
  // TMA descriptors (built on the host from the same types the kernel uses)
  using TensorRows = decltype(make_tensor(make_gmem_ptr(static_cast<const Elt*>(nullptr)),
                                          typename Cfg::ShapeRows{}, typename Cfg::StrideRows{}));
  using TensorCols = decltype(make_tensor(make_gmem_ptr(static_cast<const Elt*>(nullptr)),
                                          typename Cfg::ShapeRows{}, typename Cfg::StrideCols{}));
  using TensorG = decltype(make_tensor(make_gmem_ptr(static_cast<const float*>(nullptr)),
                                       typename Cfg::ShapeRows{}, typename Cfg::StrideCols{}));
  using TmaW = decltype(make_tma_copy(SM90_TMA_LOAD{}, TensorRows{}, typename Cfg::LayoutW{},
                                      Shape<_64, _128>{}, _1{}));
  using TmaAqk = decltype(make_tma_copy(SM90_TMA_LOAD{}, TensorRows{}, typename Cfg::LayoutAqk{},
                                        Shape<_64, _64>{}, _1{}));
  using TmaU = decltype(make_tma_copy(SM90_TMA_LOAD{}, TensorRows{}, typename Cfg::LayoutU{},
                                      Shape<_64, _64>{}, _1{}));
  using TmaKg = decltype(make_tma_copy(SM90_TMA_LOAD{}, TensorCols{}, typename Cfg::LayoutKg{},
                                       Shape<_128, _64>{}, _1{}));
  using TmaG = decltype(make_tma_copy(SM90_TMA_LOAD{}, TensorG{}, typename Cfg::LayoutG{},
                                      Shape<_128, _1>{}, _1{}));
  TmaW tma_w, tma_qg;
  TmaKg tma_kg;
  TmaAqk tma_aqk;
  TmaU tma_u;
  TmaG tma_g;
  typename Cfg::ShapeRows shape_w, shape_kg, shape_aqk, shape_u, shape_g;
  ChunkKdaFwdParams p;
};

// The A-operand register fragment of a 64 x N accumulator: C's values per thread are
// (column pair, row half, N / 8 column blocks); an A fragment of K = N has per k-block of 16
// (column pair, row half, which 8 of the 16). Both put the same (row, column) elements in a
// thread (PTX ISA, wgmma fragment layouts), so the conversion is a re-indexing plus the rounding.
template <class Elt, class AccTensor, class ATensor>
__device__ __forceinline__ void acc_to_a_operand(const AccTensor& acc, ATensor& a) {
  constexpr int kBlocks = decltype(size<2>(a))::value;  // k-blocks of 16
  static_assert(decltype(size<0, 2>(acc.layout()))::value == 2 * kBlocks, "accumulator N != A K");
#pragma unroll
  for (int kb = 0; kb < kBlocks; ++kb)
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          a(make_coord(c, r, half), 0, kb) =
              static_cast<Elt>(acc(make_coord(c, r, 2 * kb + half), 0, 0));
}

// Where a consumer thread's accumulator values lie in a 64 x N tile: value i = c + 2 r + 4 j
// (the compact order of CuTe's ((2, 2, N / 8), 1, 1) fragment) is element (m0 + 8 r, n0 + 8 j + c).
// Written out instead of read from an identity tensor: those coordinates are loop-invariant and
// the compiler kept all of them live across the chunk loop (1.6 KB of spills).
struct AccCoord {
  int m0, n0;
};
__device__ __forceinline__ AccCoord acc_coord(int tid) {
  const int warp = tid / 32, lane = tid % 32;
  return {16 * warp + lane / 4, 2 * (lane % 4)};
}

// f(value index, element offset) over a thread's 64 values of S^T [64 v][128 k] in a 128 x 128
// state ([K][V], or [V][K] with state_v_first) whose V half starts at v0: offsets are base +
// immediates, so nothing per element stays live across the chunk loop.
template <class F>
__device__ __forceinline__ void for_state_elements(const AccCoord& ac, int v0, bool v_first, F&& f) {
  if (v_first) {
    const int base = (v0 + ac.m0) * 128 + ac.n0;
#pragma unroll
    for (int i = 0; i < 64; ++i) f(i, base + 8 * ((i / 2) % 2) * 128 + 8 * (i / 4) + i % 2);
  } else {
    const int base = ac.n0 * 128 + v0 + ac.m0;
#pragma unroll
    for (int i = 0; i < 64; ++i) f(i, base + (8 * (i / 4) + i % 2) * 128 + 8 * ((i / 2) % 2));
  }
}

// Stages a thread's 32 values of a [64 v][64 row] accumulator as [row][v] in T, then (after the
// consumer warpgroup's barrier) the warpgroup stores rows < L to dst + row * row_stride as 16-byte
// vectors. Two barriers: the first also keeps this chunk's writes behind the last chunk's reads.
template <typename T, int kLd, class Acc>
__device__ __forceinline__ void store_rows_staged(const Acc& acc, T* stage, const AccCoord& ac,
                                                  int tid, T* dst, int64_t row_stride, int L) {
  cutlass::arch::NamedBarrier::sync(128, 1);
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int m = ac.m0 + 8 * ((i / 2) % 2), j = ac.n0 + 8 * (i / 4) + i % 2;
    stage[j * kLd + m] = from_float<T>(acc(i));
  }
  cutlass::arch::NamedBarrier::sync(128, 1);
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    const int idx = tid + 128 * it;  // 64 rows x 8 vectors
    const int j = idx / 8, c = (idx % 8) * 8;
    if (j < L)
      *reinterpret_cast<uint4*>(dst + j * row_stride + c) =
          *reinterpret_cast<const uint4*>(stage + j * kLd + c);
  }
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    state_output_sm90_kernel(const __grid_constant__ StateSm90Params<Cfg> P) {
  using T = typename Cfg::T;
  using Elt = typename Cfg::Elt;
  using Pipeline = typename Cfg::Pipeline;
  using Storage = typename Cfg::SharedStorage;
  constexpr int kBT = Cfg::kBT, kK = Cfg::kK, kBV = Cfg::kBV;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  Storage& st = *reinterpret_cast<Storage*>(smem_raw);
  const ChunkKdaFwdParams& p = P.p;

  const int warp_group = threadIdx.x / 128;
  const int64_t HV = p.HV;
  constexpr int V = kK;  // state_output_sm90_applies: V == K == 128
  const int64_t v_tiles = V / kBV;
  const int64_t n = blockIdx.x / v_tiles;
  const int hv = blockIdx.y;
  const int v0 = static_cast<int>((blockIdx.x % v_tiles) * kBV);
  const int64_t b = p.varlen ? 0 : n;
  const SeqRange r = seq_range(p, n);
  const int64_t seq_row0 = b * p.T + r.bos, seq_len = r.eos - r.bos;
  const int nchunks = static_cast<int>((seq_len + kBT - 1) / kBT);

  typename Pipeline::Params pp;
  pp.transaction_bytes = Cfg::kTxBytes;
  pp.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.is_leader = threadIdx.x == 0;
  pp.num_consumers = 128;
  Pipeline pipeline(st.pipeline, pp, Shape<_1, _1, _1>{});
  __syncthreads();  // barriers initialised before any arrive or wait

  // The stage ring, as the producer's TMA writes it and the consumer's wgmma reads it.
  Tensor sW = make_tensor(make_smem_ptr(st.w.data()), typename Cfg::LayoutWs{});
  Tensor sQ = make_tensor(make_smem_ptr(st.qg.data()), typename Cfg::LayoutWs{});
  Tensor sKg = make_tensor(make_smem_ptr(st.kg.data()), typename Cfg::LayoutKgs{});
  Tensor sA = make_tensor(make_smem_ptr(st.aqk.data()), typename Cfg::LayoutAqks{});
  Tensor sU = make_tensor(make_smem_ptr(st.u.data()), typename Cfg::LayoutUs{});
  Tensor sG = make_tensor(make_smem_ptr(st.g.data()), typename Cfg::LayoutGs{});

  if (warp_group == 0) {
    // ---- producer ----------------------------------------------------------------------------
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (threadIdx.x == 0) {
      Tensor mW = P.tma_w.get_tma_tensor(P.shape_w);
      Tensor mQ = P.tma_qg.get_tma_tensor(P.shape_w);
      Tensor mKg = P.tma_kg.get_tma_tensor(P.shape_kg);
      Tensor mA = P.tma_aqk.get_tma_tensor(P.shape_aqk);
      Tensor mU = P.tma_u.get_tma_tensor(P.shape_u);
      Tensor mG = P.tma_g.get_tma_tensor(P.shape_g);
      auto state = cutlass::make_producer_start_state<Pipeline>();
      for (int c = 0; c < nchunks; ++c) {
        const int32_t row0 = static_cast<int32_t>(seq_row0 + int64_t(c) * kBT);
        const int L = static_cast<int>(seq_len - int64_t(c) * kBT < kBT ? seq_len - int64_t(c) * kBT : kBT);
        pipeline.producer_acquire(state);
        auto* bar = pipeline.producer_get_barrier(state);
        const int s = state.index();
        // Each tile starts at its chunk's first row: domain_offset moves the coordinate origin
        // there (chunks under varlen do not start at multiples of 64).
        auto load = [&](const auto& tma, auto gtile, auto stile) {
          auto [src, dst] = tma_partition(tma, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(stile),
                                          group_modes<0, 2>(gtile));
          copy(tma.with(*bar), src, dst);
        };
        auto rows_at = [&](auto& m, int32_t r, int32_t col, auto shape) {  // (row, col) tiles
          return local_tile(domain_offset(make_coord(r, col), m(_, _, hv)), shape, make_coord(0, 0));
        };
        auto cols_at = [&](auto& m, int32_t r, auto shape) {  // (col, row) tiles: kg, g_cum
          return local_tile(domain_offset(make_coord(0, r), m(_, _, hv)), shape, make_coord(0, 0));
        };
        load(P.tma_w, rows_at(mW, row0, 0, Shape<_64, _128>{}), sW(_, _, s));
        load(P.tma_qg, rows_at(mQ, row0, 0, Shape<_64, _128>{}), sQ(_, _, s));
        load(P.tma_aqk, rows_at(mA, row0, 0, Shape<_64, _64>{}), sA(_, _, s));
        load(P.tma_u, rows_at(mU, row0, v0, Shape<_64, _64>{}), sU(_, _, s));
        load(P.tma_kg, cols_at(mKg, row0, Shape<_128, _64>{}), sKg(_, _, s));
        load(P.tma_g, cols_at(mG, row0 + L - 1, Shape<_128, _1>{}), sG(_, _, s));
        ++state;
      }
    }
    return;
  }

  // ---- consumer ------------------------------------------------------------------------------
  cutlass::arch::warpgroup_reg_alloc<232>();
  const int tid = threadIdx.x - 128;
  typename Cfg::MmaVn mma_vn;
  typename Cfg::MmaO mma_o;
  typename Cfg::MmaS mma_s;
  auto thr_vn = mma_vn.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  auto thr_s = mma_s.get_thread_slice(tid);

  Tensor tBw = thr_vn.partition_fragment_B(sW);   // (MMA, N, K, stage) descriptors
  Tensor tBq = thr_vn.partition_fragment_B(sQ);
  Tensor tBa = thr_o.partition_fragment_B(sA);
  Tensor tBk = thr_s.partition_fragment_B(sKg);

  // Accumulators and their (row, column) coordinates.
  Tensor accS = partition_fragment_C(mma_s, Shape<_64, _128>{});   // S^T [v][k]
  Tensor accV = partition_fragment_C(mma_vn, Shape<_64, _64>{});   // v_new^T [v][row]
  Tensor accO = partition_fragment_C(mma_vn, Shape<_64, _64>{});   // o^T [v][row]
  const AccCoord ac = acc_coord(tid);
  static_assert(decltype(size(accS))::value == 64 && decltype(size(accV))::value == 32,
                "one 64 x N wgmma tile per accumulator");
  // A operands in registers: Sh^T (k = 128) and v_new^T (k = chunk rows).
  Tensor aS = thr_vn.partition_fragment_A(make_tensor(static_cast<Elt*>(nullptr), Shape<_64, _128>{}));
  Tensor aV = thr_o.partition_fragment_A(make_tensor(static_cast<Elt*>(nullptr), Shape<_64, _64>{}));

  const bool vf = p.state_v_first;
  const int64_t KV = int64_t(kK) * V;
  // The initial state (fp32, [K][V] or [V][K]) into S^T; zero without one.
  {
    const float* h0 = p.h0 != nullptr ? p.h0 + (n * HV + hv) * KV : nullptr;
    if (h0 != nullptr)
      for_state_elements(ac, v0, vf, [&](int i, int off) { accS(i) = h0[off]; });
    else
      clear(accS);
  }
  T* o = static_cast<T*>(p.o);
  T* v_new = static_cast<T*>(p.v_new);
  T* h = static_cast<T*>(p.h);
  const int64_t slot_base = p.varlen ? p.chunk_offsets[n] : b * p.NT;
  const float scale = p.scale;
  const int64_t vs = HV * V;  // row stride of o, v_new

  auto state = cutlass::PipelineState<Cfg::kStages>();
  for (int c = 0; c < nchunks; ++c) {
    const int64_t row0 = seq_row0 + int64_t(c) * kBT;
    const int L = static_cast<int>(seq_len - int64_t(c) * kBT < kBT ? seq_len - int64_t(c) * kBT : kBT);
    // Sh: the state rounded to T, as A operand (and as h, the state at the chunk's start).
    acc_to_a_operand<Elt>(accS, aS);
    if (h != nullptr) {
      T* hs = h + ((slot_base + c) * HV + hv) * KV;
      for_state_elements(ac, v0, vf, [&](int i, int off) { hs[off] = from_float<T>(accS(i)); });
    }
    pipeline.consumer_wait(state);
    const int s = state.index();

    // v_new^T = u^T - Sh^T w^T. (Register operands of wgmma are read asynchronously: the fences
    // keep the compiler from reusing aS / aV's registers before the wait that covers them.)
    clear(accV);
    warpgroup_fence_operand(aS);
    warpgroup_fence_operand(accV);
    warpgroup_arrive();
    gemm(mma_vn, aS, tBw(_, _, _, s), accV);
    warpgroup_commit_batch();
    // o^T = Sh^T qg^T (scaled below), issued behind it
    clear(accO);
    warpgroup_fence_operand(accO);
    warpgroup_arrive();
    gemm(mma_vn, aS, tBq(_, _, _, s), accO);
    warpgroup_commit_batch();
    warpgroup_wait<1>();
    warpgroup_fence_operand(accV);
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int vl = ac.m0 + 8 * ((i / 2) % 2), j = ac.n0 + 8 * (i / 4) + i % 2;
      const float uv = to_float<T>(reinterpret_cast<const T&>(sU(j, vl, s)));
      // rounded to T as the reference stores v_new; zero past the chunk's end
      accV(i) = j < L ? round_to<T>(uv - accV(i)) : 0.f;
    }
    acc_to_a_operand<Elt>(accV, aV);
    warpgroup_fence_operand(aV);
    if (v_new != nullptr)
      store_rows_staged<T, Cfg::kLdStage>(accV, reinterpret_cast<T*>(st.vn_stage.data()), ac, tid,
                                          v_new + row0 * vs + hv * kK + v0, vs, L);
    warpgroup_wait<0>();
    warpgroup_fence_operand(aS);
    warpgroup_fence_operand(accO);
#pragma unroll
    for (int i = 0; i < 32; ++i) accO(i) *= scale;
    // o^T += v_new^T Aqk^T
    warpgroup_fence_operand(accO);
    warpgroup_arrive();
    gemm(mma_o, aV, tBa(_, _, _, s), accO);
    warpgroup_commit_batch();
    // S^T = e^{G_last} S^T + v_new^T kg
#pragma unroll
    for (int i = 0; i < 64; ++i) accS(i) *= __expf(sG(ac.n0 + 8 * (i / 4) + i % 2, 0, s));
    warpgroup_fence_operand(accS);
    warpgroup_arrive();
    gemm(mma_s, aV, tBk(_, _, _, s), accS);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(aV);
    warpgroup_fence_operand(accO);
    warpgroup_fence_operand(accS);
    pipeline.consumer_release(state);
    ++state;
    store_rows_staged<T, Cfg::kLdStage>(accO, reinterpret_cast<T*>(st.o_stage.data()), ac, tid,
                                        o + row0 * vs + hv * kK + v0, vs, L);
  }
  if (p.final_state != nullptr) {
    float* fs = p.final_state + (n * HV + hv) * KV;
    for_state_elements(ac, v0, vf, [&](int i, int off) { fs[off] = accS(i); });
  }
}

}  // namespace sm90
}  // namespace cuda
}  // namespace kda_ext

// kda_ext CUDA backward: reverse state pass (dh per chunk, dv_new, dh0), one block per (sequence, value head, V slice).
#pragma once

#include "cuda/bwd_common.cuh"

namespace kda_ext {
namespace cuda {
namespace bwd {

// Shared-memory layout of bwd_state_kernel (every buffer 128-byte aligned) for V slices of BV
// columns. `half`: fp16/bf16 inputs, whose Aqk, do and qg tiles stay 16-bit (operands of
// smem_gemm16) and which stage the next operands in raw and qgt; fp32 inputs keep fp32 tiles and
// neither staging tile. BV = kBwdStateBVNarrow adds dvp (the second partial of dv_new, see the
// kernel) after the others, so the 32-column layout is the one it always was.
template <int BV>
struct BwdStateSmem {
  static_assert(BV == kBwdStateBV || BV == kBwdStateBVNarrow, "V slices of 32 or 16 columns");
  int64_t dS, op, aqk, dout, dvn, gam, dvp, raw, qgt, total;
  __host__ __device__ BwdStateSmem(int BT, int64_t Kp, bool half) {
    SmemCarver c;
    raw = qgt = 0;
    if (half) {
      raw = c.take<uint16_t>(BT * (Kp + 8));  // kg, then w, in flight, as stored
      qgt = c.take<uint16_t>(BT * (Kp + 8));  // qg, the operand itself
    }
    dS = c.take<float>(Kp * (BV + 4));
    op = c.take<float>(BT * (Kp + 4));
    if (half) {
      aqk = c.take<uint16_t>(BT * (BT + 8));
      dout = c.take<uint16_t>(BT * (BV + 8));
    } else {
      aqk = c.take<float>(BT * (BT + 4));
      dout = c.take<float>(BT * (BV + 4));
    }
    dvn = c.take<float>(BT * (BV + 4));
    gam = c.take<float>(Kp);
    dvp = 0;
    if constexpr (BV == kBwdStateBVNarrow) dvp = c.take<float>(BT * (BV + 4));
    total = c.offset;
  }
};

// Walks the sequence's chunks from last to first carrying dS = dLoss/d(state leaving the chunk):
//   dh[chunk] = dS
//   dv_new    = Aqk^T do + kg dS
//   dS       <- e^{G_last} (.)rows dS + scale qg^T do - w^T dv_new
// and finally dh0 = dS. dS and dv_new stay fp32 here; the copies stored for kernels A and B
// (dh, dvn) are rounded to T for fp16/bf16 inputs. The state slice [K x BV] lives in shared
// memory.
// BV, the V slice width (one block per (sequence, value head, slice)): every step above is
// independent per V column (column j of dv_new, dh and dS reads only column j of do, dS, dv_new
// and dht; Aqk, kg, qg, w and the gate multiply from the left or scale rows), so the slices never
// exchange anything and any width computes the same numbers per column. The width only sets how
// many blocks walk the chunks side by side: 32 columns (kBwdStateBV) normally; 16
// (kBwdStateBVNarrow) when N * HV * ceil(V / 32) blocks would leave SMs idle (launch_bwd.cu),
// e.g. (1, 32768, 16, 128): 64 blocks of 32 columns for 132 SMs, each walking 512 chunks, where
// 16 columns give 128 blocks whose chunk steps do about half the V-proportional work (dS's
// products, the element-wise passes, the dh and dv_new stores). BV = 16 is built for BT = 64
// only, where it keeps all 8 warps busy in dv_new's products by splitting kg dS over K (below;
// that only changes the order of dv_new's fp32 additions). The kg, qg, w and Aqk tiles are read
// by twice as many blocks, mostly from L2 (the blocks of one head walk the same chunks at about
// the same time).
// fp16/bf16 inputs: Aqk^T do and qg^T do multiply two T operands, so they run as T-typed wmma
// (smem_gemm16: m16n16k16, fp32 accumulators) straight from T tiles; only kg and w, whose other
// operand is fp32 (dS, dv_new), are widened into the fp32 operand tile op for their tf32
// products. Same products as one tf32 pass over widened copies (T values are exact in tf32),
// without widening qg, Aqk and do, and with one k16 step where tf32 took two k8 steps (SASS:
// 2 LDSM and 2 HMMA.16816 instead of 16 scalar LDS, each with a tf32 rounding, and 8
// HMMA.1684; a 16 x 16 tile of either product: ~60 instructions instead of ~360); scale
// multiplies the finished qg^T do (fp32) instead of do, whose scaled values T could not hold.
// With K % 8 == 0 the operands arrive by cp.async one step ahead: kg of the next chunk (into
// raw) during qg^T do and w^T dv_new, qg (into qgt) and w (into raw once kg is widened) during
// dv_new's products: plain loads left each of the three a full memory round trip per chunk on
// the sequential path (ncu: long-scoreboard stalls).
// fp32 inputs: qg, kg and w pass through op in turn, loaded when their product comes; every
// product is 3xTF32 on fp32 tiles (kSplitTF32).
// BT (== p.BT, 32 or 64) is a template parameter: the per-element divisions by BT and BT / 8,
// the loop bounds and the GEMM shapes fold to constants (the kernel is issue-bound: ncu, H200,
// ~6.4K instructions per warp per chunk, ~400 of them MMAs). kFixedKp, when not 0, is
// align_up(K, 16) as a constant for the same reason (the host passes 64, 128 or 256 for K in 49..64, 113..128, 241..256):
// then the operand tiles' leading dimensions are too, and a wmma load with a run-time leading
// dimension costs an IMAD per element (chunk_state_output: static SASS -43% the same way).
// Two blocks per SM is what the shared memory allows at K = 128 (~109 KB each); saying so lets
// ptxas use up to 128 registers: without it, it gave the compile-time K builds 80 registers and
// spilled (4 bytes at K = 128, 80 bytes of loads at K = 256).
template <typename T, int BT, int kFixedKp = 0, int BV = kBwdStateBV>
__global__ void __launch_bounds__(kBwdStateThreads, 2)
bwd_state_kernel(const ChunkKdaBwdParams p) {
  static_assert(BV == kBwdStateBV || (BV == kBwdStateBVNarrow && BT == 64 &&
                                      kBwdStateThreads == 2 * (BT / 16) * 32),
                "16-column slices: dv_new's split below is derived for 4 tiles on 8 warps");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // Element type of the Aqk and do tiles: T as stored (fp16/bf16), fp32 for fp32 inputs.
  constexpr bool k16 = sizeof(T) == 2;
  using Tile = typename std::conditional<k16, T, float>::type;
  const int64_t K = p.K, V = p.V, HV = p.HV;
  const int Kp = kFixedKp > 0 ? kFixedKp : static_cast<int>(align_up(K, 16));
  const BwdStateSmem<BV> L(BT, Kp, k16);
  float* dS = reinterpret_cast<float*>(smem_raw + L.dS);
  float* op = reinterpret_cast<float*>(smem_raw + L.op);
  Tile* aqk = reinterpret_cast<Tile*>(smem_raw + L.aqk);
  Tile* dout = reinterpret_cast<Tile*>(smem_raw + L.dout);
  float* dvn = reinterpret_cast<float*>(smem_raw + L.dvn);
  float* gam = reinterpret_cast<float*>(smem_raw + L.gam);
  float* dvp = reinterpret_cast<float*>(smem_raw + L.dvp);  // BV = 16 only
  constexpr int ldS = BV + 4;
  const int ldO = Kp + 4;
  // 16-bit tiles pad rows by 8 elements (wmma: ld % 8 == 0; 16 bytes shift consecutive rows by
  // four banks, so the 8 rows of a fragment load hit different banks), fp32 tiles by 4 floats.
  constexpr int ldA = BT + (k16 ? 8 : 4);
  constexpr int ldD = BV + (k16 ? 8 : 4);
  const int ldR = Kp + 8;

  const int64_t n = blockIdx.x, hv = blockIdx.y;
  const int64_t v0 = static_cast<int64_t>(blockIdx.z) * BV;
  if (n >= p.N || hv >= HV || v0 >= V) return;
  const int64_t bos = p.seq_bounds[n], eos = p.seq_bounds[n + 1];
  const int64_t nchunks = eos > bos ? (eos - bos + BT - 1) / BT : 0;
  const int64_t slot0 = p.chunk_offsets[n];
  const T* Aqk = static_cast<const T*>(p.Aqk);
  const T* qg = static_cast<const T*>(p.qg);
  const T* kg = static_cast<const T*>(p.kg);
  const T* w = static_cast<const T*>(p.w);
  const T* dO = static_cast<const T*>(p.dout);
  // dh and dvn are stored in T (see ChunkKdaBwdParams); kDhVec elements per 16-byte dh store.
  constexpr int kDhVec = 16 / static_cast<int>(sizeof(T));
  static_assert(BV % kDhVec == 0, "dh stores: whole 16-byte vectors per V slice");

  // dht follows the state layout: walk it along its contiguous axis so that loads coalesce.
  const bool vf = p.state_v_first;
  staged_for<8, float>(
      Kp * BV,
      [&](int idx) {
        const int kk = vf ? idx % Kp : idx / BV, vv = vf ? idx / Kp : idx % BV;
        return (p.dht != nullptr && kk < K && v0 + vv < V)
                   ? p.dht[state_off(p, n * HV + hv, kk, static_cast<int>(v0 + vv))]
                   : 0.f;
      },
      [&](int idx, float x) {
        const int kk = vf ? idx % Kp : idx / BV, vv = vf ? idx / Kp : idx % BV;
        dS[kk * ldS + vv] = x;
      });
  __syncthreads();

  // Prefetched operands (see above), 8 elements per copy into [BT x Kp] tiles of leading
  // dimension ldR: raw (kg, then w; widened into op) and qgt (qg, read by its product as is).
  T* raw = reinterpret_cast<T*>(smem_raw + L.raw);
  T* qgt = reinterpret_cast<T*>(smem_raw + L.qgt);
  const bool prefetch = k16 && K % 8 == 0 && aligned16(kg) && aligned16(qg) && aligned16(w);
  const int nv = Kp / 8;  // 16-byte vectors per row of a staged tile
  // When the block's threads are a multiple of nv (Kp = 16, 32, 64, 128, 256), each thread keeps
  // one vector column (c8v) and walks rows rstep apart from r0v: the loops below then need no
  // division per vector (a division by the run-time nv is ~20 integer instructions, and this
  // kernel is issue-bound). Other Kp take the general idx / nv path.
  const bool col_walk = blockDim.x % nv == 0;
  const int c8v = static_cast<int>(threadIdx.x % nv) * 8;
  const int r0v = static_cast<int>(threadIdx.x / nv);
  const int rstep = static_cast<int>(blockDim.x / nv);
  auto chunk_len = [&](int64_t c) {
    const int64_t t0 = bos + c * BT;
    return static_cast<int>(eos - t0 < BT ? eos - t0 : BT);
  };
  // dst <- src's [BT x K] rows of chunk c. Rows past the chunk and columns past K arrive as
  // zeros (a zero-length copy fills 16 zero bytes).
  auto issue = [&](T* dst, const T* src, int64_t c) {
    const int64_t t0 = bos + c * BT;
    const int len_c = chunk_len(c);
    if (col_walk) {
      const bool col_ok = c8v < K;
      for (int r = r0v; r < BT; r += rstep) {
        const bool ok = r < len_c && col_ok;
        cp_async16(dst + r * ldR + c8v, ok ? src + ((t0 + r) * HV + hv) * K + c8v : src, ok);
      }
    } else {
      for (int idx = threadIdx.x; idx < BT * nv; idx += blockDim.x) {
        const int r = idx / nv, c8 = (idx - r * nv) * 8;
        const bool ok = r < len_c && c8 < K;
        cp_async16(dst + r * ldR + c8, ok ? src + ((t0 + r) * HV + hv) * K + c8 : src, ok);
      }
    }
    cp_async_commit();
  };
  // Waits for every copy in flight, then op <- raw widened to fp32 (the caller made sure op is
  // no longer read); the leading barrier also publishes the block's shared-memory writes before
  // it, the trailing one frees raw for the next copy.
  auto land = [&]() {
    cp_async_wait<0>();
    __syncthreads();
    auto widen = [&](int r, int c8) {
      const uint4 x = *reinterpret_cast<const uint4*>(raw + r * ldR + c8);
      const T* e = reinterpret_cast<const T*>(&x);
      float* d = op + r * ldO + c8;
      *reinterpret_cast<float4*>(d) = make_float4(to_float<T>(e[0]), to_float<T>(e[1]),
                                                  to_float<T>(e[2]), to_float<T>(e[3]));
      *reinterpret_cast<float4*>(d + 4) = make_float4(to_float<T>(e[4]), to_float<T>(e[5]),
                                                      to_float<T>(e[6]), to_float<T>(e[7]));
    };
    if (col_walk) {
      for (int r = r0v; r < BT; r += rstep) widen(r, c8v);
    } else {
      for (int idx = threadIdx.x; idx < BT * nv; idx += blockDim.x) {
        const int r = idx / nv;
        widen(r, (idx - r * nv) * 8);
      }
    }
    __syncthreads();
  };
  if (prefetch && nchunks > 0) issue(raw, kg, nchunks - 1);

  for (int64_t c = nchunks - 1; c >= 0; --c) {
    const int64_t slot = slot0 + c;
    if (slot < 0 || slot >= p.B * p.NT) {  // impossible for a sane prefix sum
      if (prefetch) {  // keep the staging tile in step: it must hold kg of chunk c - 1 next
        cp_async_wait<0>();
        __syncthreads();
        if (c > 0) issue(raw, kg, c - 1);
      }
      continue;
    }
    const int64_t tok0 = bos + c * BT;
    const int len = chunk_len(c);

    // dh[slot] = dS (state gradient at the chunk's end), always [K, V], stored in T (fp16/bf16
    // rounded, as FLA stores dh; dS itself stays fp32).
    if (V % kDhVec == 0) {  // 16-byte stores (dh rows are 16-byte aligned then; ldS % 4 == 0)
      for (int idx = threadIdx.x; idx < K * (BV / kDhVec); idx += blockDim.x) {
        const int kk = idx / (BV / kDhVec), vv = (idx % (BV / kDhVec)) * kDhVec;
        if (v0 + vv < V)
          store_vec16<T>(static_cast<T*>(p.dh) + ((slot * HV + hv) * K + kk) * V + v0 + vv,
                         dS + kk * ldS + vv);
      }
    } else {
      for (int idx = threadIdx.x; idx < K * BV; idx += blockDim.x) {
        const int kk = idx / BV, vv = idx % BV;
        if (v0 + vv < V)
          static_cast<T*>(p.dh)[((slot * HV + hv) * K + kk) * V + v0 + vv] =
              from_float<T>(dS[kk * ldS + vv]);
      }
    }
    if (prefetch) {
      land();  // op <- kg (the previous chunk's last product has finished reading op)
      // qgt was last read by the previous chunk's qg^T do, raw has just been emptied.
      issue(qgt, qg, c);
      issue(raw, w, c);
    } else {
      load_tile<T>(op, ldO, BT, Kp, kg, tok0, len, HV, hv, K, 0);
      if constexpr (k16) copy_tile<T>(qgt, ldR, BT, Kp, qg, tok0, len, HV, hv, K, 0);
    }
    if constexpr (k16) {
      copy_chunk_matrix<T, BT>(aqk, ldA, Aqk, tok0, len, HV, hv, false);
      copy_tile<T>(dout, ldD, BT, BV, dO, tok0, len, HV, hv, V, v0);
    } else {
      load_chunk_matrix<T, BT>(aqk, ldA, Aqk, tok0, len, HV, hv, false);
      load_tile<T>(dout, ldD, BT, BV, dO, tok0, len, HV, hv, V, v0);
    }
    for (int kk = threadIdx.x; kk < Kp; kk += blockDim.x)
      gam[kk] = kk < K ? expf(p.g_cum[((tok0 + len - 1) * HV + hv) * K + kk]) : 0.f;
    __syncthreads();

    if constexpr (BV == kBwdStateBV) {
      // dv_new = Aqk^T do + kg dS (same tile->warp map for both calls).
      if constexpr (k16) {
        smem_gemm16<T, true, false>(dvn, ldS, aqk, ldA, dout, ldD, BT, BV, BT, 1.f, false);
      } else {
        smem_gemm<true, false, kSplitTF32<T>>(
            dvn, ldS, aqk, ldA, dout, ldD, BT, BV, BT, false);
      }
      smem_gemm<false, false, kSplitTF32<T>>(
          dvn, ldS, op, ldO, dS, ldS, BT, BV, Kp, true);
    } else {
      // 16 columns: dv_new [64 x 16] is 4 output tiles for 8 warps (with 32 columns: 8 tiles,
      // one a warp). Split over K instead of leaving half the warps idle on the longest chain of
      // the step: warps 0-3 put Aqk^T do + kg[:, :Ks] dS[:Ks, :] into dvn (the helpers map tile
      // t to warp t, so warps 4-7 skip both calls), warps 4-7 at the same time put
      // kg[:, Ks:] dS[Ks:, :] into dvp, tile warp - 4 (row block), and the element-wise pass
      // below adds the two. Ks balances the two groups' MMA steps: with 16-bit inputs Aqk^T do
      // is a few k16 steps, so K is halved; with fp32 inputs it costs as much as BT columns of
      // kg dS (3xTF32, k8 steps both), so group 0 takes (Kp - BT) / 2 of K (0 for Kp <= BT).
      // Kp and BT are multiples of 16: Ks is a multiple of 8 (one tf32 k step; the operand
      // origins op + Ks and dS + Ks * ldS stay 32-byte aligned).
      const int Ks = k16 ? Kp / 2 : (Kp > BT ? (Kp - BT) / 2 : 0);
      if constexpr (k16) {
        smem_gemm16<T, true, false>(dvn, ldS, aqk, ldA, dout, ldD, BT, BV, BT, 1.f, false);
      } else {
        smem_gemm<true, false, kSplitTF32<T>>(
            dvn, ldS, aqk, ldA, dout, ldD, BT, BV, BT, false);
      }
      smem_gemm<false, false, kSplitTF32<T>>(
          dvn, ldS, op, ldO, dS, ldS, BT, BV, Ks, true);
      constexpr int kTiles = BT / 16;
      const int warp = static_cast<int>(threadIdx.x >> 5);
      if (warp >= kTiles && warp < 2 * kTiles) {  // one tile each (2 * kTiles warps: static_assert)
        const int i = warp - kTiles;
        AccFrag<float> acc;
        wmma::fill_fragment(acc, 0.f);
        const float* a = op + i * 16 * ldO + Ks;
        const float* b = dS + Ks * ldS;
        if constexpr (kSplitTF32<T>) {
          mma_16x16_split_tf32<wmma::row_major, wmma::row_major>(acc, a, ldO, b, ldS, Kp - Ks);
        } else {
          mma_16x16<float, wmma::row_major, wmma::row_major>(acc, a, ldO, b, ldS, Kp - Ks);
        }
        store_acc_shared<float>(dvp + i * 16 * ldS, acc, ldS);
      }
    }
    __syncthreads();

    for (int idx = threadIdx.x; idx < BT * BV; idx += blockDim.x) {
      const int r = idx / BV, vv = idx % BV;
      float x = dvn[r * ldS + vv];
      if constexpr (BV == kBwdStateBVNarrow) x += dvp[r * ldS + vv];  // kg[:, Ks:] dS[Ks:, :]
      if (r < len && v0 + vv < V)  // stored in T (rounded for fp16/bf16), dvn keeps fp32 x
        static_cast<T*>(p.dvn)[((tok0 + r) * HV + hv) * V + v0 + vv] = from_float<T>(x);
      dvn[r * ldS + vv] = -x;  // the w term enters with a minus sign
      if constexpr (!k16) dout[r * ldD + vv] *= p.scale;  // (16-bit: smem_gemm16 scales)
    }
    for (int idx = threadIdx.x; idx < Kp * BV; idx += blockDim.x) {
      const int kk = idx / BV, vv = idx % BV;
      dS[kk * ldS + vv] *= gam[kk];
    }

    if constexpr (k16) {
      // dS += scale qg^T do - w^T dv_new: both products need op = w (its copy has been in
      // flight since the chunk began) and the element-wise pass above published.
      if (prefetch) {
        land();  // op <- w; its leading barrier publishes the pass above
        if (c > 0) issue(raw, kg, c - 1);
      } else {
        __syncthreads();  // op is free (dv_new's products are done)
        load_tile<T>(op, ldO, BT, Kp, w, tok0, len, HV, hv, K, 0);
        __syncthreads();
      }
      // Same tile->warp map for both calls (M = Kp, N = BV): no barrier between them.
      smem_gemm16<T, true, false>(dS, ldS, qgt, ldR, dout, ldD, Kp, BV, BT, p.scale, true);
      smem_gemm<true, false, kSplitTF32<T>>(
          dS, ldS, op, ldO, dvn, ldS, Kp, BV, BT, true);
      __syncthreads();
    } else {
      __syncthreads();
      load_tile<T>(op, ldO, BT, Kp, qg, tok0, len, HV, hv, K, 0);
      __syncthreads();
      smem_gemm<true, false, kSplitTF32<T>>(
          dS, ldS, op, ldO, dout, ldD, Kp, BV, BT, true);
      __syncthreads();
      load_tile<T>(op, ldO, BT, Kp, w, tok0, len, HV, hv, K, 0);
      __syncthreads();
      smem_gemm<true, false, kSplitTF32<T>>(
          dS, ldS, op, ldO, dvn, ldS, Kp, BV, BT, true);
      __syncthreads();
    }
  }
  cp_async_wait<0>();  // nothing is left in flight past the last chunk; kept for safety

  if (p.dh0 != nullptr) {
    for (int idx = threadIdx.x; idx < K * BV; idx += blockDim.x) {
      const int kk = vf ? idx % K : idx / BV, vv = vf ? idx / K : idx % BV;
      if (v0 + vv < V)
        p.dh0[state_off(p, n * HV + hv, kk, static_cast<int>(v0 + vv))] = dS[kk * ldS + vv];
    }
  }
}

}  // namespace bwd
}  // namespace cuda
}  // namespace kda_ext

// kda_ext CUDA backward: reverse state pass (dh per chunk, dv_new, dh0), one block per (sequence, value head, V slice).
#pragma once

#include "cuda/bwd_common.cuh"

namespace kda_ext {
namespace cuda {
namespace bwd {

// Shared-memory layout of bwd_state_kernel (floats; every buffer 128-byte aligned).
struct BwdStateSmem {
  int64_t dS, op, aqk, dout, dvn, gam, raw, total;
  __host__ __device__ BwdStateSmem(int BT, int64_t Kp) {
    SmemCarver c;
    raw = c.take<uint16_t>(BT * Kp);  // the next [BT x K] operand in flight (16-bit inputs)
    dS = c.take<float>(Kp * (kBwdStateBV + 4));
    op = c.take<float>(BT * (Kp + 4));
    aqk = c.take<float>(BT * (BT + 4));
    dout = c.take<float>(BT * (kBwdStateBV + 4));
    dvn = c.take<float>(BT * (kBwdStateBV + 4));
    gam = c.take<float>(Kp);
    total = c.offset;
  }
};

// Walks the sequence's chunks from last to first carrying dS = dLoss/d(state leaving the chunk):
//   dh[chunk] = dS
//   dv_new    = Aqk^T do + kg dS
//   dS       <- e^{G_last} (.)rows dS + scale qg^T do - w^T dv_new
// and finally dh0 = dS. The state slice [K x 32] lives in shared memory; qg, kg and w pass
// through one [BT x K] operand buffer in turn. For fp16/bf16 inputs with K % 8 == 0 the next of
// them is copied (cp.async, raw) into a staging tile while the current products run and is
// widened to fp32 when its turn comes: the plain loads left each of the three a full memory
// round trip per chunk on the sequential path (ncu: long-scoreboard stalls).
// BT (== p.BT, 32 or 64) is a template parameter: the per-element divisions by BT and BT / 8,
// the loop bounds and the GEMM shapes fold to constants (the kernel is issue-bound: ncu, H200,
// ~6.4K instructions per warp per chunk, ~400 of them MMAs). kFixedKp, when not 0, is
// align_up(K, 16) as a constant for the same reason (the host passes 64, 128 or 256 for K in 49..64, 113..128, 241..256):
// then the operand tile's leading dimension is one too, and a wmma load with a run-time leading
// dimension costs an IMAD per element (chunk_state_output: static SASS -43% the same way).
// Two blocks per SM is what the shared memory allows at K = 128 (~103 KB each); saying so lets
// ptxas use up to 128 registers: without it, it gave the compile-time K builds 80 registers and
// spilled (4 bytes at K = 128, 80 bytes of loads at K = 256).
template <typename T, int BT, int kFixedKp = 0>
__global__ void __launch_bounds__(kBwdStateThreads, 2)
bwd_state_kernel(const ChunkKdaBwdParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int64_t K = p.K, V = p.V, HV = p.HV;
  const int Kp = kFixedKp > 0 ? kFixedKp : static_cast<int>(align_up(K, 16));
  const BwdStateSmem L(BT, Kp);
  float* dS = reinterpret_cast<float*>(smem_raw + L.dS);
  float* op = reinterpret_cast<float*>(smem_raw + L.op);
  float* aqk = reinterpret_cast<float*>(smem_raw + L.aqk);
  float* dout = reinterpret_cast<float*>(smem_raw + L.dout);
  float* dvn = reinterpret_cast<float*>(smem_raw + L.dvn);
  float* gam = reinterpret_cast<float*>(smem_raw + L.gam);
  constexpr int BV = kBwdStateBV, ldS = kBwdStateBV + 4;
  const int ldO = Kp + 4;
  constexpr int ldA = BT + 4;

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

  // Prefetched operands (see above): raw holds the next tile as stored, 8 elements per copy.
  T* raw = reinterpret_cast<T*>(smem_raw + L.raw);
  const bool prefetch = sizeof(T) == 2 && K % 8 == 0 && aligned16(kg) && aligned16(qg) &&
                        aligned16(w);
  const int nv = Kp / 8;  // 16-byte vectors per row of raw
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
  // Rows past the chunk and columns past K arrive as zeros (a zero-length copy fills 16 zero bytes).
  auto issue = [&](const T* src, int64_t c) {
    const int64_t t0 = bos + c * BT;
    const int len_c = chunk_len(c);
    if (col_walk) {
      const bool col_ok = c8v < K;
      for (int r = r0v; r < BT; r += rstep) {
        const bool ok = r < len_c && col_ok;
        cp_async16(raw + r * Kp + c8v, ok ? src + ((t0 + r) * HV + hv) * K + c8v : src, ok);
      }
    } else {
      for (int idx = threadIdx.x; idx < BT * nv; idx += blockDim.x) {
        const int r = idx / nv, c8 = (idx - r * nv) * 8;
        const bool ok = r < len_c && c8 < K;
        cp_async16(raw + r * Kp + c8, ok ? src + ((t0 + r) * HV + hv) * K + c8 : src, ok);
      }
    }
    cp_async_commit();
  };
  // op <- raw widened to fp32 (the caller made sure op is no longer read).
  auto land = [&]() {
    cp_async_wait<0>();
    __syncthreads();
    auto widen = [&](int r, int c8) {
      const uint4 x = *reinterpret_cast<const uint4*>(raw + r * Kp + c8);
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
  if (prefetch && nchunks > 0) issue(kg, nchunks - 1);

  for (int64_t c = nchunks - 1; c >= 0; --c) {
    const int64_t slot = slot0 + c;
    if (slot < 0 || slot >= p.B * p.NT) {  // impossible for a sane prefix sum
      if (prefetch) {  // keep the staging tile in step: it must hold kg of chunk c - 1 next
        cp_async_wait<0>();
        __syncthreads();
        if (c > 0) issue(kg, c - 1);
      }
      continue;
    }
    const int64_t tok0 = bos + c * BT;
    const int len = chunk_len(c);

    // dh[slot] = dS (state gradient at the chunk's end), always [K, V].
    if (V % 4 == 0) {  // float4 stores (dh rows are 16-byte aligned then; ldS % 4 == 0)
      for (int idx = threadIdx.x; idx < K * (BV / 4); idx += blockDim.x) {
        const int kk = idx / (BV / 4), vv = (idx % (BV / 4)) * 4;
        if (v0 + vv < V)
          *reinterpret_cast<float4*>(p.dh + ((slot * HV + hv) * K + kk) * V + v0 + vv) =
              *reinterpret_cast<const float4*>(dS + kk * ldS + vv);
      }
    } else {
      for (int idx = threadIdx.x; idx < K * BV; idx += blockDim.x) {
        const int kk = idx / BV, vv = idx % BV;
        if (v0 + vv < V) p.dh[((slot * HV + hv) * K + kk) * V + v0 + vv] = dS[kk * ldS + vv];
      }
    }
    if (prefetch) land();  // op <- kg (the previous chunk's last product has finished reading op)
    else load_tile<T>(op, ldO, BT, Kp, kg, tok0, len, HV, hv, K, 0);
    load_chunk_matrix<T, BT>(aqk, ldA, Aqk, tok0, len, HV, hv, false);
    load_tile<T>(dout, ldS, BT, BV, dO, tok0, len, HV, hv, V, v0);
    for (int kk = threadIdx.x; kk < Kp; kk += blockDim.x)
      gam[kk] = kk < K ? expf(p.g_cum[((tok0 + len - 1) * HV + hv) * K + kk]) : 0.f;
    __syncthreads();
    if (prefetch) issue(qg, c);  // raw was emptied by land()

    // dv_new = Aqk^T do + kg dS (same tile->warp map for both calls).
    smem_gemm<true, false, kSplitTF32<T>>(
        dvn, ldS, aqk, ldA, dout, ldS, BT, BV, BT, false);
    smem_gemm<false, false, kSplitTF32<T>>(
        dvn, ldS, op, ldO, dS, ldS, BT, BV, Kp, true);
    __syncthreads();

    for (int idx = threadIdx.x; idx < BT * BV; idx += blockDim.x) {
      const int r = idx / BV, vv = idx % BV;
      const float x = dvn[r * ldS + vv];
      if (r < len && v0 + vv < V) p.dvn[((tok0 + r) * HV + hv) * V + v0 + vv] = x;
      dvn[r * ldS + vv] = -x;  // the w term enters with a minus sign
      dout[r * ldS + vv] *= p.scale;
    }
    for (int idx = threadIdx.x; idx < Kp * BV; idx += blockDim.x) {
      const int kk = idx / BV, vv = idx % BV;
      dS[kk * ldS + vv] *= gam[kk];
    }
    __syncthreads();

    if (prefetch) {
      land();  // op <- qg
      issue(w, c);
    } else {
      load_tile<T>(op, ldO, BT, Kp, qg, tok0, len, HV, hv, K, 0);
      __syncthreads();
    }
    smem_gemm<true, false, kSplitTF32<T>>(
        dS, ldS, op, ldO, dout, ldS, Kp, BV, BT, true);
    __syncthreads();

    if (prefetch) {
      land();  // op <- w
      if (c > 0) issue(kg, c - 1);
    } else {
      load_tile<T>(op, ldO, BT, Kp, w, tok0, len, HV, hv, K, 0);
      __syncthreads();
    }
    smem_gemm<true, false, kSplitTF32<T>>(
        dS, ldS, op, ldO, dvn, ldS, Kp, BV, BT, true);
    __syncthreads();
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

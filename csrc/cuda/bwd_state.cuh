// kda_ext CUDA backward: reverse state pass (dh per chunk, dv_new, dh0), one block per (sequence, value head, V slice).
#pragma once

#include "cuda/bwd_common.cuh"

namespace kda_ext {
namespace cuda {
namespace bwd {

// Shared-memory layout of bwd_state_kernel (floats; every buffer 128-byte aligned).
struct BwdStateSmem {
  int64_t dS, op, aqk, dout, dvn, gam, total;
  __host__ __device__ BwdStateSmem(int BT, int64_t Kp) {
    SmemCarver c;
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
// through one [BT x K] operand buffer in turn.
template <typename T>
__global__ void __launch_bounds__(kBwdStateThreads)
bwd_state_kernel(const ChunkKdaBwdParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int BT = p.BT;
  const int64_t K = p.K, V = p.V, HV = p.HV;
  const int Kp = static_cast<int>(align_up(K, 16));
  const BwdStateSmem L(BT, Kp);
  float* dS = reinterpret_cast<float*>(smem_raw + L.dS);
  float* op = reinterpret_cast<float*>(smem_raw + L.op);
  float* aqk = reinterpret_cast<float*>(smem_raw + L.aqk);
  float* dout = reinterpret_cast<float*>(smem_raw + L.dout);
  float* dvn = reinterpret_cast<float*>(smem_raw + L.dvn);
  float* gam = reinterpret_cast<float*>(smem_raw + L.gam);
  constexpr int BV = kBwdStateBV, ldS = kBwdStateBV + 4;
  const int ldO = Kp + 4, ldA = BT + 4;

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

  for (int64_t c = nchunks - 1; c >= 0; --c) {
    const int64_t slot = slot0 + c;
    if (slot < 0 || slot >= p.B * p.NT) continue;  // impossible for a sane prefix sum
    const int64_t tok0 = bos + c * BT;
    const int len = static_cast<int>(eos - tok0 < BT ? eos - tok0 : BT);

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
    load_tile<T>(op, ldO, BT, Kp, kg, tok0, len, HV, hv, K, 0);
    load_chunk_matrix<T>(aqk, ldA, Aqk, tok0, len, HV, hv, BT, false);
    load_tile<T>(dout, ldS, BT, BV, dO, tok0, len, HV, hv, V, v0);
    for (int kk = threadIdx.x; kk < Kp; kk += blockDim.x)
      gam[kk] = kk < K ? expf(p.g_cum[((tok0 + len - 1) * HV + hv) * K + kk]) : 0.f;
    __syncthreads();

    // dv_new = Aqk^T do + kg dS (same tile->warp map for both calls).
    smem_gemm<true, false, kHalf<T>, kHalf<T>>(dvn, ldS, aqk, ldA, dout, ldS, BT, BV, BT, false);
    smem_gemm<false, false, kHalf<T>, false>(dvn, ldS, op, ldO, dS, ldS, BT, BV, Kp, true);
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

    load_tile<T>(op, ldO, BT, Kp, qg, tok0, len, HV, hv, K, 0);
    __syncthreads();
    smem_gemm<true, false, kHalf<T>, false>(dS, ldS, op, ldO, dout, ldS, Kp, BV, BT, true);
    __syncthreads();

    load_tile<T>(op, ldO, BT, Kp, w, tok0, len, HV, hv, K, 0);
    __syncthreads();
    smem_gemm<true, false, kHalf<T>, false>(dS, ldS, op, ldO, dvn, ldS, Kp, BV, BT, true);
    __syncthreads();
  }

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

// kda_ext CPU backend: reverse pass of the inter-chunk state recurrence (dh, dv_new, dh0).
#include <algorithm>
#include <cmath>
#include <utility>

#include "cpu/chunk_bwd.h"

namespace kda_ext {
namespace cpu {

int64_t state_bwd_work_size(const Params& p) {
  return 2 * p.K * p.V + p.BT * p.BT + p.BT * p.V + 3 * p.BT * p.K;
}

// Per chunk (S = state entering it, S' = state leaving it, G_last its last g_cum row):
//   v_new = u - w S,  o = scale qg S + Aqk v_new,  S' = e^{G_last} (.)rows S + kg^T v_new.
// Walking the chunks backwards with dS = dLoss/dS':
//   dv_new = Aqk^T do + kg dS,  dLoss/dS = e^{G_last} (.)rows dS + scale qg^T do - w^T dv_new.
template <class T>
void state_bwd_item(const BwdParams<T>& bp, int64_t n, int64_t hv, T* work) {
  const Params& p = bp.p;
  const int64_t BT = p.BT, K = p.K, V = p.V, HV = p.HV, KV = p.K * p.V;
  const SeqLayout& s = p.layout;
  T* dS = work;
  T* dSn = dS + KV;
  T* A = dSn + KV;
  T* dO = A + BT * BT;
  T* qg = dO + BT * V;
  T* kg = qg + BT * K;
  T* w = kg + BT * K;

  if (bp.dht) {
    const T* src = bp.dht + (n * HV + hv) * KV;
    if (p.state_v_first) {
      for (int64_t a = 0; a < K; ++a)
        for (int64_t b = 0; b < V; ++b) dS[a * V + b] = src[b * K + a];
    } else {
      std::copy(src, src + KV, dS);
    }
  } else {
    std::fill(dS, dS + KV, T(0));
  }

  const Dt dt = p.qkv_dt;
  for (int64_t c = s.num_chunks(n) - 1; c >= 0; --c) {
    const int64_t L = s.chunk_rows(n, c), r0 = s.bos[n] + c * BT, slot = s.slot0[n] + c;
    std::copy(dS, dS + KV, bp.dh + (slot * HV + hv) * KV);

    load_rows(elem_ptr(bp.Aqk, dt, (r0 * HV + hv) * BT), dt, HV * BT, L, L, A, BT);
    for (int64_t i = 0; i < L; ++i) std::fill(A + i * BT + i + 1, A + i * BT + L, T(0));
    load_rows(elem_ptr(bp.dout, bp.dout_dt, (r0 * HV + hv) * V), bp.dout_dt, HV * V, L, V, dO, V);
    load_rows(elem_ptr(bp.qg, dt, (r0 * HV + hv) * K), dt, HV * K, L, K, qg, K);
    load_rows(elem_ptr(bp.kg, dt, (r0 * HV + hv) * K), dt, HV * K, L, K, kg, K);
    load_rows(elem_ptr(bp.w, dt, (r0 * HV + hv) * K), dt, HV * K, L, K, w, K);

    T* dvn = bp.dvn + (r0 * HV + hv) * V;
    for (int64_t i = 0; i < L; ++i) std::fill(dvn + i * HV * V, dvn + i * HV * V + V, T(0));
    gemm_tn(L, V, L, A, BT, dO, V, dvn, HV * V);
    gemm_nn(L, V, K, kg, K, dS, V, dvn, HV * V);

    const T* Glast = bp.g_cum + ((r0 + L - 1) * HV + hv) * K;
    for (int64_t a = 0; a < K; ++a) {
      const T e = std::exp(Glast[a]);
      for (int64_t b = 0; b < V; ++b) dSn[a * V + b] = e * dS[a * V + b];
    }
    gemm_tn(K, V, L, qg, K, dO, V, dSn, V, static_cast<T>(p.scale));
    gemm_tn(K, V, L, w, K, dvn, HV * V, dSn, V, T(-1));
    std::swap(dS, dSn);
  }
  std::copy(dS, dS + KV, bp.dh0 + (n * HV + hv) * KV);
}

template void state_bwd_item<float>(const BwdParams<float>&, int64_t, int64_t, float*);
template void state_bwd_item<double>(const BwdParams<double>&, int64_t, int64_t, double*);

}  // namespace cpu
}  // namespace kda_ext

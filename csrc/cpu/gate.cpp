// kda_ext CPU stage "gate": q/k l2norm, beta sigmoid, in-kernel gates and the chunk-local cumsum.
#include "cpu/gate.h"

namespace kda_ext {
namespace cpu {

template <class T>
T l2norm_row(const T* x, int64_t K, T* y, Dt dt) {
  T ss = T(0);
  for (int64_t c = 0; c < K; ++c) ss += x[c] * x[c];
  const T rstd = T(1) / std::sqrt(ss + T(1e-6));
  for (int64_t c = 0; c < K; ++c) y[c] = round_to(x[c] * rstd, dt);
  return rstd;
}

template <class T>
T beta_value(const Params& p, T raw) {
  if (!p.use_beta_sigmoid) return raw;
  return (p.allow_neg_eigval ? T(2) : T(1)) * sigmoid(raw);
}

template <class T>
void load_chunk_inputs(const Params& p, const WorkItem& wi, int64_t r0, int64_t L, T* qh, T* kh,
                       T* v, T* beta) {
  const int64_t K = p.K, V = p.V, BT = p.BT, H = p.H, HV = p.HV;
  const size_t qsz = p.qkv_dt == Dt::Double ? 8 : (p.qkv_dt == Dt::Float ? 4 : 2);
  const char* q0 = static_cast<const char*>(p.q) + (r0 * H + wi.h) * K * qsz;
  const char* k0 = static_cast<const char*>(p.k) + (r0 * H + wi.h) * K * qsz;
  const char* v0 = static_cast<const char*>(p.v) + (r0 * HV + wi.hv) * V * qsz;
  load_rows(q0, p.qkv_dt, H * K, L, K, qh, K);
  load_rows(k0, p.qkv_dt, H * K, L, K, kh, K);
  load_rows(v0, p.qkv_dt, HV * V, L, V, v, V);
  if (p.use_qk_l2norm) {
    for (int64_t i = 0; i < L; ++i) {
      l2norm_row(qh + i * K, K, qh + i * K, p.qkv_dt);
      l2norm_row(kh + i * K, K, kh + i * K, p.qkv_dt);
    }
  }
  for (int64_t i = 0; i < L; ++i)
    beta[i] = beta_value(p, read_scalar<T>(p.beta, p.beta_dt, (r0 + i) * HV + wi.hv));
  std::fill(qh + L * K, qh + BT * K, T(0));
  std::fill(kh + L * K, kh + BT * K, T(0));
  std::fill(v + L * V, v + BT * V, T(0));
  std::fill(beta + L, beta + BT, T(0));
}

template <class T>
void gate_cumsum_chunk(const Params& p, const WorkItem& wi, int64_t r0, int64_t L, T* G) {
  const int64_t K = p.K, HV = p.HV;
  const size_t gsz = p.g_dt == Dt::Double ? 8 : (p.g_dt == Dt::Float ? 4 : 2);
  load_rows(static_cast<const char*>(p.g) + (r0 * HV + wi.hv) * K * gsz, p.g_dt, HV * K, L, K, G,
            K);
  if (p.use_gate_in_kernel) {
    const GateFn<T> f = make_gate_fn<T>(p, wi.hv);
    for (int64_t i = 0; i < L; ++i)
      for (int64_t c = 0; c < K; ++c) G[i * K + c] = f(G[i * K + c], c);
  }
  for (int64_t i = 1; i < L; ++i)
    for (int64_t c = 0; c < K; ++c) G[i * K + c] += G[(i - 1) * K + c];
  for (int64_t i = L; i < p.BT; ++i) std::copy(G + (L - 1) * K, G + L * K, G + i * K);
}

#define KDA_INSTANTIATE(T)                                                                    \
  template T l2norm_row<T>(const T*, int64_t, T*, Dt);                                       \
  template T beta_value<T>(const Params&, T);                                                \
  template void load_chunk_inputs<T>(const Params&, const WorkItem&, int64_t, int64_t, T*, T*, \
                                     T*, T*);                                                \
  template void gate_cumsum_chunk<T>(const Params&, const WorkItem&, int64_t, int64_t, T*);
KDA_INSTANTIATE(float)
KDA_INSTANTIATE(double)
#undef KDA_INSTANTIATE

}  // namespace cpu
}  // namespace kda_ext

// kda_ext CPU stage "wy": w, u (the WY representation through Akk), qg and kg of one chunk.
#include "cpu/wy.h"

namespace kda_ext {
namespace cpu {

template <class T>
void wy_chunk(const T* Akk, const T* qh, const T* kh, const T* v, const T* beta, const T* G,
              int64_t L, int64_t BT, int64_t K, int64_t V, Dt kdt, Dt vdt, T* w, T* u, T* qg,
              T* kg, T* work) {
  const T* glast = G + (L - 1) * K;
  T* rhs = work;  // [L, max(K,V)]
  for (int64_t i = 0; i < L; ++i) {
    const T* gi = G + i * K;
    const T* qi = qh + i * K;
    const T* ki = kh + i * K;
    T* ri = rhs + i * K;
    for (int64_t c = 0; c < K; ++c) {
      const T eg = exp_vec(gi[c]);
      qg[i * K + c] = qi[c] * eg;
      kg[i * K + c] = ki[c] * exp_vec(glast[c] - gi[c]);
      ri[c] = beta[i] * ki[c] * eg;
    }
  }
  std::fill(w, w + BT * K, T(0));
  trmm_lower_nn(L, K, Akk, BT, rhs, K, w, K);
  for (int64_t i = 0; i < L; ++i)
    for (int64_t c = 0; c < V; ++c) rhs[i * V + c] = beta[i] * v[i * V + c];
  std::fill(u, u + BT * V, T(0));
  trmm_lower_nn(L, V, Akk, BT, rhs, V, u, V);
  std::fill(qg + L * K, qg + BT * K, T(0));
  std::fill(kg + L * K, kg + BT * K, T(0));
  round_inplace(w, L * K, kdt);
  round_inplace(qg, L * K, kdt);
  round_inplace(kg, L * K, kdt);
  round_inplace(u, L * V, vdt);
}

template void wy_chunk<float>(const float*, const float*, const float*, const float*,
                              const float*, const float*, int64_t, int64_t, int64_t, int64_t, Dt,
                              Dt, float*, float*, float*, float*, float*);
template void wy_chunk<double>(const double*, const double*, const double*, const double*,
                               const double*, const double*, int64_t, int64_t, int64_t, int64_t,
                               Dt, Dt, double*, double*, double*, double*, double*);

}  // namespace cpu
}  // namespace kda_ext

// kda_ext CPU stage "state": the sequential pass over chunks (h, v_new, final state).
#include "cpu/state.h"

namespace kda_ext {
namespace cpu {

template <class T>
void state_load(const void* src, Dt dt, bool v_first, int64_t K, int64_t V, T* S) {
  if (!v_first) {
    load_rows(src, dt, V, K, V, S, V);
    return;
  }
  for (int64_t c = 0; c < V; ++c)
    for (int64_t r = 0; r < K; ++r) S[r * V + c] = read_scalar<T>(src, dt, c * K + r);
}

template <class T>
void state_store(const T* S, int64_t K, int64_t V, bool v_first, void* dst, Dt dt) {
  if (!v_first) {
    store_rows(S, V, K, V, dst, dt, V);
    return;
  }
  // Transpose through rows of [V,K]: one store_rows call per V row with a strided source
  // would need a column view, so gather each column first.
  T col[256];
  const size_t esize = dt == Dt::Double ? 8 : (dt == Dt::Float ? 4 : 2);
  for (int64_t c = 0; c < V; ++c) {
    for (int64_t r = 0; r < K; ++r) col[r] = S[r * V + c];
    store_rows(col, K, 1, K, static_cast<char*>(dst) + c * K * esize, dt, K);
  }
}

template <class T>
void state_vnew(const T* w, const T* u, const T* S, int64_t L, int64_t BT, int64_t K, int64_t V,
                Dt vdt, T* vnew) {
  std::copy(u, u + L * V, vnew);
  std::fill(vnew + L * V, vnew + BT * V, T(0));
  gemm_nn(L, V, K, w, K, S, V, vnew, V, T(-1));
  round_inplace(vnew, L * V, vdt);
}

template <class T>
void state_advance(const T* kg, const T* vnew, const T* G_last, int64_t L, int64_t K, int64_t V,
                   T* S) {
  for (int64_t r = 0; r < K; ++r) {
    const T d = std::exp(G_last[r]);
    T* s = S + r * V;
    for (int64_t c = 0; c < V; ++c) s[c] *= d;
  }
  gemm_tn(K, V, L, kg, K, vnew, V, S, V);
}

#define KDA_INSTANTIATE(T)                                                                    \
  template void state_load<T>(const void*, Dt, bool, int64_t, int64_t, T*);                  \
  template void state_store<T>(const T*, int64_t, int64_t, bool, void*, Dt);                 \
  template void state_vnew<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t, \
                              Dt, T*);                                                       \
  template void state_advance<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t, T*);
KDA_INSTANTIATE(float)
KDA_INSTANTIATE(double)
#undef KDA_INSTANTIATE

}  // namespace cpu
}  // namespace kda_ext

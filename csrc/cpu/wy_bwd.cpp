// kda_ext CPU backend: backward of the WY representation (see wy_bwd.h).
#include "cpu/wy_bwd.h"

#include <algorithm>

#include "cpu/common.h"

namespace kda_ext {
namespace cpu {

template <class T>
void wy_bwd_chunk(int64_t L, int64_t K, int64_t V, const T* Akk, int64_t ld, const T* du,
                  const T* dw, const T* v, const T* kb, const T* beta, T* dv, T* dkb, T* dLkk,
                  T* dbeta, T* work) {
  T* dAkk = work;          // [L, L], stride ld
  T* tmp = dAkk + L * ld;  // [L, L], stride ld
  T* AkkT = tmp + L * ld;  // [L, L], stride ld
  T* bvT = AkkT + L * ld;  // [V, L], stride L
  T* kbT = bvT + V * L;    // [K, L], stride L
  std::fill(dAkk, dAkk + 2 * L * ld, T(0));
  std::fill(dv, dv + L * V, T(0));
  std::fill(dkb, dkb + L * K, T(0));
  // The A B^T products run as A (B^T) on explicit transposes: the row-update form vectorises
  // better than dot products.
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t j = 0; j < L; ++j) AkkT[j * ld + i] = Akk[i * ld + j];
    for (int64_t c = 0; c < V; ++c) bvT[c * L + i] = beta[i] * v[i * V + c];
    for (int64_t c = 0; c < K; ++c) kbT[c * L + i] = kb[i * K + c];
  }
  gemm_tn(L, V, L, Akk, ld, du, V, dv, V);
  for (int64_t i = 0; i < L; ++i) {
    T db = T(0);
    for (int64_t c = 0; c < V; ++c) {
      db += dv[i * V + c] * v[i * V + c];
      dv[i * V + c] *= beta[i];
    }
    dbeta[i] += db;
  }
  gemm_tn(L, K, L, Akk, ld, dw, K, dkb, K);

  // Only the strictly lower part of dAkk reaches dLkk (Akk is lower triangular with a constant
  // diagonal), so the upper part is skipped.
  gemm_nn(L, L, V, du, V, bvT, L, dAkk, ld);
  gemm_nn(L, L, K, dw, K, kbT, L, dAkk, ld);
  for (int64_t i = 0; i < L; ++i)
    for (int64_t j = i; j < L; ++j) dAkk[i * ld + j] = T(0);
  // d(I+L)^-1 = -A dL A  =>  dLkk = -A^T dA A^T.
  gemm_tn(L, L, L, Akk, ld, dAkk, ld, tmp, ld);
  for (int64_t i = 0; i < L; ++i) std::fill(dLkk + i * ld, dLkk + i * ld + L, T(0));
  gemm_nn(L, L, L, tmp, ld, AkkT, ld, dLkk, ld, T(-1));
  for (int64_t i = 0; i < L; ++i)
    for (int64_t j = i; j < L; ++j) dLkk[i * ld + j] = T(0);
}

template void wy_bwd_chunk<float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                                  const float*, const float*, const float*, const float*, float*,
                                  float*, float*, float*, float*);
template void wy_bwd_chunk<double>(int64_t, int64_t, int64_t, const double*, int64_t,
                                   const double*, const double*, const double*, const double*,
                                   const double*, double*, double*, double*, double*, double*);

}  // namespace cpu
}  // namespace kda_ext

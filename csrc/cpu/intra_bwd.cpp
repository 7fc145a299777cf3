// kda_ext CPU backend: backward of the intra-chunk matrices Aqk and Lkk (see intra_bwd.h).
#include "cpu/intra_bwd.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/common.h"

namespace kda_ext {
namespace cpu {

template <class T>
void intra_bwd_chunk(int64_t L, int64_t K, const T* q, const T* k, const T* beta, const T* G,
                     const T* dA, const T* dL, int64_t ld, T* dq, T* dk, T* dG, T* dbeta,
                     T* work) {
  // Row-side sums R_i = sum_{j<=i} M_ij x_j e^{G_i - G_j} (dqA from dA, P from dL) and
  // column-side sums C_j = sum_{i>=j} M_ij y_i e^{G_i - G_j} (dkA from dA, Cl from dL).
  T* dqA = work;
  T* dkA = dqA + L * K;
  T* P = dkA + L * K;
  T* Cl = P + L * K;
  T* X1 = Cl + L * K;
  T* X2 = X1 + L * K;
  std::fill(work, work + 4 * L * K, T(0));
  const int64_t nblk = (L + kBC - 1) / kBC;

  // Off-diagonal row side: block I against every earlier row, through its first row r, so both
  // e^{G_i - G_r} (i >= r) and e^{G_r - G_j} (j < r) are <= 1.
  for (int64_t I = 1; I < nblk; ++I) {
    const int64_t i0 = I * kBC, i1 = std::min(i0 + kBC, L);
    const T* Gr = G + i0 * K;
    for (int64_t j = 0; j < i0; ++j)
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) X1[j * K + c] = k[j * K + c] * exp_vec(Gr[c] - G[j * K + c]);
    gemm_nn(i1 - i0, K, i0, dA + i0 * ld, ld, X1, K, dqA + i0 * K, K);
    gemm_nn(i1 - i0, K, i0, dL + i0 * ld, ld, X1, K, P + i0 * K, K);
    for (int64_t i = i0; i < i1; ++i)
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) {
        const T f = exp_vec(G[i * K + c] - Gr[c]);
        dqA[i * K + c] *= f;
        P[i * K + c] *= f;
      }
  }
  // Off-diagonal column side: block J against every later row, through J's last row r.
  for (int64_t J = 0; J + 1 < nblk; ++J) {
    const int64_t j0 = J * kBC, j1 = j0 + kBC, r = j1 - 1;
    const T* Gr = G + r * K;
    for (int64_t i = j1; i < L; ++i)
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) {
        const T e = exp_vec(G[i * K + c] - Gr[c]);
        X1[(i - j1) * K + c] = q[i * K + c] * e;
        X2[(i - j1) * K + c] = beta[i] * k[i * K + c] * e;
      }
    gemm_tn(kBC, K, L - j1, dA + j1 * ld + j0, ld, X1, K, dkA + j0 * K, K);
    gemm_tn(kBC, K, L - j1, dL + j1 * ld + j0, ld, X2, K, Cl + j0 * K, K);
    for (int64_t j = j0; j < j1; ++j)
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) {
        const T f = exp_vec(Gr[c] - G[j * K + c]);
        dkA[j * K + c] *= f;
        Cl[j * K + c] *= f;
      }
  }
  // Diagonal blocks, element-wise: one exp per (i, j >= block start, k) feeds all four sums.
  T* e = X1;
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t b0 = b * kBC, b1 = std::min(b0 + kBC, L);
    for (int64_t i = b0; i < b1; ++i) {
      const T* Gi = G + i * K;
      const T* qi = q + i * K;
      const T* ki = k + i * K;
      T* dqAi = dqA + i * K;
      T* Pi = P + i * K;
      for (int64_t j = b0; j <= i; ++j) {
        const T* Gj = G + j * K;
        const T* kj = k + j * K;
#pragma omp simd
        for (int64_t c = 0; c < K; ++c) e[c] = exp_vec(Gi[c] - Gj[c]);
        const T a = dA[i * ld + j];
        const T l = j < i ? dL[i * ld + j] : T(0);
        const T lb = l * beta[i];
        T* dkAj = dkA + j * K;
        T* Clj = Cl + j * K;
#pragma omp simd
        for (int64_t c = 0; c < K; ++c) {
          const T ec = e[c];
          dqAi[c] += a * kj[c] * ec;
          dkAj[c] += a * qi[c] * ec;
          Pi[c] += l * kj[c] * ec;
          Clj[c] += lb * ki[c] * ec;
        }
      }
    }
  }
  // Aqk = scale * (q e^G)(k e^-G)^T and Lkk = diag(beta) (k e^G)(k e^-G)^T: the row factor
  // carries +G, the column factor -G.
  for (int64_t i = 0; i < L; ++i) {
    T db = T(0);
    const T bi = beta[i];
#pragma omp simd reduction(+ : db)
    for (int64_t c = 0; c < K; ++c) {
      const int64_t x = i * K + c;
      dq[x] += dqA[x];
      dk[x] += dkA[x] + bi * P[x] + Cl[x];
      dG[x] += q[x] * dqA[x] - k[x] * dkA[x] + k[x] * (bi * P[x] - Cl[x]);
      db += k[x] * P[x];
    }
    dbeta[i] += db;
  }
}

template void intra_bwd_chunk<float>(int64_t, int64_t, const float*, const float*, const float*,
                                     const float*, const float*, const float*, int64_t, float*,
                                     float*, float*, float*, float*);
template void intra_bwd_chunk<double>(int64_t, int64_t, const double*, const double*,
                                      const double*, const double*, const double*, const double*,
                                      int64_t, double*, double*, double*, double*, double*);

}  // namespace cpu
}  // namespace kda_ext

// kda_ext CPU stage "intra": Aqk, Lkk and Akk = (I + Lkk)^-1 of one chunk from 16-row sub-chunks.
#include "cpu/intra.h"

namespace kda_ext {
namespace cpu {

namespace {

// Diagonal block, general path. exp(G_i - G_j) (i >= j) is built as the running product of the
// per-step factors exp(G_s - G_{s-1}) <= 1 for s = j+1..i: gates of any size stay finite (a factor
// of exp(-1000) is exactly 0), and only 16 rows of exps are needed instead of 136 pairs of rows.
// kd: [16,K] scratch, a: [K] scratch.
template <class T>
void diag_block_elementwise(const T* qh, const T* kh, const T* G, const T* beta, int64_t s0,
                            int64_t n, int64_t BT, int64_t K, T scale, T* Aqk, T* Lkk, T* kd,
                            T* a) {
  for (int64_t i = 0; i < n; ++i) {
    const T* qi = qh + (s0 + i) * K;
    const T* ki = kh + (s0 + i) * K;
    if (i > 0) {
      const T* gi = G + (s0 + i) * K;
      for (int64_t c = 0; c < K; ++c) a[c] = exp_vec(gi[c] - gi[c - K]);
      for (int64_t j = 0; j < i; ++j) {
        T* d = kd + j * K;
        for (int64_t c = 0; c < K; ++c) d[c] *= a[c];
      }
    }
    std::copy(ki, ki + K, kd + i * K);
    for (int64_t j = 0; j <= i; ++j) {
      const T* d = kd + j * K;
      T sq = T(0), sk = T(0);
#pragma omp simd reduction(+ : sq, sk)
      for (int64_t c = 0; c < K; ++c) {
        sq += qi[c] * d[c];
        sk += ki[c] * d[c];
      }
      Aqk[(s0 + i) * BT + s0 + j] = scale * sq;
      if (j < i) Lkk[(s0 + i) * BT + s0 + j] = beta[s0 + i] * sk;
    }
  }
}

}  // namespace

template <class T>
void intra_chunk_A(const T* qh, const T* kh, const T* G, const T* beta, int64_t L, int64_t BT,
                   int64_t K, T scale, bool safe_gate, T* Aqk, T* Lkk, T* work) {
  std::fill(Aqk, Aqk + BT * BT, T(0));
  std::fill(Lkk, Lkk + BT * BT, T(0));
  T* qa = work;            // [16,K]  q̂ ⊙ exp(G - G_r) of the later sub-chunk
  T* ka = qa + kBC * K;    // [16,K]  k̂ ⊙ exp(G - G_r)
  T* kb = ka + kBC * K;    // [BT,K]  k̂ ⊙ exp(G_r - G) of the earlier rows
  T* blk = kb + BT * K;    // [16,BT]
  const int64_t nsub = (L + kBC - 1) / kBC;
  for (int64_t I = 0; I < nsub; ++I) {
    const int64_t s0 = I * kBC, n = std::min(kBC, L - s0);
    // Off-diagonal blocks J < I, all at once: reference row r = s0 keeps both factors <= 1.
    if (I > 0) {
      const T* gr = G + s0 * K;
      for (int64_t i = 0; i < kBC; ++i) {
        const T* gi = G + (s0 + i) * K;
        const T* qi = qh + (s0 + i) * K;
        const T* ki = kh + (s0 + i) * K;
        for (int64_t c = 0; c < K; ++c) {
          const T e = exp_vec(gi[c] - gr[c]);
          qa[i * K + c] = qi[c] * e;
          ka[i * K + c] = ki[c] * e;
        }
      }
      for (int64_t j = 0; j < s0; ++j) {
        const T* gj = G + j * K;
        const T* kj = kh + j * K;
        T* b = kb + j * K;
        for (int64_t c = 0; c < K; ++c) b[c] = kj[c] * exp_vec(gr[c] - gj[c]);
      }
      std::fill(blk, blk + kBC * s0, T(0));
      gemm_nt(n, s0, K, qa, K, kb, K, blk, s0, scale);
      for (int64_t i = 0; i < n; ++i) std::copy(blk + i * s0, blk + (i + 1) * s0, Aqk + (s0 + i) * BT);
      std::fill(blk, blk + kBC * s0, T(0));
      gemm_nt(n, s0, K, ka, K, kb, K, blk, s0);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < s0; ++j) Lkk[(s0 + i) * BT + j] = beta[s0 + i] * blk[i * s0 + j];
    }
    if (!safe_gate) {
      diag_block_elementwise(qh, kh, G, beta, s0, n, BT, K, scale, Aqk, Lkk, qa, ka);
      continue;
    }
    // Median shift: reference row m of the sub-chunk; exp(G_m - G_j) may exceed 1 but stays
    // below exp(8 * 5) for per-step gates >= -5.
    const T* gm = G + (s0 + std::min<int64_t>(8, n - 1)) * K;
    for (int64_t i = 0; i < kBC; ++i) {
      const T* gi = G + (s0 + i) * K;
      for (int64_t c = 0; c < K; ++c) {
        const T d = gi[c] - gm[c];
        const T e = exp_vec(d);
        qa[i * K + c] = qh[(s0 + i) * K + c] * e;
        ka[i * K + c] = kh[(s0 + i) * K + c] * e;
        kb[i * K + c] = kh[(s0 + i) * K + c] * exp_vec(-d);
      }
    }
    std::fill(blk, blk + kBC * kBC, T(0));
    gemm_nt(n, n, K, qa, K, kb, K, blk, kBC, scale);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j <= i; ++j) Aqk[(s0 + i) * BT + s0 + j] = blk[i * kBC + j];
    std::fill(blk, blk + kBC * kBC, T(0));
    gemm_nt(n, n, K, ka, K, kb, K, blk, kBC);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < i; ++j) Lkk[(s0 + i) * BT + s0 + j] = beta[s0 + i] * blk[i * kBC + j];
  }
}

template <class T>
void solve_unit_lower(const T* Lkk, int64_t L, int64_t BT, T* Akk) {
  std::fill(Akk, Akk + BT * BT, T(0));
  // Row i of X = (I + L)^-1: X_i = e_i - sum_{j<i} L_ij X_j (X_j is zero beyond column j).
  for (int64_t i = 0; i < L; ++i) {
    T* xi = Akk + i * BT;
    for (int64_t j = 0; j < i; ++j) {
      const T lij = Lkk[i * BT + j];
      const T* xj = Akk + j * BT;
      for (int64_t c = 0; c <= j; ++c) xi[c] -= lij * xj[c];
    }
    xi[i] = T(1);
  }
}

template <class T>
void intra_chunk(const T* qh, const T* kh, const T* G, const T* beta, int64_t L, int64_t BT,
                 int64_t K, T scale, bool safe_gate, Dt store_dt, T* Aqk, T* Akk, T* Lkk,
                 T* work) {
  intra_chunk_A(qh, kh, G, beta, L, BT, K, scale, safe_gate, Aqk, Lkk, work);
  solve_unit_lower(Lkk, L, BT, Akk);
  round_inplace(Aqk, BT * BT, store_dt);
  round_inplace(Akk, BT * BT, store_dt);
}

#define KDA_INSTANTIATE(T)                                                                      \
  template void intra_chunk_A<T>(const T*, const T*, const T*, const T*, int64_t, int64_t,      \
                                 int64_t, T, bool, T*, T*, T*);                                 \
  template void solve_unit_lower<T>(const T*, int64_t, int64_t, T*);                           \
  template void intra_chunk<T>(const T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, \
                               T, bool, Dt, T*, T*, T*, T*);
KDA_INSTANTIATE(float)
KDA_INSTANTIATE(double)
#undef KDA_INSTANTIATE

}  // namespace cpu
}  // namespace kda_ext

// kda_ext CPU backend: backward of the intra-chunk matrices Aqk and Lkk through exp(G_i - G_j).
#pragma once

#include <cstdint>

namespace kda_ext {
namespace cpu {

// One chunk of L <= BT valid rows. Given the gradients of the chunk's two pairwise matrices,
//   dA[i, j] = dLoss/dAqk[i, j] * scale   (j <= i; zero elsewhere)
//   dL[i, j] = dLoss/dLkk[i, j]           (j <  i; zero elsewhere)
// with Aqk[i, j] = scale * sum_k q_ik k_jk e^{G_ik - G_jk} and Lkk[i, j] = beta_i * sum_k
// k_ik k_jk e^{G_ik - G_jk}, accumulate their contributions into dq, dk, dG (all [L, K], row
// stride K) and dbeta ([L]). dA and dL have row stride ld. q, k, G are [L, K] with row stride K.
//
// Every exp(G_i - G_j) is evaluated with i >= j only (a value <= 1): the 16x16 off-diagonal
// blocks through a reference row between the two blocks (two factors <= 1 each, one matmul per
// block row or column), the diagonal blocks element-wise. Gates of -1000 therefore underflow to
// exact zeros instead of overflowing. `work` must hold 6 * BT * K elements.
template <class T>
void intra_bwd_chunk(int64_t L, int64_t K, const T* q, const T* k, const T* beta, const T* G,
                     const T* dA, const T* dL, int64_t ld, T* dq, T* dk, T* dG, T* dbeta,
                     T* work);

}  // namespace cpu
}  // namespace kda_ext

// kda_ext CPU stage "intra": Aqk, Lkk and Akk = (I + Lkk)^-1 of one chunk from 16-row sub-chunks.
#pragma once

#include "cpu/common.h"

namespace kda_ext {
namespace cpu {

// Scratch elements intra_chunk_A needs.
inline int64_t intra_work_size(int64_t BT, int64_t K) { return 2 * kBC * K + BT * K + kBC * BT; }

// Aqk[i,j] = scale sum_k q̂_ik k̂_jk exp(G_ik - G_jk) for j <= i < L, Lkk[i,j] = beta_i
// sum_k k̂_ik k̂_jk exp(G_ik - G_jk) for j < i < L; both [BT,BT] (ld BT), zero elsewhere, unrounded.
// Inputs are [BT,K] chunk buffers (padding rows as load_chunk_inputs / gate_cumsum_chunk leave
// them). safe_gate selects the median-shift diagonal blocks (needs per-step gates >= -5).
template <class T>
void intra_chunk_A(const T* qh, const T* kh, const T* G, const T* beta, int64_t L, int64_t BT,
                   int64_t K, T scale, bool safe_gate, T* Aqk, T* Lkk, T* work);

// Akk = (I + Lkk)^-1 by forward substitution (rows < L; the rest zero), [BT,BT].
template <class T>
void solve_unit_lower(const T* Lkk, int64_t L, int64_t BT, T* Akk);

// Both of the above; Aqk and Akk come back rounded to store_dt (k's dtype), as stored and as every
// later stage and the backward use them. Lkk is left (unrounded) in `Lkk`.
template <class T>
void intra_chunk(const T* qh, const T* kh, const T* G, const T* beta, int64_t L, int64_t BT,
                 int64_t K, T scale, bool safe_gate, Dt store_dt, T* Aqk, T* Akk, T* Lkk,
                 T* work);

}  // namespace cpu
}  // namespace kda_ext

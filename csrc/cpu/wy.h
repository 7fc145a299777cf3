// kda_ext CPU stage "wy": w, u (the WY representation through Akk), qg and kg of one chunk.
#pragma once

#include "cpu/common.h"

namespace kda_ext {
namespace cpu {

inline int64_t wy_work_size(int64_t BT, int64_t K, int64_t V) { return BT * std::max(K, V); }

// With Akk the stored (rounded) inverse, [BT,BT]:
//   w = Akk (beta ⊙ k̂ ⊙ exp(G)), u = Akk (beta ⊙ v), qg = q̂ ⊙ exp(G), kg = k̂ ⊙ exp(G_last - G)
// (G_last = G row L-1). w, qg, kg come back rounded to kdt, u to vdt (the storage dtypes), so the
// state pass and the backward see exactly what a disable_recompute run saves. Rows >= L are zero.
template <class T>
void wy_chunk(const T* Akk, const T* qh, const T* kh, const T* v, const T* beta, const T* G,
              int64_t L, int64_t BT, int64_t K, int64_t V, Dt kdt, Dt vdt, T* w, T* u, T* qg,
              T* kg, T* work);

}  // namespace cpu
}  // namespace kda_ext

// kda_ext CPU stage "state": the sequential pass over chunks (h, v_new, final state).
#pragma once

#include "cpu/common.h"

namespace kda_ext {
namespace cpu {

// S is always [K,V] row-major in the compute dtype; stored states are [K,V] or, with v_first,
// [V,K].
template <class T>
void state_load(const void* src, Dt dt, bool v_first, int64_t K, int64_t V, T* S);
template <class T>
void state_store(const T* S, int64_t K, int64_t V, bool v_first, void* dst, Dt dt);

// v_new = u - w S for the chunk's L rows ([BT,V], rows >= L zero), rounded to vdt (v's dtype).
template <class T>
void state_vnew(const T* w, const T* u, const T* S, int64_t L, int64_t BT, int64_t K, int64_t V,
                Dt vdt, T* vnew);

// S <- exp(G_last) ⊙_rows S + kg^T v_new (G_last: the chunk's last valid G row, [K]).
template <class T>
void state_advance(const T* kg, const T* vnew, const T* G_last, int64_t L, int64_t K, int64_t V,
                   T* S);

}  // namespace cpu
}  // namespace kda_ext

// kda_ext CPU stage "output": o = scale * qg S + Aqk v_new for one chunk.
#pragma once

#include "cpu/common.h"

namespace kda_ext {
namespace cpu {

// S: the state entering the chunk ([K,V]); Aqk: the stored (rounded, already scaled) [BT,BT];
// o: [BT,V], rows >= L left zero. Not rounded (the caller stores it in q's dtype).
template <class T>
void output_chunk(const T* qg, const T* S, const T* Aqk, const T* vnew, int64_t L, int64_t BT,
                  int64_t K, int64_t V, T scale, T* o);

}  // namespace cpu
}  // namespace kda_ext

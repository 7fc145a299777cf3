// kda_ext CPU stage "output": o = scale * qg S + Aqk v_new for one chunk.
#include "cpu/output.h"

namespace kda_ext {
namespace cpu {

template <class T>
void output_chunk(const T* qg, const T* S, const T* Aqk, const T* vnew, int64_t L, int64_t BT,
                  int64_t K, int64_t V, T scale, T* o) {
  std::fill(o, o + BT * V, T(0));
  gemm_nn(L, V, K, qg, K, S, V, o, V, scale);
  trmm_lower_nn(L, V, Aqk, BT, vnew, V, o, V);
}

template void output_chunk<float>(const float*, const float*, const float*, const float*, int64_t,
                                  int64_t, int64_t, int64_t, float, float*);
template void output_chunk<double>(const double*, const double*, const double*, const double*,
                                   int64_t, int64_t, int64_t, int64_t, double, double*);

}  // namespace cpu
}  // namespace kda_ext

// kda_ext CPU backend: backward of the WY representation w = Akk kb, u = Akk (beta v), Akk = (I+L)^-1.
#pragma once

#include <cstdint>

namespace kda_ext {
namespace cpu {

// One chunk of L valid rows. Akk ([L, L], row stride ld, lower triangular with unit diagonal) is
// the stored (rounded) inverse the forward multiplied with; kb = beta k e^G ([L, K]); du = dLoss/du
// ([L, V], which is dLoss/dv_new), dw = dLoss/dw ([L, K]). Writes
//   dv  = beta * Akk^T du                       [L, V]  (gradient of the raw v through u)
//   dkb = Akk^T dw                              [L, K]
//   dLkk = strict_lower(-Akk^T dAkk Akk^T)      [L, L], row stride ld, with dAkk = du (beta v)^T + dw kb^T
// and adds sum_v (Akk^T du)_iv v_iv to dbeta. `work` must hold
// 3 * BT * BT + BT * (K + V) elements.
template <class T>
void wy_bwd_chunk(int64_t L, int64_t K, int64_t V, const T* Akk, int64_t ld, const T* du,
                  const T* dw, const T* v, const T* kb, const T* beta, T* dv, T* dkb, T* dLkk,
                  T* dbeta, T* work);

}  // namespace cpu
}  // namespace kda_ext

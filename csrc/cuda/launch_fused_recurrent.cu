// kda_ext CUDA: launch layer of fused_recurrent_kda (params + stream in, one kernel out).
//
// The instantiation is picked per call: q/k/v dtype; state layout ([K, V] states at K = V = 128 take
// the column-per-thread kernel); 16-byte state accesses
// (kVec = 4) when the contiguous dim is a multiple of 4 and every state pointer and slot stride
// is 16-byte aligned, else 4-byte ones; and the padded key dim kKMax (64, 128 or 256) that sizes
// the register tile. The grid depends on shapes only: CUDA-graph safe, no synchronisation.
#include <cuda_runtime.h>

#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "cuda/fused_recurrent.cuh"
#include "cuda/launch_common.h"
#include "cuda/launch_fused_recurrent.h"
#include "cuda/static_switch.h"

namespace kda_ext {
namespace cuda {

namespace {

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Whether every state access of the call can be a float4.
bool can_use_vec4(const FusedRecurrentParams& p) {
  const int64_t contiguous = p.state_v_first ? p.K : p.V;
  if (contiguous % 4 != 0) return false;
  if (p.state_in != nullptr && (!aligned16(p.state_in) || p.state_in_stride % 4 != 0)) return false;
  if (p.state_out != nullptr && (!aligned16(p.state_out) || p.state_out_stride % 4 != 0))
    return false;
  return true;
}

template <typename T, bool kVFirst, int kVec, int kKMax>
void launch(const FusedRecurrentParams& p, cudaStream_t stream) {
  const int64_t blocks = p.N * p.HV * cdiv(p.V, recurrent::kBV);
  TORCH_CHECK(blocks <= 0x7fffffff, "kda_ext: fused_recurrent_kda needs ", blocks,
              " CTAs (N * HV * ceil(V / 32)), more than a 1-D grid holds");
  recurrent::fused_recurrent_kda_kernel<T, kVFirst, kVec, kKMax>
      <<<static_cast<unsigned>(blocks), recurrent::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool kVFirst, int kVec>
void launch_kmax(const FusedRecurrentParams& p, cudaStream_t stream) {
  if (p.K <= 64)
    launch<T, kVFirst, kVec, 64>(p, stream);
  else if (p.K <= 128)
    launch<T, kVFirst, kVec, 128>(p, stream);
  else
    launch<T, kVFirst, kVec, 256>(p, stream);
}

// [K, V] states at K = V = 128: the column-per-thread kernel (whole rows of the tile per CTA).
template <typename T>
void launch_kv_column(const FusedRecurrentParams& p, cudaStream_t stream) {
  constexpr int kD = 128;
  const int64_t blocks = p.N * p.HV;
  TORCH_CHECK(blocks <= 0x7fffffff, "kda_ext: fused_recurrent_kda needs ", blocks,
              " CTAs (N * HV), more than a 1-D grid holds");
  recurrent::fused_recurrent_kv_column_kernel<T, kD, recurrent::kKvColumnMinBlocks>
      <<<static_cast<unsigned>(blocks), kD, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_layout(const FusedRecurrentParams& p, cudaStream_t stream) {
  if (!p.state_v_first && p.K == 128 && p.V == 128) return launch_kv_column<T>(p, stream);
  const bool vec4 = can_use_vec4(p);
  if (p.state_v_first) {
    if (vec4)
      launch_kmax<T, true, 4>(p, stream);
    else
      launch_kmax<T, true, 1>(p, stream);
  } else {
    if (vec4)
      launch_kmax<T, false, 4>(p, stream);
    else
      launch_kmax<T, false, 1>(p, stream);
  }
}

}  // namespace

void launch_fused_recurrent_kda(const FusedRecurrentParams& p, cudaStream_t stream) {
  TORCH_CHECK(p.K > 0 && p.K <= 256, "kda_ext: fused_recurrent_kda supports 1 <= K <= 256, got ",
              p.K);
  TORCH_CHECK(p.V > 0 && p.V <= 256, "kda_ext: fused_recurrent_kda supports 1 <= V <= 256, got ",
              p.V);
  TORCH_CHECK(p.H > 0 && p.HV % p.H == 0, "kda_ext: HV=", p.HV, " must be a multiple of H=", p.H);
  TORCH_CHECK(!p.use_gate_in_kernel || p.use_lower_bound_gate || p.A_log != nullptr,
              "kda_ext: the in-kernel softplus gate needs A_log");
  if (p.N == 0 || p.HV == 0) return;
  KDA_DTYPE_SWITCH(p.dtype, T, [&] { launch_layout<T>(p, stream); });
}

}  // namespace cuda
}  // namespace kda_ext

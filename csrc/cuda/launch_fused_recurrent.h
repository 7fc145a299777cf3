// kda_ext CUDA: entry point of the fused_recurrent_kda launch layer, shared by the binding.
#pragma once

#include <cuda_runtime.h>

#include "cuda/fused_recurrent_params.h"

namespace kda_ext {
namespace cuda {

// Launches the decode kernel on `stream` (one launch, no allocation, no synchronisation: CUDA
// graph safe). Throws c10::Error on an unsupported configuration or a failed launch.
void launch_fused_recurrent_kda(const FusedRecurrentParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace kda_ext

// kda_ext CUDA: entry point of the forward launch layer, shared by the binding.
#pragma once

#include <cuda_runtime.h>

#include "cuda/params.h"

namespace kda_ext {
namespace cuda {

// Launches kernel 0 (varlen), chunk_prepare and chunk_state_output on `stream`. Throws
// c10::Error on an unsupported configuration or a failed launch; never synchronises.
void launch_chunk_kda_fwd(const ChunkKdaFwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace kda_ext

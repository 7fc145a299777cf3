// kda_ext CUDA backward: entry point of the backward launch layer (host side, no ATen types).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bwd_params.cuh"

namespace kda_ext {
namespace cuda {

// Workspace element counts the caller allocates for ChunkKdaBwdParams (see bwd_params.cuh).
struct BwdWorkspaceSizes {
  int64_t bounds, dh, dvn, dAkk_part, dA, dq_hv, dbeta_part, ddt_part, dA_part;
};
BwdWorkspaceSizes bwd_workspace_sizes(const ChunkKdaBwdParams& p);

// Runs the whole backward on `stream` (no host synchronisation; graph-capturable). All pointers
// of p must be set; forward intermediates must already be present (saved or recomputed).
void launch_chunk_kda_bwd(const ChunkKdaBwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace kda_ext

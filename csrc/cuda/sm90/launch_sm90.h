// kda_ext CUDA, Hopper path: host entry points of the sm90 kernels (csrc/cuda/sm90/launch_sm90.cu).
#pragma once

#include <cuda_runtime.h>

#include "cuda/params.h"

namespace kda_ext {
namespace cuda {

// Whether state_output_sm90 serves this forward call: 16-bit inputs, chunk 64, K = V = 128, the
// forward's output (not the backward's recompute), 16-byte aligned tensors, row counts that fit
// TMA's 32-bit coordinates.
bool state_output_sm90_applies(const ChunkKdaFwdParams& p);

// The forward's state/output pass on wgmma + TMA (sm90/state_output_sm90.cuh); same contract as
// chunk_state_output_mma. The caller checked state_output_sm90_applies.
void launch_state_output_sm90(const ChunkKdaFwdParams& p, cudaStream_t stream);

// Whether the fused forward (sm90/fused_fwd_sm90.cuh) serves this call: bf16, K = V = 128, every
// gate mode, 16-byte aligned q, k, v, g and o. It writes o and final_state only (no intermediate
// for a backward).
bool fused_fwd_sm90_applies(const ChunkKdaFwdParams& p);

// One CTA per (sequence, value head) on `stream`; the caller checked fused_fwd_sm90_applies.
void launch_fused_fwd_sm90(const ChunkKdaFwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace kda_ext

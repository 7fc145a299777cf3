// kda_ext CUDA backward: entry point of the backward launch layer (host side, no ATen types).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bwd_params.cuh"

namespace kda_ext {
namespace cuda {

// Workspace element counts the caller allocates for ChunkKdaBwdParams (see bwd_params.cuh): dh
// and dvn in elements of p.dtype (the dtype of q), everything else float32 (bounds int64).
struct BwdWorkspaceSizes {
  int64_t bounds, dh, dvn, dAkk_part, dA, dq_hv, dbeta_part, ddt_part, dA_part;
};
BwdWorkspaceSizes bwd_workspace_sizes(const ChunkKdaBwdParams& p);

// The backward runs in stages, in this order, so that the caller can allocate each workspace right
// before the first stage that writes it and release it after the last stage that reads it (the
// caching allocator then reuses that memory for later stages on the same stream, which keeps
// the peak well below the sum of all workspaces). What each stage reads and writes:
//   kState:  g_cum, kg, qg, w, Aqk, dout, dht -> seq_bounds/chunk_offsets, dh, dvn, dh0
//   kChunkA: q, k, g_cum, beta, h, dh, dout, dvn, v_new, Akk, rstd_qk (when rstd_ready) ->
//            dAkk_part, dq_hv, dk_hv, dG, dbeta_part[0, NKS), rstd_qk (with l2norm, unless ready)
//   kChunkB: v, beta, dout, dvn, v_new, Akk, dAkk_part -> dv, dAqk, dL, dbeta_part[NKS]
//   kChunkC: q, k, g, g_cum, beta, rstd_qk, dAqk, dL, gate parameters; dq_hv, dk_hv, dG (read-modify-
//            write), dbeta_part (+=) -> dg, ddt_part, dA_part
//   kFinish: q, k, beta, dq_hv, dk_hv, dbeta_part, ddt_part, dA_part -> dq, dk, dbeta, dA_log,
//            ddt_bias
enum class BwdStage { kState, kChunkA, kChunkB, kChunkC, kFinish };

// Launches one stage on `stream` (no host synchronisation; graph-capturable). The pointers the
// stage uses must be set; the others may be null.
void launch_chunk_kda_bwd_stage(const ChunkKdaBwdParams& p, BwdStage stage, cudaStream_t stream);

}  // namespace cuda
}  // namespace kda_ext

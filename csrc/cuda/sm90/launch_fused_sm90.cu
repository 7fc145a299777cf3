// kda_ext CUDA, Hopper path: launch layer of the fused forward (sm90/fused_fwd_sm90.cuh). Its own
// translation unit so that it compiles in parallel with the other sm90 kernels.
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#include "cuda/launch_common.h"
#include "cuda/sm90/fused_fwd_sm90.cuh"
#include "cuda/sm90/launch_sm90.h"

namespace kda_ext {
namespace cuda {

bool fused_fwd_sm90_applies(const ChunkKdaFwdParams& p) {
  const bool g_ok = p.g_dtype == DType::kFloat32 || p.g_dtype == DType::kBFloat16 ||
                    p.g_dtype == DType::kFloat16;
  return p.dtype == DType::kBFloat16 && p.K == 128 && p.V == 128 && g_ok && p.o != nullptr &&
         aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.g) && aligned16(p.o) &&
         p.HV % p.H == 0 && p.HV <= 65535 && p.N <= 0x7fffffffLL;
}

// The in-kernel lower-bound gate with lower_bound in [-5, 0) keeps every 16-row chunk's cumulative
// gate within [-80, 0]: the kernel variant without the per-chunk range check and exact path.
bool fused_fwd_gate_is_bounded(const ChunkKdaFwdParams& p) {
  return p.use_gate_in_kernel && p.use_lower_bound_gate && p.lower_bound >= -5.f && p.lower_bound < 0.f;
}

namespace {

// KDA_EXT_FUSED_PRODUCERS: 2 (default) or 1 intra-chunk warpgroups per CTA of the one-CTA layout
// (read per call: a development switch; two were faster at every measured shape, session 16).
int fused_producers() {
  const char* v = std::getenv("KDA_EXT_FUSED_PRODUCERS");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "2") == 0) return 2;
  TORCH_CHECK(std::strcmp(v, "1") == 0, "kda_ext: KDA_EXT_FUSED_PRODUCERS must be 1 or 2, got '", v, "'");
  return 1;
}

// KDA_EXT_FUSED_CLUSTER: auto (default), on or off. auto takes the 2-CTA cluster variant when
// sequences x heads clusters fit the GPU at once (2 N HV <= SMs): there it puts the producers of a
// head on two SMs and fills the idle half of the GPU; with more (sequence, head) pairs the
// one-CTA kernel already fills every SM and the cluster would only add waves.
bool fused_cluster(const ChunkKdaFwdParams& p) {
  const char* v = std::getenv("KDA_EXT_FUSED_CLUSTER");
  if (v != nullptr && std::strcmp(v, "on") == 0) return true;
  if (v != nullptr && std::strcmp(v, "off") == 0) return false;
  TORCH_CHECK(v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0,
              "kda_ext: KDA_EXT_FUSED_CLUSTER must be auto, on or off, got '", v, "'");
  return 2 * p.N * p.HV <= sm_count();
}

template <int kProducers, bool kBoundedGate, bool kCluster = false>
void launch_with(const ChunkKdaFwdParams& p, cudaStream_t stream) {
  using Cfg = sm90::FusedFwdConfig<kProducers, kBoundedGate, kCluster>;
  auto kernel = sm90::fused_fwd_sm90_kernel<Cfg>;
  const int64_t smem = sizeof(typename Cfg::SharedStorage);
  set_dynamic_smem(kernel, smem, max_optin_smem(), "fused_fwd_sm90");
  if constexpr (kCluster) {
    TORCH_CHECK(p.N <= 0x3fffffffLL, "kda_ext: fused_fwd_sm90 cluster launch: too many sequences (", p.N, ")");
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>(2 * p.N), static_cast<unsigned>(p.HV));
    config.blockDim = dim3(Cfg::kThreads);
    config.dynamicSmemBytes = static_cast<size_t>(smem);
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = 2;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
  } else {
    const dim3 grid(static_cast<unsigned>(p.N), static_cast<unsigned>(p.HV));
    kernel<<<grid, Cfg::kThreads, smem, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_fused_fwd_sm90(const ChunkKdaFwdParams& p, cudaStream_t stream) {
  TORCH_CHECK(fused_fwd_sm90_applies(p), "kda_ext: fused_fwd_sm90 called for a configuration it does not serve");
  // The exact path's registers do not fit two producers' budget (104 a thread: 1.6 KB of
  // spills): the unbounded gate runs one producer warpgroup.
  // (The range-checked variant as a cluster spills 124 bytes at 168 registers: not built.)
  if (!fused_fwd_gate_is_bounded(p)) launch_with<1, false>(p, stream);
  else if (fused_cluster(p)) launch_with<2, true, true>(p, stream);
  else if (fused_producers() == 2) launch_with<2, true>(p, stream);
  else launch_with<1, true>(p, stream);
}

}  // namespace cuda
}  // namespace kda_ext

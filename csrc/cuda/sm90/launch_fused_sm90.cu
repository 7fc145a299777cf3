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

// KDA_EXT_FUSED_PRODUCERS: 1 (default) or 2 intra-chunk warpgroups per CTA (read per call: a
// development switch for timing the two against each other).
int fused_producers() {
  const char* v = std::getenv("KDA_EXT_FUSED_PRODUCERS");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "1") == 0) return 1;
  TORCH_CHECK(std::strcmp(v, "2") == 0, "kda_ext: KDA_EXT_FUSED_PRODUCERS must be 1 or 2, got '", v, "'");
  return 2;
}

template <int kProducers, bool kBoundedGate>
void launch_with(const ChunkKdaFwdParams& p, cudaStream_t stream) {
  using Cfg = sm90::FusedFwdConfig<kProducers, kBoundedGate>;
  auto kernel = sm90::fused_fwd_sm90_kernel<Cfg>;
  const int64_t smem = sizeof(typename Cfg::SharedStorage);
  set_dynamic_smem(kernel, smem, max_optin_smem(), "fused_fwd_sm90");
  const dim3 grid(static_cast<unsigned>(p.N), static_cast<unsigned>(p.HV));
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_fused_fwd_sm90(const ChunkKdaFwdParams& p, cudaStream_t stream) {
  TORCH_CHECK(fused_fwd_sm90_applies(p), "kda_ext: fused_fwd_sm90 called for a configuration it does not serve");
  // The exact path's registers do not fit two producers' budget (104 a thread: 1.6 KB of
  // spills): the unbounded gate runs one producer warpgroup.
  if (!fused_fwd_gate_is_bounded(p)) launch_with<1, false>(p, stream);
  else if (fused_producers() == 2) launch_with<2, true>(p, stream);
  else launch_with<1, true>(p, stream);
}

}  // namespace cuda
}  // namespace kda_ext

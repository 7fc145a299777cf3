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
  // The median-row factors of a 16-row chunk stay within e^{+-8 |lower_bound|}: the gate must be
  // the in-kernel lower-bound one with FLA's safe_gate range [-5, 0).
  const bool bounded_gate = p.use_gate_in_kernel && p.use_lower_bound_gate && p.safe_gate &&
                            p.lower_bound >= -5.f && p.lower_bound < 0.f;
  return p.dtype == DType::kBFloat16 && p.K == 128 && p.V == 128 && bounded_gate && g_ok &&
         p.o != nullptr && aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.g) &&
         aligned16(p.o) && p.HV % p.H == 0 && p.HV <= 65535 && p.N <= 0x7fffffffLL;
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

template <int kProducers>
void launch_with(const ChunkKdaFwdParams& p, cudaStream_t stream) {
  using Cfg = sm90::FusedFwdConfig<kProducers>;
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
  if (fused_producers() == 2) launch_with<2>(p, stream);
  else launch_with<1>(p, stream);
}

}  // namespace cuda
}  // namespace kda_ext

// kda_ext CUDA, Hopper path: launch layer of the sm90 kernels (TMA descriptors, shared memory,
// grid). Kept in its own translation unit: it is the only one that includes CuTe/CUTLASS.
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "cuda/launch_common.h"
#include "cuda/sm90/launch_sm90.h"
#include "cuda/sm90/state_output_sm90.cuh"

namespace kda_ext {
namespace cuda {

bool state_output_sm90_applies(const ChunkKdaFwdParams& p) {
  const bool is16 = p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16;
  return is16 && p.BT == 64 && p.K == 128 && p.V == 128 && p.o != nullptr && p.Aqk != nullptr &&
         p.qg != nullptr && aligned16(p.w) && aligned16(p.u) && aligned16(p.qg) &&
         aligned16(p.kg) && aligned16(p.Aqk) && aligned16(p.g_cum) &&
         p.B * p.T < (int64_t(1) << 31) && p.HV < (int64_t(1) << 31);
}

namespace {

template <typename T>
void launch_typed_sm90(const ChunkKdaFwdParams& p, cudaStream_t stream) {
  using namespace cute;
  using Cfg = sm90::StateSm90Config<T>;
  using Params = sm90::StateSm90Params<Cfg>;
  using Elt = typename Cfg::Elt;
  using ShapeRows = typename Cfg::ShapeRows;
  using StrideRows = typename Cfg::StrideRows;
  using StrideCols = typename Cfg::StrideCols;
  const int32_t rows = static_cast<int32_t>(p.B * p.T);
  const int32_t heads = static_cast<int32_t>(p.HV);
  const int64_t HV = p.HV;
  constexpr int kK = Cfg::kK, kBT = Cfg::kBT;
  const int32_t V = static_cast<int32_t>(p.V);

  Params P;
  P.p = p;
  P.shape_w = ShapeRows{rows, kK, heads};
  P.shape_aqk = ShapeRows{rows, kBT, heads};
  P.shape_u = ShapeRows{rows, V, heads};
  P.shape_kg = ShapeRows{kK, rows, heads};
  P.shape_g = ShapeRows{kK, rows, heads};
  auto rows_tensor = [&](const void* ptr, ShapeRows shape, int64_t cols) {
    return make_tensor(make_gmem_ptr(static_cast<const Elt*>(ptr)), shape,
                       StrideRows{HV * cols, _1{}, cols});
  };
  P.tma_w = make_tma_copy(SM90_TMA_LOAD{}, rows_tensor(p.w, P.shape_w, kK), typename Cfg::LayoutW{},
                          Shape<_64, _128>{}, _1{});
  P.tma_qg = make_tma_copy(SM90_TMA_LOAD{}, rows_tensor(p.qg, P.shape_w, kK),
                           typename Cfg::LayoutW{}, Shape<_64, _128>{}, _1{});
  P.tma_aqk = make_tma_copy(SM90_TMA_LOAD{}, rows_tensor(p.Aqk, P.shape_aqk, kBT),
                            typename Cfg::LayoutAqk{}, Shape<_64, _64>{}, _1{});
  P.tma_u = make_tma_copy(SM90_TMA_LOAD{}, rows_tensor(p.u, P.shape_u, V), typename Cfg::LayoutU{},
                          Shape<_64, _64>{}, _1{});
  P.tma_kg = make_tma_copy(
      SM90_TMA_LOAD{},
      make_tensor(make_gmem_ptr(static_cast<const Elt*>(p.kg)), P.shape_kg, StrideCols{_1{}, HV * kK, kK}),
      typename Cfg::LayoutKg{}, Shape<_128, _64>{}, _1{});
  P.tma_g = make_tma_copy(
      SM90_TMA_LOAD{},
      make_tensor(make_gmem_ptr(static_cast<const float*>(p.g_cum)), P.shape_g, StrideCols{_1{}, HV * kK, kK}),
      typename Cfg::LayoutG{}, Shape<_128, _1>{}, _1{});

  auto kernel = sm90::state_output_sm90_kernel<Cfg>;
  const int64_t smem = sizeof(typename Cfg::SharedStorage);
  set_dynamic_smem(kernel, smem, max_optin_smem(), "state_output_sm90");
  const int64_t v_tiles = (p.V + Cfg::kBV - 1) / Cfg::kBV;
  const dim3 grid(static_cast<unsigned>(p.N * v_tiles), static_cast<unsigned>(p.HV));
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_state_output_sm90(const ChunkKdaFwdParams& p, cudaStream_t stream) {
  if (p.dtype == DType::kBFloat16) launch_typed_sm90<__nv_bfloat16>(p, stream);
  else launch_typed_sm90<__half>(p, stream);
}

}  // namespace cuda
}  // namespace kda_ext

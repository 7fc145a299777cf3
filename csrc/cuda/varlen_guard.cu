// kda_ext CUDA: kernels and launch layer of the varlen fill guard (see varlen_guard.h).
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "cuda/launch_common.h"
#include "cuda/varlen_guard.h"

namespace kda_ext {
namespace cuda {
namespace {

constexpr int kGuardThreads = 256;

__device__ __forceinline__ int64_t offset_at(const void* cu, bool cu_int64, int64_t i) {
  return cu_int64 ? static_cast<const int64_t*>(cu)[i]
                  : static_cast<int64_t>(static_cast<const int32_t*>(cu)[i]);
}

// One block: every thread checks a strided part of the steps cu[i] -> cu[i + 1].
__global__ void __launch_bounds__(kGuardThreads)
check_offsets_kernel(const void* cu, bool cu_int64, int64_t N, int64_t T, int* flag) {
  __shared__ int bad;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  bool ok = true;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x)
    ok = ok && offset_at(cu, cu_int64, i) <= offset_at(cu, cu_int64, i + 1);
  if (threadIdx.x == 0) ok = ok && offset_at(cu, cu_int64, 0) == 0 && offset_at(cu, cu_int64, N) == T;
  if (!ok) atomicOr(&bad, 1);
  __syncthreads();
  if (threadIdx.x == 0) flag[0] = bad ? 0 : 1;
}

// Grid-stride zero fill of n16 16-byte vectors and `tail` trailing bytes, skipped for valid offsets.
__global__ void __launch_bounds__(kGuardThreads)
zero_unless_valid_kernel(const int* flag, uint4* ptr, int64_t n16, int tail) {
  if (flag[0] == 1) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n16; i += stride)
    ptr[i] = make_uint4(0u, 0u, 0u, 0u);
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < tail)
    reinterpret_cast<unsigned char*>(ptr + n16)[threadIdx.x] = 0;
}

}  // namespace

void launch_check_offsets(const void* cu, bool cu_int64, int64_t N, int64_t T, int* flag,
                          cudaStream_t stream) {
  TORCH_CHECK(N >= 0, "kda_ext: negative number of sequences");
  check_offsets_kernel<<<1, kGuardThreads, 0, stream>>>(cu, cu_int64, N, T, flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_zero_unless_valid(const int* flag, void* ptr, int64_t bytes, cudaStream_t stream) {
  if (bytes <= 0) return;
  TORCH_CHECK(reinterpret_cast<uintptr_t>(ptr) % 16 == 0,
              "kda_ext: launch_zero_unless_valid needs a 16-byte aligned buffer");
  const int64_t n16 = bytes / 16;
  const int tail = static_cast<int>(bytes % 16);
  // Enough blocks to fill at full bandwidth when it runs; each returns at once when it does not.
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(cdiv(n16, kGuardThreads), 1024));
  zero_unless_valid_kernel<<<static_cast<unsigned>(blocks), kGuardThreads, 0, stream>>>(
      flag, static_cast<uint4*>(ptr), n16, tail);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace kda_ext

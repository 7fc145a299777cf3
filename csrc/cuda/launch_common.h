// kda_ext CUDA: helpers shared by the forward and backward launch layers.
#pragma once

#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>

namespace kda_ext {
namespace cuda {

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The most dynamic shared memory one block may opt into on the current device.
inline int max_optin_smem() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return v;
}

// The current device's SM count, asked of the runtime once per device and kept (a device
// attribute: no stream work, no synchronisation, so nothing that breaks CUDA graph capture).
// Both launch layers size their state-pass grids by it.
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0: not asked yet
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const bool cacheable = dev >= 0 && dev < kMaxDevices;
  int n = cacheable ? known[dev].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    if (cacheable) known[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Raises `kernel`'s dynamic shared-memory limit to `bytes`, or fails with a message naming the
// kernel when the device (opt-in maximum `limit`) cannot provide that much.
template <typename Kernel>
void set_dynamic_smem(Kernel kernel, int64_t bytes, int limit, const char* name) {
  TORCH_CHECK(bytes <= limit, "kda_ext: CUDA kernel ", name, " needs ", bytes,
              " bytes of shared memory, the device allows ", limit);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

}  // namespace cuda
}  // namespace kda_ext

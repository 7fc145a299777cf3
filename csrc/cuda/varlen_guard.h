// kda_ext CUDA: the varlen fill guard (host side, no ATen types).
//
// With cu_seqlens on the device and no host copy, the offsets are not validated on the host (that
// would need a sync). Buffers that are read or returned for every token must then hold zeros
// where no sequence covers a token, rather than uninitialised memory. Zero-filling them on every
// call costs one write pass each although valid offsets cover every token; instead one small
// kernel checks the offsets on the device into a flag, and the fills do nothing when it is set.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kda_ext {
namespace cuda {

// flag[0] = 1 when the offsets cover every token exactly once (cu[0] == 0, non-decreasing,
// cu[N] == T), else 0. Zero-length sequences are allowed. cu: int32 or int64 [N + 1].
void launch_check_offsets(const void* cu, bool cu_int64, int64_t N, int64_t T, int* flag,
                          cudaStream_t stream);

// Zeroes `bytes` bytes at `ptr` (16-byte aligned) unless flag[0] == 1.
void launch_zero_unless_valid(const int* flag, void* ptr, int64_t bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace kda_ext

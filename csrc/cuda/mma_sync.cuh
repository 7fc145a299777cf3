// kda_ext CUDA: register-level tensor-core helpers (ldmatrix + mma.sync m16n8k16, fp32 accumulate).
//
// Why these exist beside mma.cuh's wmma: wmma's fragment layouts are opaque, so a kernel that keeps
// an accumulator in registers across products (a state carried over chunks, an output whose rows a
// thread must store or scale) cannot touch its elements without a round trip through shared memory.
// mma.sync's layouts are specified by PTX (ISA, "Matrix Fragments for mma.m16n8k16"); the kernels
// that use these helpers address accumulator elements with the layout below. (A dozen lines of PTX:
// CuTe's equivalents would add a build dependency for no other use.)
//
// Layouts, with g = lane / 4 and t = lane % 4:
//   A (16 x 16, row-major M x K): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..),
//                                 a[3] = (g+8, 2t+8..)            (two 16-bit values per register)
//   B (16 x 8, K x N):            b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8.., n g)
//   C (16 x 8, fp32):             c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
// Operand loaders (ldmatrix, 8 rows of 16 bytes per 8x8 matrix, one row address per lane):
//   - A from a row-major [M][K] tile:          lane l points at (row l % 16, col 8 (l / 16));
//   - A from a row-major [K][M] tile (A = X^T): ldmatrix.trans, lane l points at
//     (row 8 (l / 16) + l % 8, col 8 ((l / 8) % 2));
//   - B for two n-tiles from a row-major [K][N] tile: ldmatrix.trans, lane l points at
//     (row 8 ((l / 8) % 2) + l % 8, col 8 (l / 16)); registers {0, 1} are n-tile 0, {2, 3}
//     n-tile 1.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace kda_ext {
namespace cuda {

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}

// ldmatrix with two 8 x 8 matrices: lanes 0..15 give the row addresses (lanes 16..31 must still
// hold valid shared addresses; the callers pass the same formula).
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row_ptr)));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row_ptr)));
}

// c += a b for one 16 x 8 tile; T (__half or __nv_bfloat16) is the operands' type.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "mma_16x8x16: 16-bit operands only");
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to T (round to nearest even), packed low = x, high = y.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  if constexpr (std::is_same<T, __half>::value) {
    const __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// The two T values of a packed pair, as floats.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t v) {
  if constexpr (std::is_same<T, __half>::value) {
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
  } else {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  }
}

// x0, x1 (adjacent columns) as packed bf16 hi and lo pairs, x0 in the low half: x = hi + lo up to
// lo's rounding, hi = bf16(x), lo = bf16(x - hi) (~16 bits of x's mantissa in two bf16 MMAs). Always
// bf16, whatever the inputs' type: fp16's 5-bit exponent would flush the lo term of small values.
__device__ __forceinline__ void split_bf16x2(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(x0 - hf.x, x1 - hf.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

}  // namespace cuda
}  // namespace kda_ext

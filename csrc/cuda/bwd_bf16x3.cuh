// kda_ext CUDA backward: "bf16x3" products for kernel C (bwd_chunk.cuh): fp32 operands kept in
// shared memory as bf16 hi/lo tiles (hi = bf16(x), lo = bf16(x - hi)) and multiplied as
// a_hi b_hi + a_lo b_hi + a_hi b_lo with mma.sync m16n8k16 (bf16 in, fp32 accumulate), fragments
// loaded by ldmatrix (mma_sync.cuh's layouts).
//
// Precision. hi keeps 8 significant bits of x; lo = bf16(x - hi) the next 8 (|x - hi| <= 2^-8 |x|,
// so |x - hi - lo| <= 2^-16 |x|): each operand is carried to ~2^-16 relative, and a product
// a b (the dropped a_lo b_lo term included) to ~2^-15, so a dot product's error is ~2^-15 of
// sum |a||b| in the worst case (plus fp32 accumulation's own). 3xTF32 (mma_16x16_split_tf32)
// keeps ~22 bits of each operand: ~2^-21. One tf32 pass: ~2^-10, which cost dA_log / ddt_bias
// their margin (the c-tf32-per-product experiment, docs/perf-notes.md). fp64 emulation on the CPU with
// operands shaped like kernel C's (scripts/dev/bf16x3_error.py, 100 trials per kd = 16/32/48):
// worst |error| / sum |a||b| 2^-15.4 (median 2^-19) for bf16x3, 2^-21.0 (2^-24.7) for 3xTF32,
// 2^-10.2 (2^-12.7) for one tf32 pass.
// The split is always to bf16, also for fp16 inputs: fp16's 5-bit exponent flushes the lo term
// of small values (|x| 2^-11 below fp16's normal range) and overflows large ones; bf16 has
// fp32's exponent range.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/mma_sync.cuh"

namespace kda_ext {
namespace cuda {
namespace bwd {

// Eight consecutive values as two 16-byte vectors of bf16 hi and lo (16-byte aligned dst).
__device__ __forceinline__ void store_split8(__nv_bfloat16* hi, __nv_bfloat16* lo,
                                             const float (&v)[8]) {
  uint32_t h[4], l[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) split_bf16x2(v[2 * q], v[2 * q + 1], h[q], l[q]);
  *reinterpret_cast<uint4*>(hi) = make_uint4(h[0], h[1], h[2], h[3]);
  *reinterpret_cast<uint4*>(lo) = make_uint4(l[0], l[1], l[2], l[3]);
}

// One warp: big += A_hi B_hi and small += A_lo B_hi + A_hi B_lo for a 16 x 8 output tile, over
// kd (a multiple of 16). A is 16 x kd: kTransA false, row-major [16][kd] at a_* (row m at
// a + m * lda); kTransA true, stored as [kd][16] (row kk at a + kk * lda) and read transposed.
// B is kd x 8, row-major [kd][8] at b_* (row kk at b + kk * ldb). lda, ldb in elements, rows
// 16-byte aligned. Accumulator layout: mma_sync.cuh's C (c[0..1] row g, c[2..3] row g + 8).
template <bool kTransA>
__device__ __forceinline__ void mma_bf16x3_16x8(float (&big)[4], float (&small)[4],
                                                const __nv_bfloat16* a_hi,
                                                const __nv_bfloat16* a_lo, int lda,
                                                const __nv_bfloat16* b_hi,
                                                const __nv_bfloat16* b_lo, int ldb, int kd) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  // Row addresses (mma_sync.cuh): A non-transposed, lane -> (row lane % 16, col 8 (lane / 16));
  // A transposed, lane -> (stored row 8 (lane / 16) + lane % 8, col 8 ((lane / 8) % 2));
  // B (x2.trans), lane -> stored row lane % 16.
  const int a_off = kTransA ? (8 * (lane >> 4) + (lane & 7)) * lda + 8 * ((lane >> 3) & 1)
                            : (lane & 15) * lda + 8 * (lane >> 4);
  const int b_off = (lane & 15) * ldb;
#pragma unroll 1
  for (int kk = 0; kk < kd; kk += 16) {
    const int ak = kTransA ? kk * lda : kk;
    uint32_t ah[4], al[4], bh[2], bl[2];
    if constexpr (kTransA) {
      ldmatrix_x4_trans(ah, a_hi + a_off + ak);
      ldmatrix_x4_trans(al, a_lo + a_off + ak);
    } else {
      ldmatrix_x4(ah, a_hi + a_off + ak);
      ldmatrix_x4(al, a_lo + a_off + ak);
    }
    ldmatrix_x2_trans(bh, b_hi + b_off + kk * ldb);
    ldmatrix_x2_trans(bl, b_lo + b_off + kk * ldb);
    // Small terms in their own accumulator (added once at the end, as mma_16x16_split_tf32).
    mma_16x8x16<__nv_bfloat16>(small, al, bh[0], bh[1]);
    mma_16x8x16<__nv_bfloat16>(small, ah, bl[0], bl[1]);
    mma_16x8x16<__nv_bfloat16>(big, ah, bh[0], bh[1]);
  }
}

// c (16 x 8 fp32 tile, row-major, ldc floats) = big + small, from mma_sync.cuh's C layout.
__device__ __forceinline__ void store_acc_16x8(float* c, int ldc, const float (&big)[4],
                                               const float (&small)[4]) {
  const int lane = static_cast<int>(threadIdx.x) & 31, g = lane >> 2, t = lane & 3;
  *reinterpret_cast<float2*>(c + g * ldc + 2 * t) = make_float2(big[0] + small[0], big[1] + small[1]);
  *reinterpret_cast<float2*>(c + (g + 8) * ldc + 2 * t) =
      make_float2(big[2] + small[2], big[3] + small[3]);
}

}  // namespace bwd
}  // namespace cuda
}  // namespace kda_ext

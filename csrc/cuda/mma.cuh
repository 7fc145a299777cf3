// kda_ext CUDA: tensor-core helpers (nvcuda::wmma) and element conversions shared by the kernels.
//
// wmma is used instead of hand-written mma.sync/wgmma because its fragment layouts are opaque
// and therefore cannot be gotten wrong: every operand is loaded from shared memory with an
// explicit leading dimension, and accumulators go back to shared memory for the element-wise
// work (the loads and stores are wmma.load/wmma.store issued with the .shared state space, below).
// fp16/bf16 operands use m16n16k16; fp32 operands use tf32 m16n16k8 (each element is rounded
// to tf32 after the load). Accumulators are always fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "cuda/params.h"

namespace kda_ext {
namespace cuda {

namespace wmma = nvcuda::wmma;

// ---- element conversions -------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<double>(double x) { return static_cast<float>(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// x rounded to T's precision, as a float: where the reference stores a value in the input dtype
// and reads it back, the kernels round at the same point.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float<T>(from_float<T>(x));
}

// g and beta are read through a run-time dtype tag (see params.h).
__device__ __forceinline__ float load_any(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kFloat64:
      return static_cast<float>(static_cast<const double*>(p)[i]);
    case DType::kFloat32:
    default:  // the host validated the tag; float32 is the only other value it passes
      return static_cast<const float*>(p)[i];
  }
}

// dst[it] = src[off[it]] as floats. All N loads are issued before any conversion, in one basic
// block: a load under an if is followed by its conversion in the same branch, which waits for it,
// so N conditional loads cost N memory round trips instead of one. Callers pass in-bounds
// offsets for every it (clamped to a valid element) and zero the invalid entries afterwards.
// Offset is int64_t, or int where src already points at the rows that are read (cheaper
// addressing, see chunk_prepare).
template <typename U, typename Offset, int N>
__device__ __forceinline__ void gather(float (&dst)[N], const U* src, const Offset (&off)[N]) {
  U raw[N];
#pragma unroll
  for (int it = 0; it < N; ++it) raw[it] = src[off[it]];
#pragma unroll
  for (int it = 0; it < N; ++it) dst[it] = to_float<U>(raw[it]);
}

// gather() for a tensor whose dtype is known at run time only: one switch around all N loads
// (a switch per load would put every load in a branch of its own, see above).
template <int N>
__device__ __forceinline__ void gather_any(float (&dst)[N], const void* src, DType dt,
                                           const int64_t (&off)[N]) {
  switch (dt) {
    case DType::kFloat16:
      gather(dst, static_cast<const __half*>(src), off);
      break;
    case DType::kBFloat16:
      gather(dst, static_cast<const __nv_bfloat16*>(src), off);
      break;
    case DType::kFloat64:
      gather(dst, static_cast<const double*>(src), off);
      break;
    case DType::kFloat32:
    default:
      gather(dst, static_cast<const float*>(src), off);
      break;
  }
}

// Pairs of neighbouring elements: dst[it] = (src[base + off[it]], src[base + off[it] + 1]) as
// floats, one load per pair for 16- and 32-bit types (base + off[it] even; src aligned to the
// pair's size: 4 bytes for 16-bit, 8 for float), two for double. One switch around all N loads,
// as gather_any; 32-bit offsets from a 64-bit base keep the N addresses cheap to hold.
template <int N>
__device__ __forceinline__ void gather_pairs_any(float2 (&dst)[N], const void* src, DType dt,
                                                 int64_t base, const int (&off)[N]) {
  switch (dt) {
    case DType::kFloat16: {
      const __half2* s = reinterpret_cast<const __half2*>(static_cast<const __half*>(src) + base);
      __half2 raw[N];
#pragma unroll
      for (int it = 0; it < N; ++it) raw[it] = s[off[it] / 2];
#pragma unroll
      for (int it = 0; it < N; ++it) dst[it] = __half22float2(raw[it]);
      break;
    }
    case DType::kBFloat16: {
      const __nv_bfloat162* s = reinterpret_cast<const __nv_bfloat162*>(
          static_cast<const __nv_bfloat16*>(src) + base);
      __nv_bfloat162 raw[N];
#pragma unroll
      for (int it = 0; it < N; ++it) raw[it] = s[off[it] / 2];
#pragma unroll
      for (int it = 0; it < N; ++it) dst[it] = __bfloat1622float2(raw[it]);
      break;
    }
    case DType::kFloat64: {
      const double* s = static_cast<const double*>(src) + base;
      double lo[N], hi[N];
#pragma unroll
      for (int it = 0; it < N; ++it) {
        lo[it] = s[off[it]];
        hi[it] = s[off[it] + 1];
      }
#pragma unroll
      for (int it = 0; it < N; ++it)
        dst[it] = make_float2(static_cast<float>(lo[it]), static_cast<float>(hi[it]));
      break;
    }
    case DType::kFloat32:
    default: {
      const float2* s = reinterpret_cast<const float2*>(static_cast<const float*>(src) + base);
#pragma unroll
      for (int it = 0; it < N; ++it) dst[it] = s[off[it] / 2];
      break;
    }
  }
}

// ---- wmma wrappers -------------------------------------------------------------------------

template <typename T>
struct MmaTraits;
template <>
struct MmaTraits<__half> {
  using Frag = __half;
  static constexpr int kK = 16;
};
template <>
struct MmaTraits<__nv_bfloat16> {
  using Frag = __nv_bfloat16;
  static constexpr int kK = 16;
};
template <>
struct MmaTraits<float> {
  using Frag = wmma::precision::tf32;
  static constexpr int kK = 8;
};

template <typename T>
using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, MmaTraits<T>::kK, float>;

template <typename Frag>
__device__ __forceinline__ void to_tf32_inplace(Frag& f) {
#pragma unroll
  for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
}

// ---- operand loads from the .shared state space -----------------------------------------
// wmma::load_matrix_sync hands ptxas a generic address even when the pointer points into
// __shared__ memory (nvcc does not infer the state space for the wmma intrinsics), so each
// fragment load becomes generic loads, tracked like global ones. The same wmma.load with
// .shared lets ptxas use shared-memory loads (measured on H100: forward -12%, backward -7%,
// docs/perf-notes.md). The fragment layout is the one wmma gives (same instruction, same
// registers in the same order): nothing else changes. The "memory" clobber keeps each load
// ordered with the plain shared-memory stores around it, as the intrinsic is.
#define KDA_WMMA_LD4(AB, LAYOUT, SHAPE, TYPE, f, addr, ld)                                         \
  do {                                                                                             \
    uint32_t* r_ = reinterpret_cast<uint32_t*>(&(f).x[0]);                                         \
    asm volatile("wmma.load." #AB ".sync.aligned." #LAYOUT "." #SHAPE ".shared." #TYPE             \
                 " {%0, %1, %2, %3}, [%4], %5;\n"                                                  \
                 : "=r"(r_[0]), "=r"(r_[1]), "=r"(r_[2]), "=r"(r_[3])                              \
                 : "r"(addr), "r"(ld)                                                              \
                 : "memory");                                                                      \
  } while (0)
#define KDA_WMMA_LD8(AB, LAYOUT, SHAPE, TYPE, f, addr, ld)                                         \
  do {                                                                                             \
    uint32_t* r_ = reinterpret_cast<uint32_t*>(&(f).x[0]);                                         \
    asm volatile("wmma.load." #AB ".sync.aligned." #LAYOUT "." #SHAPE ".shared." #TYPE             \
                 " {%0, %1, %2, %3, %4, %5, %6, %7}, [%8], %9;\n"                                  \
                 : "=r"(r_[0]), "=r"(r_[1]), "=r"(r_[2]), "=r"(r_[3]), "=r"(r_[4]),                \
                   "=r"(r_[5]), "=r"(r_[6]), "=r"(r_[7])                                           \
                 : "r"(addr), "r"(ld)                                                              \
                 : "memory");                                                                      \
  } while (0)

// f = operand fragment (kIsA: matrix_a, else matrix_b) of T at ptr (shared memory), leading
// dimension ld elements, layout kRow (row_major) or column-major, as wmma::load_matrix_sync.
template <typename T, bool kIsA, bool kRow, typename Frag>
__device__ __forceinline__ void load_operand_shared(Frag& f, const T* ptr, int ld) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    if constexpr (kIsA && kRow) KDA_WMMA_LD4(a, row, m16n16k16, bf16, f, addr, ld);
    if constexpr (kIsA && !kRow) KDA_WMMA_LD4(a, col, m16n16k16, bf16, f, addr, ld);
    if constexpr (!kIsA && kRow) KDA_WMMA_LD4(b, row, m16n16k16, bf16, f, addr, ld);
    if constexpr (!kIsA && !kRow) KDA_WMMA_LD4(b, col, m16n16k16, bf16, f, addr, ld);
  } else if constexpr (std::is_same<T, __half>::value) {
    if constexpr (kIsA && kRow) KDA_WMMA_LD8(a, row, m16n16k16, f16, f, addr, ld);
    if constexpr (kIsA && !kRow) KDA_WMMA_LD8(a, col, m16n16k16, f16, f, addr, ld);
    if constexpr (!kIsA && kRow) KDA_WMMA_LD8(b, row, m16n16k16, f16, f, addr, ld);
    if constexpr (!kIsA && !kRow) KDA_WMMA_LD8(b, col, m16n16k16, f16, f, addr, ld);
  } else {
    static_assert(std::is_same<T, float>::value, "fp32 operands load as tf32");
    if constexpr (kIsA && kRow) KDA_WMMA_LD4(a, row, m16n16k8, tf32, f, addr, ld);
    if constexpr (kIsA && !kRow) KDA_WMMA_LD4(a, col, m16n16k8, tf32, f, addr, ld);
    if constexpr (!kIsA && kRow) KDA_WMMA_LD4(b, row, m16n16k8, tf32, f, addr, ld);
    if constexpr (!kIsA && !kRow) KDA_WMMA_LD4(b, col, m16n16k8, tf32, f, addr, ld);
  }
}
#undef KDA_WMMA_LD4
#undef KDA_WMMA_LD8

#define KDA_WMMA_ACC_LD(SHAPE, f, addr, ld)                                                        \
  asm volatile("wmma.load.c.sync.aligned.row." #SHAPE ".shared.f32"                                \
               " {%0, %1, %2, %3, %4, %5, %6, %7}, [%8], %9;\n"                                    \
               : "=f"((f).x[0]), "=f"((f).x[1]), "=f"((f).x[2]), "=f"((f).x[3]),                   \
                 "=f"((f).x[4]), "=f"((f).x[5]), "=f"((f).x[6]), "=f"((f).x[7])                    \
               : "r"(addr), "r"(ld)                                                                \
               : "memory")
#define KDA_WMMA_ACC_ST(SHAPE, f, addr, ld)                                                        \
  asm volatile("wmma.store.d.sync.aligned.row." #SHAPE ".shared.f32"                               \
               " [%0], {%1, %2, %3, %4, %5, %6, %7, %8}, %9;\n"                                    \
               :                                                                                   \
               : "r"(addr), "f"((f).x[0]), "f"((f).x[1]), "f"((f).x[2]), "f"((f).x[3]),            \
                 "f"((f).x[4]), "f"((f).x[5]), "f"((f).x[6]), "f"((f).x[7]), "r"(ld)               \
               : "memory")

// Row-major fp32 accumulator tiles in shared memory, as wmma::load_matrix_sync /
// store_matrix_sync with mem_row_major, through the .shared state space (see above).
template <typename T>
__device__ __forceinline__ void load_acc_shared(AccFrag<T>& f, const float* ptr, int ld) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
  if constexpr (MmaTraits<T>::kK == 16) KDA_WMMA_ACC_LD(m16n16k16, f, addr, ld);
  else KDA_WMMA_ACC_LD(m16n16k8, f, addr, ld);
}
template <typename T>
__device__ __forceinline__ void store_acc_shared(float* ptr, const AccFrag<T>& f, int ld) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
  if constexpr (MmaTraits<T>::kK == 16) KDA_WMMA_ACC_ST(m16n16k16, f, addr, ld);
  else KDA_WMMA_ACC_ST(m16n16k8, f, addr, ld);
}
#undef KDA_WMMA_ACC_LD
#undef KDA_WMMA_ACC_ST

// acc += A[16 x kdim] * B[kdim x 16], operands in shared memory.
// LayoutA row_major: A(m, kk) = a[m * lda + kk]; col_major: a[m + kk * lda].
// LayoutB row_major: B(kk, n) = b[kk * ldb + n]; col_major: b[kk + n * ldb].
// kdim must be a multiple of MmaTraits<T>::kK; pointers 32-byte aligned, ld a multiple of
// 16 bytes (wmma's requirements).
template <typename T, typename LayoutA, typename LayoutB>
__device__ __forceinline__ void mma_16x16(AccFrag<T>& acc, const T* a, int lda, const T* b,
                                          int ldb, int kdim) {
  using Tr = MmaTraits<T>;
  wmma::fragment<wmma::matrix_a, 16, 16, Tr::kK, typename Tr::Frag, LayoutA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, Tr::kK, typename Tr::Frag, LayoutB> fb;
  constexpr bool a_row = std::is_same<LayoutA, wmma::row_major>::value;
  constexpr bool b_row = std::is_same<LayoutB, wmma::row_major>::value;
  // Two accumulation chains (even and odd k steps), added at the end: each MMA waits for the
  // previous one on the same accumulator, and these products are short chains of dependent MMAs
  // that the state kernels run back to back (ncu: "wait" stalls first there).
  wmma::fragment<wmma::matrix_a, 16, 16, Tr::kK, typename Tr::Frag, LayoutA> fa2;
  wmma::fragment<wmma::matrix_b, 16, 16, Tr::kK, typename Tr::Frag, LayoutB> fb2;
  AccFrag<T> acc2;
  wmma::fill_fragment(acc2, 0.f);
  auto load = [&](auto& fx, auto& fy, int kk) {
    load_operand_shared<T, true, a_row>(fx, a + (a_row ? kk : kk * lda), lda);
    load_operand_shared<T, false, b_row>(fy, b + (b_row ? kk * ldb : kk), ldb);
    if constexpr (std::is_same<T, float>::value) {
      to_tf32_inplace(fx);
      to_tf32_inplace(fy);
    }
  };
  int kk = 0;
  for (; kk + 2 * Tr::kK <= kdim; kk += 2 * Tr::kK) {
    load(fa, fb, kk);
    load(fa2, fb2, kk + Tr::kK);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::mma_sync(acc2, fa2, fb2, acc2);
  }
  if (kk < kdim) {
    load(fa, fb, kk);
    wmma::mma_sync(acc, fa, fb, acc);
  }
#pragma unroll
  for (int t = 0; t < acc.num_elements; ++t) acc.x[t] += acc2.x[t];
}

// acc += A * B like mma_16x16<float>, but with fp32-level accuracy ("3xTF32"): each operand is
// split into a tf32 head and a tf32 tail (x = hi + lo, |lo| <= 2^-11 |x|) and the product is
// hi*hi + hi*lo + lo*hi; only the lo*lo term (2^-22 relative) is dropped. Three MMAs instead of
// one. The backward uses it because its gate gradients are sums of many products that cancel:
// plain tf32 (10-bit mantissa) left dA_log/ddt_bias up to 6e-3 off where fp32 gives 3e-4.
template <typename LayoutA, typename LayoutB>
__device__ __forceinline__ void mma_16x16_split_tf32(AccFrag<float>& acc, const float* a, int lda,
                                                     const float* b, int ldb, int kdim) {
  using Tr = MmaTraits<float>;
  wmma::fragment<wmma::matrix_a, 16, 16, Tr::kK, Tr::Frag, LayoutA> a_hi, a_lo;
  wmma::fragment<wmma::matrix_b, 16, 16, Tr::kK, Tr::Frag, LayoutB> b_hi, b_lo;
  constexpr bool a_row = std::is_same<LayoutA, wmma::row_major>::value;
  constexpr bool b_row = std::is_same<LayoutB, wmma::row_major>::value;
  AccFrag<float> acc_la, acc_lb;  // a_lo * b_hi and a_hi * b_lo
  wmma::fill_fragment(acc_la, 0.f);
  wmma::fill_fragment(acc_lb, 0.f);
  for (int kk = 0; kk < kdim; kk += Tr::kK) {
    load_operand_shared<float, true, a_row>(a_hi, a + (a_row ? kk : kk * lda), lda);
    load_operand_shared<float, false, b_row>(b_hi, b + (b_row ? kk * ldb : kk), ldb);
#pragma unroll
    for (int t = 0; t < a_hi.num_elements; ++t) {
      const float x = a_hi.x[t], hi = wmma::__float_to_tf32(x);
      a_hi.x[t] = hi;
      a_lo.x[t] = wmma::__float_to_tf32(x - hi);
    }
#pragma unroll
    for (int t = 0; t < b_hi.num_elements; ++t) {
      const float x = b_hi.x[t], hi = wmma::__float_to_tf32(x);
      b_hi.x[t] = hi;
      b_lo.x[t] = wmma::__float_to_tf32(x - hi);
    }
    // The small terms go to their own accumulators (summed among themselves, then added once,
    // so the large one cannot absorb them) and the three chains of dependent MMAs run side by side.
    wmma::mma_sync(acc_la, a_lo, b_hi, acc_la);
    wmma::mma_sync(acc_lb, a_hi, b_lo, acc_lb);
    wmma::mma_sync(acc, a_hi, b_hi, acc);
  }
#pragma unroll
  for (int t = 0; t < acc.num_elements; ++t) {
    float small = 0.f;
    small += acc_la.x[t];
    small += acc_lb.x[t];
    acc.x[t] += small;
  }
}

// ---- 8-wide vectors ----------------------------------------------------------------------
// Eight consecutive elements as floats: one 16-byte load for fp16/bf16, two for fp32. The
// kernels take their vector paths when every row offset is a multiple of 8 elements and the
// base is 16-byte aligned (K/V of 64/128/256: the shapes that matter for speed); the scalar
// paths stay for K = 60/100 and the like.
struct F8 {
  float v[8];
};

template <typename T>
__device__ __forceinline__ F8 load8(const T* ptr) {
  F8 o;
  if constexpr (sizeof(T) == 2) {
    const uint4 x = *reinterpret_cast<const uint4*>(ptr);
    const T* e = reinterpret_cast<const T*>(&x);
#pragma unroll
    for (int j = 0; j < 8; ++j) o.v[j] = to_float<T>(e[j]);
  } else {
    const float4 a = reinterpret_cast<const float4*>(ptr)[0];
    const float4 b = reinterpret_cast<const float4*>(ptr)[1];
    o.v[0] = a.x; o.v[1] = a.y; o.v[2] = a.z; o.v[3] = a.w;
    o.v[4] = b.x; o.v[5] = b.y; o.v[6] = b.z; o.v[7] = b.w;
  }
  return o;
}

__device__ __forceinline__ F8 zero8() {
  F8 o;
#pragma unroll
  for (int j = 0; j < 8; ++j) o.v[j] = 0.f;
  return o;
}

// dst must be 16-byte aligned (tile leading dims are multiples of 4 floats, column 8j).
__device__ __forceinline__ void store8(float* dst, const F8& x) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(x.v[0], x.v[1], x.v[2], x.v[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(x.v[4], x.v[5], x.v[6], x.v[7]);
}

// Also called by the launch layers to decide whether a 16-byte-vector kernel may take a tensor.
__host__ __device__ __forceinline__ bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// ---- cp.async (16 bytes, global -> shared, no registers) -----------------------------------
__device__ __forceinline__ void cp_async16(void* smem_ptr, const void* gmem_ptr, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_ptr));
  const int n = valid ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem_ptr), "r"(n)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// dst[i][c] = src[i * stride + c] for i < rows_valid and c < cols_valid, zero elsewhere in
// [rows_total, cols_total). With vec (the caller checked 16-byte alignment of every row and
// that cols_valid is a multiple of the vector width) the copies are cp.async and complete at a
// later cp_async_wait; otherwise they are plain loads/stores, complete at return. Either way a
// __syncthreads is needed before other threads read dst. Never forms an address outside the
// valid rectangle.
template <typename U, int kThreads>
__device__ __forceinline__ void issue_tile(U* dst, int ld, const U* src, int64_t stride,
                                           int rows_valid, int rows_total, int64_t cols_valid,
                                           int cols_total, bool vec) {
  constexpr int kVec = 16 / sizeof(U);
  if (vec) {
    const int cv = cols_total / kVec;
    if (kThreads % cv == 0) {
      // Each thread keeps one column of vectors and walks rows kThreads / cv apart: no division
      // per vector. The loop below divides by the run-time cv for every vector, most of the
      // ~35 instructions each copy cost, and the state kernels are issue-bound (ncu on
      // chunk_state_output_kernel: 334K instructions per warp, "wait" and issue stalls first).
      const int c = static_cast<int>(threadIdx.x % cv) * kVec;
      const int row_step = kThreads / cv;
      const bool col_ok = c < cols_valid;
#pragma unroll 1
      for (int i = static_cast<int>(threadIdx.x / cv); i < rows_total; i += row_step) {
        const bool ok = i < rows_valid && col_ok;
        cp_async16(dst + i * ld + c, ok ? src + i * stride + c : src, ok);
      }
      return;
    }
#pragma unroll 1
    for (int idx = threadIdx.x; idx < rows_total * cv; idx += kThreads) {
      const int i = idx / cv, c = (idx % cv) * kVec;
      const bool ok = i < rows_valid && c < cols_valid;
      cp_async16(dst + i * ld + c, ok ? src + i * stride + c : src, ok);
    }
  } else {
#pragma unroll 1
    for (int idx = threadIdx.x; idx < rows_total * cols_total; idx += kThreads) {
      const int i = idx / cols_total, c = idx % cols_total;
      dst[i * ld + c] = (i < rows_valid && c < cols_valid) ? src[i * stride + c] : U(0.f);
    }
  }
}

// acc += one of mma_16x16's two accumulation chains for row-major A [16 x kdim] and B [kdim x 16]:
// the products of the k steps parity, parity + 2, ... in that order. mma_16x16 runs the even
// steps (an odd count's last step among them) into acc and the odd ones into a second
// accumulator from zero, then adds that to acc; so, from zero accumulators, (even chain) + (odd
// chain) here is mma_16x16's result bit for bit. The BV = 16 build splits w Sh over two warps
// this way (see the header).
template <typename T>
__device__ __forceinline__ void mma_16x16_chain(AccFrag<T>& acc, const T* a, int lda, const T* b,
                                                int ldb, int kdim, int parity) {
  using Tr = MmaTraits<T>;
  wmma::fragment<wmma::matrix_a, 16, 16, Tr::kK, typename Tr::Frag, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, Tr::kK, typename Tr::Frag, wmma::row_major> fb;
  for (int kk = parity * Tr::kK; kk < kdim; kk += 2 * Tr::kK) {
    load_operand_shared<T, true, true>(fa, a + kk, lda);
    load_operand_shared<T, false, true>(fb, b + kk * ldb, ldb);
    if constexpr (std::is_same<T, float>::value) {
      to_tf32_inplace(fa);
      to_tf32_inplace(fb);
    }
    wmma::mma_sync(acc, fa, fb, acc);
  }
}

// for (int i = first; i < end; i += step) body(i), kept rolled (#pragma unroll 1) when kRolled.
template <bool kRolled, typename F>
__device__ __forceinline__ void for_strided(int first, int end, int step, F&& body) {
  if constexpr (kRolled) {
#pragma unroll 1
    for (int i = first; i < end; i += step) body(i);
  } else {
    for (int i = first; i < end; i += step) body(i);
  }
}

// The other direction, for 16-bit tiles: dst[i * dst_ld + c] = src[i * src_ld + c] for i < rows
// and c < cols_valid (cols_valid <= kCols). With vec (the caller checked that cols_valid == kCols
// and that dst's rows are 16-byte aligned) each thread copies 16-byte vectors, else elements.
// The caller publishes src with a barrier first.
template <typename U, int kThreads, int kCols>
__device__ __forceinline__ void store_smem_tile(U* dst, int dst_ld, const U* src, int src_ld,
                                                int rows, int cols_valid, bool vec) {
  static_assert(sizeof(U) == 2 && kCols % 8 == 0, "store_smem_tile: 16-bit tiles, whole vectors");
  if (vec) {
    for (int idx = threadIdx.x; idx < rows * (kCols / 8); idx += kThreads) {
      const int i = idx / (kCols / 8), c = (idx % (kCols / 8)) * 8;
      *reinterpret_cast<uint4*>(dst + i * dst_ld + c) =
          *reinterpret_cast<const uint4*>(src + i * src_ld + c);
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * kCols; idx += kThreads) {
      const int i = idx / kCols, c = idx % kCols;
      if (c < cols_valid) dst[i * dst_ld + c] = src[i * src_ld + c];
    }
  }
}

// ---- shared-memory carving -----------------------------------------------------------------

__host__ __device__ constexpr int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// Sub-buffers start on 128-byte boundaries (wmma needs 32).
struct SmemCarver {
  int64_t offset = 0;
  template <typename U>
  __host__ __device__ int64_t take(int64_t count) {
    const int64_t at = align_up(offset, 128);
    offset = at + count * static_cast<int64_t>(sizeof(U));
    return at;
  }
};

// ---- chunk geometry ------------------------------------------------------------------------

// Sequence n's token range [bos, eos) relative to its batch row, clamped into [0, T] so that a
// garbage cu_seqlens can never move a load or store out of bounds.
struct SeqRange {
  int64_t bos, eos;
};

__device__ __forceinline__ int64_t load_cu(const ChunkKdaFwdParams& p, int64_t i) {
  return p.cu_seqlens_int64 ? static_cast<const int64_t*>(p.cu_seqlens)[i]
                            : static_cast<int64_t>(static_cast<const int32_t*>(p.cu_seqlens)[i]);
}

__device__ __forceinline__ SeqRange seq_range(const ChunkKdaFwdParams& p, int64_t n) {
  if (!p.varlen) return {0, p.T};
  int64_t bos = load_cu(p, n), eos = load_cu(p, n + 1);
  bos = bos < 0 ? 0 : (bos > p.T ? p.T : bos);
  eos = eos < bos ? bos : (eos > p.T ? p.T : eos);
  return {bos, eos};
}

}  // namespace cuda
}  // namespace kda_ext

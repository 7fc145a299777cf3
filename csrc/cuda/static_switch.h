// kda_ext CUDA: compile-time dispatch switches whose fallthrough is an error, never a default.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/util/Exception.h>

#include "cuda/params.h"

// q/k/v storage dtype -> element type. float64 never reaches the CUDA kernels.
#define KDA_DTYPE_SWITCH(DT, TYPE_NAME, ...)                                                  \
  [&] {                                                                                       \
    switch (DT) {                                                                             \
      case ::kda_ext::cuda::DType::kFloat16: {                                                \
        using TYPE_NAME = __half;                                                             \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case ::kda_ext::cuda::DType::kBFloat16: {                                               \
        using TYPE_NAME = __nv_bfloat16;                                                      \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      case ::kda_ext::cuda::DType::kFloat32: {                                                \
        using TYPE_NAME = float;                                                              \
        return __VA_ARGS__();                                                                 \
      }                                                                                       \
      default:                                                                                \
        break;                                                                                \
    }                                                                                         \
    TORCH_CHECK(false, "kda_ext: the CUDA kernels support float16, bfloat16 and float32 "     \
                       "q/k/v, got dtype tag ", static_cast<int>(DT));                        \
  }()

// Chunk size -> compile-time BT.
#define KDA_CHUNK_SWITCH(BT_VALUE, CONST_NAME, ...)                                           \
  [&] {                                                                                       \
    if ((BT_VALUE) == 64) {                                                                   \
      constexpr static int CONST_NAME = 64;                                                   \
      return __VA_ARGS__();                                                                   \
    } else if ((BT_VALUE) == 32) {                                                            \
      constexpr static int CONST_NAME = 32;                                                   \
      return __VA_ARGS__();                                                                   \
    }                                                                                         \
    TORCH_CHECK(false, "kda_ext: chunk_size must be 32 or 64 in the CUDA kernels, got ",     \
                (BT_VALUE));                                                                  \
  }()

// kda_ext CUDA: helpers shared by the forward and backward ATen bindings.
#pragma once

#include <ATen/ATen.h>

#include "cuda/params.h"

namespace kda_ext {
namespace cuda {

// The kernels' run-time dtype tag of a floating tensor; `name` is the argument, for the message.
inline DType dtype_tag(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      break;
  }
  TORCH_CHECK(false, "kda_ext: ", name, " must be float16, bfloat16, float32 or float64, got ",
              t.scalar_type());
}

}  // namespace cuda
}  // namespace kda_ext

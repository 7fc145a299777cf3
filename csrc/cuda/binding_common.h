// kda_ext CUDA: helpers shared by the forward and backward ATen bindings.
#pragma once

#include <ATen/ATen.h>

#include "cuda/params.h"

namespace kda_ext {
namespace cuda {

// What both CUDA bindings require of q beyond the shared checks (csrc/checks.h): a CUDA tensor, and
// not float64 (the CPU backend serves float64, e.g. for gradcheck). `op` names the op.
inline void check_cuda_inputs(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.is_cuda(), "kda_ext: ", op, " (CUDA) needs CUDA tensors, got q on ", q.device());
  TORCH_CHECK(q.scalar_type() != at::kDouble,
              "kda_ext: the CUDA backend does not support float64 q/k/v (use the CPU backend "
              "for float64, e.g. for gradcheck), got ", q.scalar_type());
}

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

// kda_ext CUDA: helpers shared by the forward and backward ATen bindings.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include "cuda/params.h"
#include "cuda/varlen_guard.h"

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

// The varlen fill guard of one call (varlen_guard.h): checks the device offsets once, then
// zero_unless_valid(t) zeroes t only when they do not cover every token exactly once.
class VarlenFillGuard {
 public:
  VarlenFillGuard(const at::Tensor& cu, int64_t N, int64_t T, cudaStream_t stream)
      : flag_(at::empty({1}, cu.options().dtype(at::kInt))), stream_(stream) {
    launch_check_offsets(cu.data_ptr(), cu.scalar_type() == at::kLong, N, T,
                         flag_.data_ptr<int>(), stream_);
  }
  void zero_unless_valid(const at::Tensor& t) const {
    launch_zero_unless_valid(flag_.data_ptr<int>(), t.data_ptr(), static_cast<int64_t>(t.nbytes()),
                             stream_);
  }

 private:
  at::Tensor flag_;
  cudaStream_t stream_;
};

}  // namespace cuda
}  // namespace kda_ext

// kda_ext CUDA: the plain parameter struct of the fused_recurrent_kda (decode) kernel (no ATen).
#pragma once

#include <cstdint>

#include "cuda/params.h"

namespace kda_ext {
namespace cuda {

struct FusedRecurrentParams {
  // Inputs, contiguous. q/k: [B,T,H,K]; v: [B,T,HV,V]; g: [B,T,HV,K]; beta: [B,T,HV].
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* g = nullptr;
  const void* beta = nullptr;
  const float* A_log = nullptr;    // [HV]; null: factor 1 (lower-bound gate only)
  const float* dt_bias = nullptr;  // [HV*K]; null: no bias
  const void* cu_seqlens = nullptr;  // [N+1] int32 or int64; null: fixed length
  bool cu_seqlens_int64 = true;
  // [N] int32 or int64 state slot per sequence; null: sequence n uses slot n. Negative: padding
  // (skipped, outputs 0); >= num_slots: out of range (skipped, outputs NaN, nothing else touched).
  const void* slots = nullptr;
  bool slots_int64 = true;
  int64_t num_slots = 0;

  // States: slot arrays of [HV, K, V] (or [HV, V, K]) fp32 tiles, dense inside a slot, with
  // `*_stride` floats between slots. state_in null: zero initial state. state_out null: the
  // final state is not stored; out_by_slot: it goes to the sequence's slot (in place, state_out
  // may equal state_in), else to row n.
  const float* state_in = nullptr;
  int64_t state_in_stride = 0;
  float* state_out = nullptr;
  int64_t state_out_stride = 0;
  bool out_by_slot = false;

  void* o = nullptr;  // [B,T,HV,V], dtype of q

  int64_t B = 0, T = 0, H = 0, HV = 0, K = 0, V = 0, N = 0;
  float scale = 1.f;
  float lower_bound = 0.f;
  DType dtype = DType::kFloat32;  // q, k, v, o
  DType g_dtype = DType::kFloat32;
  DType beta_dtype = DType::kFloat32;
  bool use_qk_l2norm = false;
  bool use_gate_in_kernel = false;
  bool use_lower_bound_gate = false;  // with use_gate_in_kernel: lb*sigmoid(..) instead of softplus
  bool use_beta_sigmoid = false;
  bool allow_neg_eigval = false;
  bool state_v_first = false;
};

}  // namespace cuda
}  // namespace kda_ext

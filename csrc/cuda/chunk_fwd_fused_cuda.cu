// kda_ext CUDA: ATen binding of kda_ext::chunk_kda_fwd_fused, the fused Hopper forward
// (sm90/fused_fwd_sm90.cuh): o and the final state, no intermediates (so: no backward from it;
// kda_ext.chunk_kda routes calls that need gradients to kda_ext::chunk_kda_fwd).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/binding_common.h"
#include "cuda/mma.cuh"  // aligned16
#include "cuda/params.h"
#ifdef KDA_EXT_WITH_SM90
#include "cuda/sm90/launch_sm90.h"
#endif

namespace kda_ext {

namespace {

#ifdef KDA_EXT_WITH_SM90
// A copy when the kernel's 16-byte loads could not take the tensor as it is.
at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return cuda::aligned16(c.data_ptr()) ? c : c.clone();
}
#endif

std::tuple<at::Tensor, at::Tensor> chunk_kda_fwd_fused_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& g_in,
    const at::Tensor& beta_in, double scale, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& A_log, const std::optional<at::Tensor>& dt_bias,
    const std::optional<at::Tensor>& cu_seqlens, bool use_qk_l2norm, bool use_gate_in_kernel,
    bool use_beta_sigmoid, bool allow_neg_eigval, std::optional<double> lower_bound,
    bool state_v_first, bool output_final_state) {
  const KdaDims d = check_chunk_kda_args(q_in, k_in, v_in, g_in, beta_in, initial_state, A_log,
                                         dt_bias, cu_seqlens, use_gate_in_kernel, lower_bound,
                                         state_v_first, /*chunk_size=*/64);
  cuda::check_cuda_inputs(q_in, "chunk_kda_fwd_fused");
  c10::cuda::CUDAGuard guard(q_in.device());
#ifndef KDA_EXT_WITH_SM90
  TORCH_CHECK(false, "kda_ext: chunk_kda_fwd_fused needs the sm_90a build (KDA_EXT_CUDA_ARCHS with 90a); "
              "this build has no Hopper kernels");
  return {};
#else
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q_in.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q_in.get_device()));
  TORCH_CHECK(major == 9 && minor == 0,
              "kda_ext: chunk_kda_fwd_fused needs an sm_90 GPU (H100/H200), got compute capability ",
              major, ".", minor);
  const at::Tensor q = contiguous_aligned(q_in);
  const at::Tensor k = contiguous_aligned(k_in);
  const at::Tensor v = contiguous_aligned(v_in);
  const at::Tensor g = contiguous_aligned(g_in);
  const at::Tensor beta = beta_in.contiguous();
  at::Tensor h0, alog, bias, cu;
  if (initial_state.has_value()) h0 = initial_state->contiguous();
  if (use_gate_in_kernel && A_log.has_value()) alog = A_log->to(at::kFloat).contiguous();
  if (use_gate_in_kernel && dt_bias.has_value()) bias = dt_bias->to(at::kFloat).contiguous();
  if (d.varlen) cu = cu_seqlens->contiguous();
  const int64_t B = d.B, T = d.T, HV = d.HV, K = d.K, V = d.V, N = d.N;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor o = at::empty({B, T, HV, V}, q.options());
  // Tokens no sequence covers (offsets not validated on the host) read as zeros.
  if (d.varlen) cuda::VarlenFillGuard(cu, N, T, stream).zero_unless_valid(o);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor final_state = output_final_state
                               ? (state_v_first ? at::empty({N, HV, V, K}, f32) : at::empty({N, HV, K, V}, f32))
                               : q.new_empty({0}, f32);

  cuda::ChunkKdaFwdParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.g = g.data_ptr();
  p.beta = beta.data_ptr();
  p.h0 = h0.defined() ? h0.data_ptr<float>() : nullptr;
  p.A_log = alog.defined() ? alog.data_ptr<float>() : nullptr;
  p.dt_bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.cu_seqlens = d.varlen ? cu.data_ptr() : nullptr;
  p.cu_seqlens_int64 = d.varlen ? cu.scalar_type() == at::kLong : true;
  p.o = o.data_ptr();
  p.final_state = output_final_state ? final_state.data_ptr<float>() : nullptr;
  p.B = B;
  p.T = T;
  p.H = d.H;
  p.HV = HV;
  p.K = K;
  p.V = V;
  p.N = N;
  p.NT = 0;
  p.BT = 16;
  p.scale = static_cast<float>(scale);
  p.dtype = cuda::dtype_tag(q, "q");
  p.g_dtype = cuda::dtype_tag(g, "g");
  p.beta_dtype = cuda::dtype_tag(beta, "beta");
  p.varlen = d.varlen;
  p.use_qk_l2norm = use_qk_l2norm;
  p.use_gate_in_kernel = use_gate_in_kernel;
  p.use_lower_bound_gate = use_gate_in_kernel && lower_bound.has_value();
  p.lower_bound = lower_bound.has_value() ? static_cast<float>(*lower_bound) : 0.f;
  p.use_beta_sigmoid = use_beta_sigmoid;
  p.allow_neg_eigval = allow_neg_eigval;
  p.safe_gate = false;  // not read: the kernel checks each chunk's gate range itself
  p.state_v_first = state_v_first;
  TORCH_CHECK(cuda::fused_fwd_sm90_applies(p),
              "kda_ext: chunk_kda_fwd_fused serves bf16 q/k/v with K = V = 128 (16-byte aligned, "
              "g of float32/bf16/fp16); got q ", q.scalar_type(), ", K=", K, ", V=", V, ", g ",
              g.scalar_type());
  TORCH_CHECK(B * T < (int64_t(1) << 31), "kda_ext: chunk_kda_fwd_fused needs B*T < 2^31, got ", B * T);
  if (N > 0 && HV > 0) cuda::launch_fused_fwd_sm90(p, stream);
  return {o, final_state};
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(kda_ext, CUDA, m) { m.impl("chunk_kda_fwd_fused", &chunk_kda_fwd_fused_cuda); }

}  // namespace kda_ext

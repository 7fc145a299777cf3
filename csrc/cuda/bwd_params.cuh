// kda_ext CUDA backward: the plain parameter struct of the chunk_kda backward kernels (no ATen).
#pragma once

#include <cstdint>

#include "cuda/params.h"

namespace kda_ext {
namespace cuda {

// Slice widths. K is processed in 64-column slices (one block per slice in the per-chunk
// kernels, so K <= 256 never needs more than ~200 KB of shared memory); the reverse state pass
// splits V into 32-column slices to give the sequential kernel more blocks, or into 16-column
// slices (kBwdStateBVNarrow) when the 32-column grid leaves SMs idle (see launch_bwd.cu).
constexpr int kBwdKSlice = 64;
constexpr int kBwdMaxKSlices = 4;  // K <= 256 (checked by the launch layer)
constexpr int kBwdVTile = 64;
constexpr int kBwdStateBV = 32;
constexpr int kBwdStateBVNarrow = 16;
constexpr int kBwdThreads = 512;  // 64 rows x 8 threads: row_sum_8 relies on it
// The sequential reverse state pass: 256 measured faster than 512 (fewer warps idle in its narrow GEMMs).
constexpr int kBwdStateThreads = 256;

struct ChunkKdaBwdParams {
  // Inputs, all contiguous. q/k: [B,T,H,K]; v/do: [B,T,HV,V]; g: [B,T,HV,K]; beta: [B,T,HV].
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* g = nullptr;     // raw g (read only by the in-kernel gate backward)
  const void* beta = nullptr;  // raw beta
  const void* A_log = nullptr;    // [HV], a_log_dtype; null: factor 1 (lower-bound gate only)
  const void* dt_bias = nullptr;  // [HV*K], dt_bias_dtype; null: no bias
  const void* cu_seqlens = nullptr;  // [N+1] int32 or int64; null: fixed length
  bool cu_seqlens_int64 = true;

  // Saved or recomputed forward intermediates (dtype of q unless said otherwise).
  const void* Aqk = nullptr;      // [B,T,HV,BT]
  const void* Akk = nullptr;      // [B,T,HV,BT]
  const float* g_cum = nullptr;   // [B,T,HV,K] float32
  const void* w = nullptr;        // [B,T,HV,K]
  const void* qg = nullptr;       // [B,T,HV,K]
  const void* kg = nullptr;       // [B,T,HV,K]
  const void* v_new = nullptr;    // [B,T,HV,V]
  const void* h = nullptr;        // [B*NT,HV,K,V] or [B*NT,HV,V,K]
  const void* dout = nullptr;     // [B,T,HV,V]
  const float* dht = nullptr;     // [N,HV,K,V] or [N,HV,V,K]; null: zero

  // Outputs.
  void* dq = nullptr;        // [B,T,H,K], dtype of q
  void* dk = nullptr;        // [B,T,H,K]
  void* dv = nullptr;        // [B,T,HV,V]; zero-filled by the host with cu_seqlens (tokens no sequence covers)
  void* dg = nullptr;        // [B,T,HV,K], g_dtype; zero-filled by the host with cu_seqlens
  void* dbeta = nullptr;     // [B,T,HV], beta_dtype
  void* dA_log = nullptr;    // [HV], a_log_dtype; null: not wanted
  void* ddt_bias = nullptr;  // [HV*K], dt_bias_dtype; null: not wanted
  float* dh0 = nullptr;      // like dht; null: not wanted

  // Workspaces (float32 unless said otherwise). "tok" = b*T + t.
  int64_t* seq_bounds = nullptr;  // [N+1]: clamped token offsets (b*T for fixed length)
  int64_t* chunk_offsets = nullptr;  // [N+1]: first h slot of each sequence
  // dh and dvn are stored in the dtype of q (T of the kernels: fp16/bf16 rounded copies of the
  // fp32 values bwd_state accumulates, as FLA stores dh and dv_new; fp32 for fp32 inputs). They
  // are the two largest workspaces and both live at kChunkA, the backward's memory peak.
  void* dh = nullptr;          // [B*NT,HV,K,V]: dLoss/d(state leaving the chunk), always [K,V]
  void* dvn = nullptr;         // [B*T,HV,V]: dLoss/dv_new
  float* dAkk_part = nullptr;  // [NKS,B*T,HV,BT]: per-K-slice partials of dLoss/dAkk
  float* dAqk = nullptr;       // [B*T,HV,BT]: scale * masked dLoss/dAqk
  float* dL = nullptr;         // [B*T,HV,BT]: masked dLoss/dLkk
  float* dq_hv = nullptr;      // [B*T,HV,K]: dLoss/dq_hat per value head (zero-filled with cu_seqlens)
  float* dk_hv = nullptr;      // [B*T,HV,K] (zero-filled with cu_seqlens)
  float* dG = nullptr;         // [B*T,HV,K]: dLoss/dg_cum (before the reverse cumsum)
  float* rstd_qk = nullptr;    // [2,B*T,H]: l2norm rstd of the q rows, then the k rows (C reads it)
  bool rstd_ready = false;      // rstd_qk was filled by the recompute (A reads it); else A writes it
  float* dbeta_part = nullptr;  // [NKS+1,B*T,HV]: per-K-slice partials, slot NKS = V part (zero-filled with cu_seqlens)
  float* ddt_part = nullptr;   // [B*NT,HV,K]: per-chunk partial sums of dLoss/ddt_bias
  float* dA_part = nullptr;    // [B*NT,HV,NKS]: per-chunk, per-slice partials of dLoss/dA_log

  // Sizes. NT is the slot count of h per batch row (shape-only upper bound with cu_seqlens).
  int64_t B = 0, T = 0, H = 0, HV = 0, K = 0, V = 0, N = 0, NT = 0;
  int BT = 64;
  int NKS = 1;  // ceil(K / kBwdKSlice)

  float scale = 1.f;
  float lower_bound = 0.f;
  DType dtype = DType::kFloat32;  // q, k, v, do and the stored intermediates
  DType g_dtype = DType::kFloat32;
  DType beta_dtype = DType::kFloat32;
  DType a_log_dtype = DType::kFloat32;
  DType dt_bias_dtype = DType::kFloat32;

  bool varlen = false;
  bool use_qk_l2norm = false;
  bool use_gate_in_kernel = false;
  bool use_lower_bound_gate = false;
  bool use_beta_sigmoid = false;
  bool allow_neg_eigval = false;
  bool state_v_first = false;
};

}  // namespace cuda
}  // namespace kda_ext

// kda_ext CUDA: the plain parameter struct of the chunk_kda forward kernels (no ATen here).
#pragma once

#include <cstdint>

namespace kda_ext {
namespace cuda {

// g and beta may come in another float dtype than q/k/v; the kernels read them through this tag
// instead of multiplying the template instantiations.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct ChunkKdaFwdParams {
  // Inputs, all contiguous. q/k: [B,T,H,K]; v: [B,T,HV,V]; g: [B,T,HV,K]; beta: [B,T,HV].
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* g = nullptr;
  const void* beta = nullptr;
  const float* h0 = nullptr;       // [N,HV,K,V] or [N,HV,V,K] (state_v_first); null: zero state
  const float* A_log = nullptr;    // [HV]; null: factor 1 (lower-bound gate only)
  const float* dt_bias = nullptr;  // [HV*K]; null: no bias
  const void* cu_seqlens = nullptr;  // [N+1] int32 or int64; null: fixed length
  bool cu_seqlens_int64 = true;

  // The backward's recompute: the Akk the forward saved ([B,T,HV,BT], dtype of k). When set,
  // chunk_prepare takes (I + L)^-1 from it instead of computing Aqk, L and the inverse again, and
  // writes neither Aqk nor Akk (the backward already holds both).
  const void* Akk_saved = nullptr;

  // Outputs and workspaces (see docs/design.md for shapes). o, v_new, h and final_state may be
  // null (not requested: the recompute needs no o); the others are always written.
  void* o = nullptr;            // [B,T,HV,V], dtype of q
  float* final_state = nullptr;  // [N,HV,K,V] or [N,HV,V,K]
  void* Aqk = nullptr;          // [B,T,HV,BT], dtype of k
  void* Akk = nullptr;          // [B,T,HV,BT], dtype of k
  float* g_cum = nullptr;       // [B,T,HV,K]
  void* w = nullptr;            // [B,T,HV,K], dtype of k
  void* u = nullptr;            // [B,T,HV,V], dtype of v
  void* qg = nullptr;           // [B,T,HV,K], dtype of k
  void* kg = nullptr;           // [B,T,HV,K], dtype of k
  void* v_new = nullptr;        // [B,T,HV,V], dtype of v
  void* h = nullptr;            // [B,NT,HV,K,V] or [B,NT,HV,V,K], dtype of k
  float* rstd_qk = nullptr;     // [2,B*T,H] or null: chunk_prepare stores the l2norm rstd of every q
                                //   row, then every k row (the backward's recompute hands it on)
  int64_t* chunk_offsets = nullptr;  // [N+1] workspace, varlen only: first h slot per sequence

  // Sizes. NT is the slot count of h per batch row (shape-only upper bound with cu_seqlens).
  int64_t B = 0, T = 0, H = 0, HV = 0, K = 0, V = 0, N = 0, NT = 0;
  int BT = 64;

  float scale = 1.f;
  float lower_bound = 0.f;
  DType dtype = DType::kFloat32;  // q, k, v
  DType g_dtype = DType::kFloat32;
  DType beta_dtype = DType::kFloat32;

  bool varlen = false;
  bool use_qk_l2norm = false;
  bool use_gate_in_kernel = false;
  bool use_lower_bound_gate = false;  // with use_gate_in_kernel: lb*sigmoid(..) instead of softplus
  bool use_beta_sigmoid = false;
  bool allow_neg_eigval = false;
  bool safe_gate = false;
  bool state_v_first = false;
};

}  // namespace cuda
}  // namespace kda_ext

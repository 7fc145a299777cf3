// kda_ext CPU backend: parameters and stages of the chunk_kda backward pipeline.
#pragma once

#include <cstdint>

#include "cpu/common.h"

namespace kda_ext {
namespace cpu {

// Everything the backward stages read and write, ATen-free. T is the compute dtype; the saved or
// recomputed intermediates are storage tensors in p.qkv_dt (g_cum in the compute dtype).
template <class T>
struct BwdParams {
  Params p;
  const void* Aqk;  // [B,T,HV,BT]
  const void* Akk;  // [B,T,HV,BT]
  const T* g_cum;   // [B,T,HV,K]
  const void* w;    // [B,T,HV,K]
  const void* qg;   // [B,T,HV,K]
  const void* kg;   // [B,T,HV,K]
  const void* v_new;  // [B,T,HV,V]
  const void* h;      // [B*NT,HV,K,V] ([.., V, K] if state_v_first)
  const void* dout;   // [B,T,HV,V]
  Dt dout_dt;
  const T* dht;  // [N,HV,K,V] ([.., V, K] if state_v_first) or nullptr

  // Workspaces and outputs.
  T* dh;      // [B*NT,HV,K,V]: dLoss/d(state leaving each chunk), always [K,V]
  T* dvn;     // [B*T,HV,V]: dLoss/dv_new
  T* dh0;     // [N,HV,K,V]: dLoss/d(initial state), always [K,V]
  T* dq_hv;   // [B*T,HV,K]: dLoss/dq_hat per value head (reduced over GVA groups later)
  T* dk_hv;   // [B*T,HV,K]
  void* dv;   // [B,T,HV,V], p.qkv_dt
  void* dg;   // [B,T,HV,K], p.g_dt
  void* dbeta;  // [B,T,HV], p.beta_dt
  T* dA_part;   // [jobs]: per-chunk partial sums of dLoss/dA_log (in-kernel gate only)
  T* dbias_part;  // [jobs, K]: per-chunk partial sums of dLoss/ddt_bias (in-kernel gate only)
};

// One backward job: chunk c of sequence n at value head hv.
struct ChunkJob {
  int64_t n, hv, c;
};

// Reverse state pass of work item (n, hv): fills dh and dvn for its chunks and dh0[n, hv].
template <class T>
void state_bwd_item(const BwdParams<T>& bp, int64_t n, int64_t hv, T* work);

// Scratch elements state_bwd_item needs.
int64_t state_bwd_work_size(const Params& p);

}  // namespace cpu
}  // namespace kda_ext

// kda_ext: op schemas, declared once.
//
// Every backend (csrc/cpu, csrc/cuda) registers implementations of these schemas with
// TORCH_LIBRARY_IMPL; fakes and autograd are registered from Python (kda_ext/ops.py).
// The ops are functional (they never mutate or return their inputs), except
// fused_recurrent_kda_inplace, whose schema declares the state it updates.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import kda_ext._C` only has to load this shared object so that the static
// TORCH_LIBRARY initialisers below run; the module itself exposes nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(kda_ext, m) {
  // Forward of the chunked KDA pipeline. See docs/design.md ("Op contract") for every
  // output's shape and dtype. Outputs that were not asked for are empty (numel 0) tensors.
  m.def(
      "chunk_kda_fwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float scale, "
      "Tensor? initial_state, Tensor? A_log, Tensor? dt_bias, Tensor? cu_seqlens, "
      "bool use_qk_l2norm, bool use_gate_in_kernel, bool use_beta_sigmoid, bool allow_neg_eigval, "
      "bool safe_gate, float? lower_bound, bool state_v_first, int chunk_size, "
      "bool output_final_state, bool save_intermediates, bool return_states) -> "
      "(Tensor o, Tensor final_state, Tensor Aqk, Tensor Akk, Tensor g_cum, Tensor w, Tensor u, "
      "Tensor qg, Tensor kg, Tensor v_new, Tensor h)");
  // The fused Hopper forward (sm_90a builds, CUDA only): o and final_state (empty unless
  // output_final_state) with nothing saved for a backward. It serves bf16 with K = V = 128 and
  // every gate mode; kda_ext.chunk_kda calls it only when no gradient is needed
  // (kda_ext/_dispatch.py: fused_forward_applies).
  m.def(
      "chunk_kda_fwd_fused(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float scale, "
      "Tensor? initial_state, Tensor? A_log, Tensor? dt_bias, Tensor? cu_seqlens, "
      "bool use_qk_l2norm, bool use_gate_in_kernel, bool use_beta_sigmoid, bool allow_neg_eigval, "
      "float? lower_bound, bool state_v_first, bool output_final_state) -> "
      "(Tensor o, Tensor final_state)");
  // Backward of the whole pipeline. The optional intermediates (g_cum .. h) are either all
  // given (disable_recompute=True) or all None (they are recomputed from the inputs).
  m.def(
      "chunk_kda_bwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float scale, "
      "Tensor? initial_state, Tensor? A_log, Tensor? dt_bias, Tensor? cu_seqlens, "
      "Tensor Aqk, Tensor Akk, Tensor? g_cum, Tensor? w, Tensor? u, Tensor? qg, Tensor? kg, "
      "Tensor? v_new, Tensor? h, Tensor do, Tensor? dht, "
      "bool use_qk_l2norm, bool use_gate_in_kernel, bool use_beta_sigmoid, bool allow_neg_eigval, "
      "bool safe_gate, float? lower_bound, bool state_v_first, int chunk_size) -> "
      "(Tensor dq, Tensor dk, Tensor dv, Tensor dg, Tensor dbeta, Tensor dA_log, Tensor ddt_bias, "
      "Tensor dh0)");
  // Decode: the token-by-token recurrence (forward only). `initial_state` is [N, HV, K, V] (or
  // [N, HV, V, K]), or with `ssm_state_indices` ([N] slot per sequence; negative = padding) a pool
  // [P, HV, ...] read at each sequence's slot. `final_state` is [N, HV, ...] (empty when
  // output_final_state is false), never an alias of an input.
  m.def(
      "fused_recurrent_kda_fwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float scale, "
      "Tensor? initial_state, Tensor? A_log, Tensor? dt_bias, Tensor? cu_seqlens, "
      "Tensor? ssm_state_indices, bool use_qk_l2norm, bool use_gate_in_kernel, "
      "bool use_beta_sigmoid, bool allow_neg_eigval, float? lower_bound, bool state_v_first, "
      "bool output_final_state) -> (Tensor o, Tensor final_state)");
  // The same recurrence with the state read from and written back to `state` (the caller's
  // [N, HV, ...] states, or with `ssm_state_indices` the slots of a pool): serving's in-place
  // update, no gather or scatter. The one op here that mutates an input (declared by (a!)).
  m.def(
      "fused_recurrent_kda_inplace(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, "
      "float scale, Tensor(a!) state, Tensor? A_log, Tensor? dt_bias, Tensor? cu_seqlens, "
      "Tensor? ssm_state_indices, bool use_qk_l2norm, bool use_gate_in_kernel, "
      "bool use_beta_sigmoid, bool allow_neg_eigval, float? lower_bound, bool state_v_first) -> "
      "Tensor o");
}

# tests/test_gradcheck.py: torch.autograd.gradcheck of chunk_kda in float64 on the CPU backend.
import pytest
import torch
import torch.nn.functional as F

import kda_ext

D64 = torch.float64

# (name, chunk_kda flags, cu_seqlens)
COMBOS = [
    ("plain", dict(), None),
    ("h0-final", dict(output_final_state=True, use_h0=True), None),
    ("l2norm", dict(use_qk_l2norm_in_kernel=True, output_final_state=True, use_h0=True), None),
    ("gate-softplus", dict(use_gate_in_kernel=True, output_final_state=True, use_h0=True), None),
    ("gate-lowerbound-safe", dict(use_gate_in_kernel=True, safe_gate=True, lower_bound=-5.0,
                                  output_final_state=True), None),
    ("gate-lowerbound-noA", dict(use_gate_in_kernel=True, lower_bound=-3.0, no_A_log=True), None),
    ("beta-sigmoid", dict(use_beta_sigmoid_in_kernel=True, use_h0=True), None),
    ("neg-eigval", dict(use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True, output_final_state=True), None),
    ("state-v-first", dict(state_v_first=True, output_final_state=True, use_h0=True), None),
    ("no-recompute-bt32", dict(disable_recompute=True, chunk_size=32, output_final_state=True, use_h0=True), None),
    ("varlen", dict(output_final_state=True, use_h0=True, chunk_size=32), [0, 1, 33, 40]),
    ("varlen-all-flags", dict(output_final_state=True, use_h0=True, use_qk_l2norm_in_kernel=True,
                              use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, state_v_first=True,
                              disable_recompute=True), [0, 17, 40]),
]


@pytest.mark.parametrize("name,flags,cu", COMBOS, ids=[c[0] for c in COMBOS])
def test_gradcheck(name, flags, cu):
    flags = dict(flags)
    use_h0 = flags.pop("use_h0", False)
    no_A_log = flags.pop("no_A_log", False)
    B, T, H, HV, K, V = (1, 40, 1, 2, 4, 3) if cu is None else (1, cu[-1], 1, 2, 4, 3)
    N = B if cu is None else len(cu) - 1
    gate = flags.get("use_gate_in_kernel", False)
    q = torch.randn(B, T, H, K, dtype=D64)
    k = F.normalize(torch.randn(B, T, H, K, dtype=D64), dim=-1)
    if not flags.get("use_qk_l2norm_in_kernel", False):
        q = F.normalize(q, dim=-1)
    v = torch.randn(B, T, HV, V, dtype=D64)
    g = torch.randn(B, T, HV, K, dtype=D64) if gate else F.logsigmoid(torch.randn(B, T, HV, K, dtype=D64))
    beta = torch.randn(B, T, HV, dtype=D64)
    if not flags.get("use_beta_sigmoid_in_kernel", False):
        beta = beta.sigmoid()
    st = (V, K) if flags.get("state_v_first") else (K, V)
    tensors = dict(q=q, k=k, v=v, g=g, beta=beta)
    if use_h0:
        tensors["initial_state"] = torch.randn(N, HV, *st, dtype=D64)
    if gate:
        if not no_A_log:
            tensors["A_log"] = torch.randn(1, 1, HV, 1, dtype=D64) * 0.5
        tensors["dt_bias"] = torch.randn(HV * K, dtype=D64)
    names = list(tensors)
    inputs = tuple(t.requires_grad_(True) for t in tensors.values())
    cu_t = None if cu is None else torch.tensor(cu)

    def fn(*args):
        kw = dict(zip(names, args))
        out = kda_ext.chunk_kda(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("g"), kw.pop("beta"),
                                cu_seqlens=cu_t, **kw, **flags)
        return tuple(t for t in out if t is not None)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)

# tests/test_state_output_mma.py: the register-resident state/output kernel (state_output_mma.cuh).
"""For 16-bit inputs, chunk 64 and K = 128, launch_fwd.cu can run chunk_state_output_mma_kernel
(state in registers, mma.sync; V slices of 32 or 64 columns) instead of chunk_state_output_kernel
(state in shared memory, wmma); KDA_EXT_STATE_KERNEL=mma32|mma64|wmma forces one. Each case here
runs the forward (and, where marked, the backward, whose recompute calls the kernel without o and
with h and v_new stored) under a register-kernel width and under wmma, checks each against the
float64 reference with FLA's tolerances, and checks the two kernels against each other much
tighter: they round the same operands at the same points and differ only in the order of fp32 sums
(bf16 outputs may differ in the last bit).
"""
import pytest
import torch

import kda_ext
from conftest import FLA_TOL, Case, assert_rel_close, compare, kernel_qk, make_inputs, requires_cuda, run_kernel, run_reference

F16, BF16 = torch.float16, torch.bfloat16

KIMI = dict(gate_in_kernel=True, safe_gate=True, lower_bound=-5.0, l2norm_in_kernel=True, beta_sigmoid=True)

CASES = [
    # the Kimi setting with GVA and T = 1000 (a partial last chunk)
    Case(B=2, T=1000, H=2, HV=4, K=128, V=128, dtype=BF16, **KIMI),
    # ragged T around the chunk
    Case(B=1, T=1, H=1, HV=2, K=128, V=128, dtype=BF16),
    Case(B=2, T=63, H=2, HV=2, K=128, V=128, dtype=F16),
    Case(B=1, T=64, H=1, HV=1, K=128, V=128, dtype=BF16, h0=False),
    Case(B=1, T=65, H=1, HV=2, K=128, V=128, dtype=F16, state_v_first=True),
    # V not a multiple of 8 (element loads of u, pair stores), odd V (element stores), several
    # slices with a partial last one (200 = 6 x 32 + 8 = 3 x 64 + 8), V below one slice
    Case(B=1, T=130, H=1, HV=2, K=128, V=100, dtype=BF16),
    Case(B=1, T=97, H=1, HV=1, K=128, V=33, dtype=F16, state_v_first=True),
    Case(B=1, T=200, H=2, HV=2, K=128, V=200, dtype=BF16),
    Case(B=2, T=80, H=1, HV=1, K=128, V=16, dtype=BF16),
    # the unbounded softplus gate in the kernel; a plain gate with -1000 entries (exact decay to 0)
    Case(B=1, T=300, H=1, HV=2, K=128, V=128, dtype=BF16, gate_in_kernel=True),
    Case(B=1, T=300, H=1, HV=2, K=128, V=128, dtype=F16, mask_p=0.1, mask_value=-1000.0),
    # varlen with a length-1 sequence, partial chunks, both state layouts
    Case(cu_seqlens=[0, 1, 64, 65, 129, 700], H=2, HV=2, K=128, V=128, dtype=BF16, recipe="varlen"),
    Case(cu_seqlens=[0, 15, 16, 300], H=1, HV=2, K=128, V=96, dtype=F16, recipe="varlen",
         state_v_first=True, mask_p=0.1, mask_value=-1000.0),
]

BACKWARD_CASES = [
    Case(B=1, T=300, H=2, HV=4, K=128, V=128, dtype=BF16, **KIMI),
    Case(cu_seqlens=[0, 1, 70, 250], H=1, HV=2, K=128, V=100, dtype=F16, recipe="varlen",
         state_v_first=True),
    Case(B=1, T=130, H=1, HV=2, K=128, V=128, dtype=BF16, disable_recompute=True),
]


def _forward(case: Case, x):
    """(o, final state, h) of chunk_kda on x."""
    q, k = kernel_qk(case, x)
    kw = {}
    if case.gate_in_kernel:
        kw = dict(A_log=x.get("A_log"), dt_bias=x.get("dt_bias"))
    with torch.inference_mode():
        return kda_ext.chunk_kda(
            q, k, x["v"], x["g"], x["beta"], scale=case.scale, initial_state=x.get("h0"),
            output_final_state=True, return_intermediate_states=True,
            use_qk_l2norm_in_kernel=case.l2norm_in_kernel, use_gate_in_kernel=case.gate_in_kernel,
            use_beta_sigmoid_in_kernel=case.beta_sigmoid, safe_gate=case.safe_gate,
            lower_bound=case.lower_bound, state_v_first=case.state_v_first,
            cu_seqlens=x.get("cu_seqlens"), chunk_size=case.chunk_size, **kw)


def _between_kernels(name, a, b, ratio):
    assert a.shape == b.shape, name
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), name
    assert_rel_close(f"{name} (mma vs wmma)", b, a, ratio)


WIDTHS = ["mma32", "mma64"]


@requires_cuda
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id())
def test_cuda_state_kernels_forward(case, width, monkeypatch):
    x = make_inputs(case, "cuda")
    monkeypatch.setenv("KDA_EXT_STATE_KERNEL", width)
    o_m, ht_m, h_m = _forward(case, x)
    monkeypatch.setenv("KDA_EXT_STATE_KERNEL", "wmma")
    o_w, ht_w, h_w = _forward(case, x)
    with torch.no_grad():
        ref = run_reference(case, x, grads=False)
    tol = {"o": FLA_TOL["o"], "ht": FLA_TOL["ht"]}
    compare(ref, {"o": o_m, "ht": ht_m}, tol)
    compare(ref, {"o": o_w, "ht": ht_w}, tol)
    # Same operands, same rounding points; only fp32 summation order differs. A wrong fragment
    # layout or a missed tile gives errors of order 1 here, far above these bars.
    _between_kernels("o", o_m, o_w, 2e-3)
    _between_kernels("final state", ht_m, ht_w, 1e-4)
    _between_kernels("h", h_m, h_w, 2e-3)


@requires_cuda
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: c.id())
def test_cuda_state_kernels_backward(case, width, monkeypatch):
    """Gradients through the recompute (no o; h and v_new stored), or with disable_recompute the
    forward's saved h and v_new, under both kernels."""
    x = make_inputs(case, "cuda")
    ref = run_reference(case, x)
    monkeypatch.setenv("KDA_EXT_STATE_KERNEL", width)
    out_m = run_kernel(case, x)
    monkeypatch.setenv("KDA_EXT_STATE_KERNEL", "wmma")
    out_w = run_kernel(case, x)
    compare(ref, out_m, FLA_TOL)
    compare(ref, out_w, FLA_TOL)
    for n in ("dq", "dk", "dv", "dg", "dbeta"):
        if out_m.get(n) is not None:
            _between_kernels(n, out_m[n], out_w[n], 2e-3)


@requires_cuda
def test_cuda_state_kernel_switch_rejects_unknown(monkeypatch):
    case = CASES[1]
    x = make_inputs(case, "cuda")
    monkeypatch.setenv("KDA_EXT_STATE_KERNEL", "fast")
    with pytest.raises(RuntimeError, match="KDA_EXT_STATE_KERNEL must be auto, mma, mma32, mma64, wmma or sm90"):
        _forward(case, x)

# tests/test_state_output_sm90.py: the Hopper state/output pass (sm90/state_output_sm90.cuh).
"""The forward's state/output pass runs on wgmma with TMA loads by default (KDA_EXT_STATE_KERNEL
auto or sm90) for 16-bit inputs, chunk 64, K = V = 128; elsewhere the register kernel (mma) or the
shared-memory one.
Each case compares every output of the forward op under sm90 and under the register kernel (mma):
o, the final state, and with save_intermediates / return_states v_new and h. The two compute the
same values with the same rounding points (Sh and v_new in the input dtype) and differ only in the
order of fp32 sums, so a 16-bit element may move by one rounding step, an fp32 one by ~1e-3 of the
RMS, never by the O(1) of a layout, mask or pipeline error; outputs are poisoned (NaN) first.
Then forward and gradients under sm90 against the float64 reference with FLA's tolerances, and
bitwise determinism.
"""
import pytest
import torch

from conftest import (Case, assert_fwd_outputs_agree, check_switch_pair, fwd_op_outputs, kernels_launched,
                      make_inputs, poison_allocator, reference_tol, requires_cuda, run_switch_pair)

import kda_ext  # noqa: F401

BF16, FP16 = torch.bfloat16, torch.float16
KIMI = dict(gate_in_kernel=True, safe_gate=True, lower_bound=-5.0, l2norm_in_kernel=True, beta_sigmoid=True)
BASE = dict(K=128, V=128)

CASES = [
    Case(B=2, T=300, H=2, HV=4, **BASE, dtype=BF16, **KIMI),
    Case(B=1, T=1, H=1, HV=2, **BASE, dtype=BF16, **KIMI),
    Case(B=2, T=63, H=1, HV=1, **BASE, dtype=BF16, **KIMI, state_v_first=True),
    Case(B=1, T=64, H=1, HV=1, **BASE, dtype=BF16, **KIMI, h0=False),
    Case(B=1, T=65, H=2, HV=2, **BASE, dtype=BF16),
    Case(B=1, T=1000, H=1, HV=2, **BASE, dtype=BF16, **KIMI),
    # the unbounded softplus gate and -1000 gate entries; fp16
    Case(B=1, T=200, H=1, HV=2, **BASE, dtype=BF16, gate_in_kernel=True, beta_sigmoid=True),
    Case(B=1, T=200, H=1, HV=2, **BASE, dtype=FP16, mask_p=0.1, mask_value=-1000.0),
    # varlen with length-1 sequences and partial chunks (rows of the next sequence in the tile)
    Case(cu_seqlens=[0, 1, 64, 65, 129, 500], H=2, HV=2, **BASE, dtype=BF16, recipe="varlen", **KIMI),
    Case(cu_seqlens=[0, 15, 16, 300], H=1, HV=2, **BASE, dtype=BF16, recipe="varlen",
         state_v_first=True, disable_recompute=True, **KIMI),
]


@requires_cuda
@pytest.mark.parametrize("save", [False, True], ids=["plain", "saved"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id())
def test_cuda_state_sm90_outputs_match_mma(case, save, monkeypatch):
    x = make_inputs(case, "cuda")
    outs = {}
    for kernel in ("sm90", "mma"):
        monkeypatch.setenv("KDA_EXT_STATE_KERNEL", kernel)
        poison_allocator(x)
        with torch.inference_mode():
            outs[kernel] = fwd_op_outputs(case, x, save, return_states=not save)
    assert_fwd_outputs_agree("sm90 vs mma", outs["mma"], outs["sm90"], save)


@requires_cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id())
def test_cuda_state_sm90_against_reference(case, monkeypatch):
    ref, sm90, again, mma = run_switch_pair(case, "KDA_EXT_STATE_KERNEL", monkeypatch,
                                            first="sm90", second="mma")
    check_switch_pair(ref, sm90, again, mma, same=(), tol=reference_tol(case))


@requires_cuda
def test_cuda_state_sm90_switch_reaches_the_kernel(monkeypatch):
    # The two kernels may agree bit for bit (wgmma and mma.sync can sum a 16-wide k step in the
    # same order), so the agreement above does not show that sm90 ran: the profiler does. Where
    # it does not apply (chunk 32 here) the switch falls back to the default kernel.
    case = CASES[0]
    x = make_inputs(case, "cuda")
    for setting in ("sm90", None):  # None: the default (auto)
        if setting is None:
            monkeypatch.delenv("KDA_EXT_STATE_KERNEL", raising=False)
        else:
            monkeypatch.setenv("KDA_EXT_STATE_KERNEL", setting)
        names = " ".join(kernels_launched(lambda: fwd_op_outputs(case, x, False)))
        assert "state_output_sm90_kernel" in names, (setting, names)
    monkeypatch.setenv("KDA_EXT_STATE_KERNEL", "mma")
    names = " ".join(kernels_launched(lambda: fwd_op_outputs(case, x, False)))
    assert "state_output_sm90_kernel" not in names and "state_output_mma" in names, names
    monkeypatch.setenv("KDA_EXT_STATE_KERNEL", "sm90")
    small = Case(B=1, T=100, H=1, HV=1, **BASE, dtype=BF16, chunk_size=32)
    y = make_inputs(small, "cuda")
    names = " ".join(kernels_launched(lambda: fwd_op_outputs(small, y, False)))
    assert "state_output_sm90_kernel" not in names, names

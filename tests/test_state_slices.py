# tests/test_state_slices.py: chunk_state_output's two V slice widths (32 and 16 columns) on CUDA.
"""launch_fwd.cu runs chunk_state_output with 16-column V slices when the 32-column grid,
N*HV*ceil(V/32) CTAs, has fewer CTAs than the device has SMs (and the doubled grid fits one
wave), for chunk 64 with the compile-time K = 128 build (K in 113..128) or the general-K build
(K outside 49..64 and, except for fp16, 241..256); everything else runs 32 columns. The test
shapes elsewhere are small, so those builds take 16 columns there. Here each problem runs twice:
alone (16 columns) and as the first sequences of a batch with enough sequences for the 32-column
grid; both must match the reference, and o, the final state and h must agree bit for bit (the
two widths do the same products in the same order, column by column). The backward cases run
both widths' recompute (no o) against the reference gradients.
"""
import dataclasses

import pytest
import torch

import kda_ext
from conftest import FLA_TOL, Case, compare, kernel_qk, make_inputs, requires_cuda, run_kernel, run_reference

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def _wmma_state_kernel(monkeypatch):
    """These tests are about chunk_state_output_kernel's widths: the 32-column K = 128 16-bit runs
    would otherwise take the register kernel (tests/test_state_output_mma.py covers that one)."""
    monkeypatch.setenv("KDA_EXT_STATE_KERNEL", "wmma")


def _sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _has_narrow_build(case: Case) -> bool:
    kp = -(-case.K // 16) * 16
    return case.chunk_size == 64 and (kp == 128 or (kp != 64 and (kp != 256 or case.dtype == F16)))


def _wide_ctas(case: Case) -> int:
    return case.N * case.HV * -(-case.V // 32)


def _grown(case: Case, sms: int) -> Case:
    """case with more sequences appended: enough that the 32-column grid has >= sms CTAs."""
    per_seq = case.HV * -(-case.V // 32)
    extra = -(-sms // per_seq)
    if case.cu_seqlens is None:
        return dataclasses.replace(case, B=case.B + extra)
    cu = list(case.cu_seqlens)
    for i in range(extra):
        cu.append(cu[-1] + 20 + 7 * (i % 5))  # short sequences, some with a partial chunk
    return dataclasses.replace(case, cu_seqlens=cu)


def _prefix_inputs(small: Case, x_big):
    """The first sequences of x_big as the inputs of `small` (new leaves)."""
    x = {}
    for n, t in x_big.items():
        if n in ("h0", "dht"):
            t = t[:small.N]
        elif n == "cu_seqlens":
            t = torch.tensor(small.cu_seqlens, dtype=t.dtype, device=t.device)
        elif n in ("q", "k", "v", "g", "beta", "do"):
            t = t[:, :small.T] if small.cu_seqlens is not None else t[:small.B]
        x[n] = t.detach().clone().requires_grad_(t.requires_grad)
    return x


def _forward(case: Case, x):
    """(o, final state, h) of chunk_kda on x (the plain recipe: no in-kernel gate or norm)."""
    q, k = kernel_qk(case, x)
    cu_cpu = None if case.cu_seqlens is None else torch.tensor(case.cu_seqlens)
    with torch.inference_mode():
        return kda_ext.chunk_kda(q, k, x["v"], x["g"], x["beta"], initial_state=x.get("h0"),
                                 output_final_state=True, return_intermediate_states=True,
                                 state_v_first=case.state_v_first, cu_seqlens=x.get("cu_seqlens"),
                                 cu_seqlens_cpu=cu_cpu, chunk_size=case.chunk_size)


SLICE_CASES = [
    # the compile-time K = 128 build: o formed with qg Sh in step 2 (triple-buffered layout)
    Case(B=2, T=150, H=1, HV=2, K=128, V=128, dtype=BF16),
    # fp32 K = 128, V = 100
    Case(B=1, T=130, H=1, HV=2, K=128, V=100, dtype=F32),
    # fp16 K = 128 (its own build) with the [V, K] layout and h stored along K
    Case(B=1, T=130, H=2, HV=2, K=128, V=128, dtype=F16, state_v_first=True),
    # K = 120 through the K = 128 layout, V = 72: slices 16,16,16,16,8 against 32,32,8
    Case(B=2, T=97, H=1, HV=2, K=120, V=72, dtype=F16, state_v_first=True),
    # general K, V = 100 (masked last slice), no initial state
    Case(B=1, T=140, H=1, HV=2, K=100, V=100, dtype=F32, h0=False),
    # fp32 K = 200: the single-buffer layout, where BV = 16 splits w Sh by k-step parity
    Case(B=1, T=100, H=1, HV=2, K=200, V=60, dtype=F32, state_v_first=True),
    # fp16 K = 256 runs the general build (one block per SM)
    Case(B=1, T=80, H=1, HV=1, K=256, V=64, dtype=F16),
    # bf16 general K with V = 40 (slices 16,16,8 against 32,8), GVA
    Case(B=2, T=70, H=1, HV=2, K=48, V=40, dtype=BF16),
    # varlen: a length-1 sequence and partial chunks; more sequences appended for 32 columns
    Case(cu_seqlens=[0, 1, 70, 200], H=2, HV=2, K=128, V=128, dtype=BF16, recipe="varlen"),
    Case(cu_seqlens=[0, 37, 170], H=1, HV=2, K=40, V=60, dtype=F16, recipe="varlen", state_v_first=True),
]


@requires_cuda
@pytest.mark.parametrize("case", SLICE_CASES, ids=lambda c: c.id())
def test_cuda_state_slice_widths_agree(case):
    sms = _sms()
    assert _has_narrow_build(case)
    if 2 * _wide_ctas(case) > sms:
        pytest.skip(f"{sms} SMs: the small problem does not take 16-column slices here")
    big = _grown(case, sms)
    assert _wide_ctas(big) >= sms  # 32-column slices
    x_big = make_inputs(big, "cuda")
    x = _prefix_inputs(case, x_big)
    o16, ht16, h16 = _forward(case, x)
    o32, ht32, h32 = _forward(big, x_big)
    o32, ht32 = (o32[:, :case.T], ht32[:case.N]) if case.cu_seqlens is not None else (o32[:case.B], ht32[:case.B])
    h32 = h32[:, :h16.shape[1]] if case.cu_seqlens is not None else h32[:case.B]
    with torch.no_grad():
        ref = run_reference(case, x, grads=False)
    tol = {"o": FLA_TOL["o"], "ht": FLA_TOL["ht"]}
    compare(ref, {"o": o16, "ht": ht16}, tol)
    compare(ref, {"o": o32, "ht": ht32}, tol)
    for name, a, b in (("o", o16, o32), ("final state", ht16, ht32), ("h", h16, h32)):
        assert a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: 16- and 32-column V slices differ ({(a != b).sum().item()} entries)"


BACKWARD_CASES = [
    Case(B=1, T=150, H=2, HV=2, K=128, V=128, dtype=BF16, gate_in_kernel=True, dt_bias=False),
    Case(cu_seqlens=[0, 1, 70, 150], H=1, HV=2, K=100, V=60, dtype=F16, recipe="varlen", state_v_first=True),
    # the single-buffer layout (fp32, K = 200) in the forward and in the recompute
    Case(B=1, T=100, H=1, HV=2, K=200, V=40, dtype=F32),
]


@requires_cuda
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: c.id())
def test_cuda_state_slice_widths_backward(case):
    """Gradients through both widths' recompute (chunk_state_output without o): the problem alone
    (16 columns) and as the first sequences of the grown batch (32 columns), against the
    reference gradients of those sequences."""
    sms = _sms()
    assert _has_narrow_build(case)
    big = _grown(case, sms)
    assert _wide_ctas(big) >= sms
    x_big = make_inputs(big, "cuda")
    x = _prefix_inputs(case, x_big)
    ref = run_reference(case, x)
    small = run_kernel(case, x)  # 16 columns where 2 * N*HV*ceil(V/32) <= SMs
    out = run_kernel(big, x_big)
    got = {}
    for n, t in out.items():
        if n in ("dA_log", "ddt_bias") or t is None:
            continue  # sums over every sequence
        if n in ("ht", "dh0"):
            got[n] = t[:case.N]
        elif case.cu_seqlens is not None:
            got[n] = t[:, :case.T]
        else:
            got[n] = t[:case.B]
    compare({n: t for n, t in ref.items() if n in got}, got, FLA_TOL)
    compare(ref, small, FLA_TOL)

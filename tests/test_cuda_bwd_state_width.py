# tests/test_cuda_bwd_state_width.py: the CUDA backward's reverse state pass at both V slice widths.
"""bwd_state (csrc/cuda/bwd_state.cuh) walks each sequence's chunks in one block per (sequence, value
head, V slice). The slices are 32 columns wide, or 16 when the 32-column grid, N * HV * ceil(V / 32)
blocks, is smaller than the device's SM count and the chunk size is 64 with K not 64 / 256
(launch_bwd.cu). The other CUDA tests use a few heads, so on a 132-SM card they run 16 columns
wherever that applies; here:

- shapes whose 32-column grid fills the device (HV chosen from the SM count) run the 32-column
  builds, including the compile-time K = 128 one of every dtype, against the reference;
- the same heads computed in those wide calls and in small calls of a few heads (16 columns) must
  agree: both widths compute the same per-column recurrence (only the order of dv_new's fp32
  additions differs), so this catches any slice, tile or warp mapping error of either width;
- both widths are bitwise deterministic, and both start from dS = 0 without a dht.
Run with the other CUDA tests (`-k cuda`: the module name matches).
"""
import dataclasses

import pytest
import torch

import kda_ext
from conftest import (
    FLA_TOL,
    FLA_VARLEN_TOL,
    GRAD_NAMES,
    Case,
    assert_rel_close,
    compare,
    kernel_qk,
    make_inputs,
    requires_cuda,
    run_kernel,
    run_reference,
)

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def _wmma_state_kernels(monkeypatch):
    """These tests are about bwd_state_kernel's widths: the register kernels (forward and reverse
    state passes) would otherwise take the K = 128 16-bit runs (tests/test_state_output_mma.py
    and tests/test_bwd_state_mma.py cover those), and one forward kernel serves both widths."""
    monkeypatch.setenv("KDA_EXT_STATE_KERNEL", "wmma")
    monkeypatch.setenv("KDA_EXT_BWD_STATE_KERNEL", "wmma")


def _sm_count() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _state_blocks(case: Case, width: int) -> int:
    return case.N * case.HV * -(-case.V // width)


def _narrow_applies(case: Case) -> bool:
    """The launch layer's rule (launch_bwd.cu): 16-column slices for this case."""
    kp = -(-case.K // 16) * 16
    return (case.chunk_size == 64 and kp not in (64, 256)
            and _state_blocks(case, 32) < _sm_count())


def _wide(case: Case) -> Case:
    """case with H = HV raised until the 32-column grid has at least one block per SM."""
    per_head = case.N * -(-case.V // 32)
    heads = max(case.HV, -(-_sm_count() // per_head))
    wide = dataclasses.replace(case, H=heads, HV=heads)
    assert _state_blocks(wide, 32) >= _sm_count() and not _narrow_applies(wide)
    return wide


# (dtype, K, V, extra Case fields). K = 128 (and 120): the compile-time K = 128 builds; K = 100: the
# general build. V = 100, 60, 72: slices past V (partial last slice of either width; V % 8 != 0
# takes the scalar dh / do paths).
WIDTH_CASES = [
    (BF16, 128, 128, dict(B=1, T=130)),
    (F16, 128, 128, dict(B=2, T=100, state_v_first=True)),
    (F32, 128, 128, dict(B=1, T=150, h0=False)),
    (F16, 128, 100, dict(recipe="varlen", cu_seqlens=[0, 1, 64, 65, 190], mask_p=0.3,
                         mask_value=-1000.0, state_v_first=True)),
    (BF16, 120, 72, dict(B=1, T=140, gate_in_kernel=True, safe_gate=True)),
    (F32, 128, 60, dict(recipe="varlen", cu_seqlens=[0, 50, 170], gate_in_kernel=True,
                        l2norm_in_kernel=True, beta_sigmoid=True)),
    (BF16, 100, 100, dict(B=1, T=130, state_v_first=True, h0=False)),
    (F16, 100, 60, dict(B=1, T=129)),
]


def _case(dtype, K, V, extra) -> Case:
    return Case(H=2, HV=2, K=K, V=V, dtype=dtype, **extra)


def _case_id(spec):
    return _case(*spec).id()


def _tol(case: Case):
    tol = dict(FLA_VARLEN_TOL if case.recipe == "varlen" else FLA_TOL)
    if case.dtype == BF16:
        tol["dA_log"] = tol["dg"]  # as in test_backward.py: one sum with heavy cancellation
    return tol


@requires_cuda
@pytest.mark.parametrize("spec", WIDTH_CASES, ids=_case_id)
def test_wide_grid_matches_reference(spec):
    # 32-column slices (the grid covers every SM): the builds the main shape runs. (Test ids name
    # the two-head base case; H = HV is raised here to ceil(SMs / (N * ceil(V / 32))).)
    case = _wide(_case(*spec))
    x = make_inputs(case, "cuda")
    compare(run_reference(case, x), run_kernel(case, x), _tol(case))


@requires_cuda
@pytest.mark.parametrize("spec", WIDTH_CASES, ids=_case_id)
def test_narrow_grid_matches_reference(spec):
    # The same cases with two heads: 16-column slices where the rule allows it (every case here).
    case = _case(*spec)
    if not _narrow_applies(case):
        pytest.skip(f"{_sm_count()} SMs: two heads already fill the 32-column grid")
    x = make_inputs(case, "cuda")
    compare(run_reference(case, x), run_kernel(case, x), _tol(case))


def _head_slice(case: Case, x, h0: int, h1: int):
    """The inputs of heads [h0, h1) of an H = HV case as a case of their own (fresh leaves)."""
    sub = dataclasses.replace(case, H=h1 - h0, HV=h1 - h0)
    y = {}
    for n, t in x.items():
        if n == "cu_seqlens":
            y[n] = t
            continue
        if n in ("h0", "dht"):
            s = t.detach()[:, h0:h1]
        elif n == "A_log":
            s = t.detach()[h0:h1]
        elif n == "dt_bias":
            s = t.detach().view(case.HV, case.K)[h0:h1].reshape(-1)
        else:  # q, k, v, g, beta, do: [B, T, heads, ...]
            s = t.detach()[:, :, h0:h1]
        y[n] = s.contiguous().requires_grad_(t.requires_grad)
    return sub, y


def _head_part(name: str, t: torch.Tensor, case: Case, h0: int, h1: int):
    if name in ("dA_log",):
        return t[h0:h1]
    if name == "ddt_bias":
        return t.view(case.HV, case.K)[h0:h1].reshape(-1)
    if name in ("ht", "dh0"):
        return t[:, h0:h1]
    return t[:, :, h0:h1]


@requires_cuda
@pytest.mark.parametrize("spec", WIDTH_CASES, ids=_case_id)
def test_widths_agree_per_head(spec):
    # Every head's outputs and gradients from one wide call (32-column slices) against the same
    # heads computed a few at a time (16-column slices). Heads never interact (H = HV), so the
    # two differ only in the order of dv_new's fp32 additions inside bwd_state.
    case = _wide(_case(*spec))
    x = make_inputs(case, "cuda")
    wide = run_kernel(case, x)
    group = 4
    while group > 1 and not _narrow_applies(dataclasses.replace(case, H=group, HV=group)):
        group //= 2
    if not _narrow_applies(dataclasses.replace(case, H=group, HV=group)):
        pytest.skip(f"{_sm_count()} SMs: one head already fills the 32-column grid")
    for h0 in range(0, case.HV, group):
        h1 = min(h0 + group, case.HV)
        sub, y = _head_slice(case, x, h0, h1)
        assert _narrow_applies(sub)
        narrow = run_kernel(sub, y)
        for n, t in narrow.items():
            if t is None:
                assert wide[n] is None, n
                continue
            # fp32-level differences, except where a stored fp16/bf16 dh / dv_new copy rounds the
            # other way; the gate-parameter gradients are sums with cancellation (x5). A slice or
            # tile mapping error is O(1).
            ratio = 1e-4 if case.dtype == F32 else 1e-3
            if n in ("dA_log", "ddt_bias"):
                ratio *= 5
            assert_rel_close(f"{n}[heads {h0}:{h1}]", _head_part(n, wide[n], case, h0, h1), t, ratio)


@requires_cuda
@pytest.mark.parametrize("wide", [False, True], ids=["bv16", "bv32"])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_both_widths_bitwise_deterministic(wide, dtype):
    case = Case(H=2, HV=2, K=128, V=100, dtype=dtype, gate_in_kernel=True, l2norm_in_kernel=True,
                beta_sigmoid=True, recipe="varlen", cu_seqlens=[0, 1, 100, 230])
    if wide:
        case = _wide(case)
    elif not _narrow_applies(case):
        pytest.skip(f"{_sm_count()} SMs: two heads already fill the 32-column grid")
    x = make_inputs(case, "cuda")
    first = run_kernel(case, x)
    again = run_kernel(case, x)
    for n in first:
        assert torch.equal(first[n], again[n]), f"{n} changed between identical backward runs"


@requires_cuda
@pytest.mark.parametrize("wide", [False, True], ids=["bv16", "bv32"])
def test_both_widths_without_final_state(wide):
    # No dht (output_final_state=False): the state pass starts from dS = 0 instead of loading
    # dht, which must give the gradients of a zero dht.
    case = Case(H=2, HV=2, K=128, V=100, dtype=BF16, recipe="varlen", cu_seqlens=[0, 70, 75, 200],
                state_v_first=True)
    if wide:
        case = _wide(case)
    elif not _narrow_applies(case):
        pytest.skip(f"{_sm_count()} SMs: two heads already fill the 32-column grid")
    x = make_inputs(case, "cuda")
    x["dht"] = torch.zeros_like(x["dht"])
    want = run_kernel(case, x)
    q, k = kernel_qk(case, x)
    o, ht = kda_ext.chunk_kda(q, k, x["v"], x["g"], x["beta"], scale=case.scale,
                              initial_state=x["h0"], output_final_state=False,
                              state_v_first=case.state_v_first, cu_seqlens=x["cu_seqlens"],
                              chunk_size=case.chunk_size)
    assert ht is None
    leaves = [n for n in GRAD_NAMES if n in x]
    got = torch.autograd.grad((o.float() * x["do"].float()).sum(), [x[n] for n in leaves])
    assert_rel_close("o", want["o"], o, 1e-6)
    for n, g in zip(leaves, got):
        assert_rel_close("d" + n, want["d" + n], g, 1e-6)

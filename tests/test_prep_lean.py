# tests/test_prep_lean.py: the forward's lean intra-chunk kernel (chunk_prepare_lean.cuh).
"""For bf16 inputs, chunk 64, K = V = 128 the forward's intra-chunk stage runs
chunk_prepare_lean_kernel under safe_gate (KDA_EXT_PREP_KERNEL=auto), for every gate with
KDA_EXT_PREP_KERNEL=lean (what these tests set), and chunk_prepare_kernel with =classic. Diagonal
blocks whose cumulative gate leaves the median path's range (the unbounded gate with large
decays, -1000 entries) take the lean kernel's element-wise path. Two checks per case:
- the op's every output (o, the final state, Aqk, Akk, and with save_intermediates g_cum, w, u,
  qg, kg, v_new, h) under both kernels, against each other: the two compute the same values with
  the same rounding points and differ only in the order of fp32 sums (and one fp32 rounding of the
  off-diagonal column operands), so a 16-bit element may move by one rounding step, never by the
  O(1) of a layout or mask error; unwritten rows are poisoned first (NaN), so a row the lean kernel
  forgets fails the comparison;
- forward and gradients of chunk_kda under both kernels against the float64 reference with FLA's
  tolerances (the backward consumes the forward's Aqk/Akk, and with disable_recompute also its
  g_cum/w/u/qg/kg), the lean run bitwise deterministic.
"""
import pytest
import torch

from conftest import (Case, assert_fwd_outputs_agree, check_switch_pair, fwd_op_outputs, kernels_launched,
                      make_inputs, poison_allocator, reference_tol, requires_cuda, run_kernel,
                      run_switch_pair)

import kda_ext  # noqa: F401

BF16 = torch.bfloat16
KIMI = dict(gate_in_kernel=True, safe_gate=True, lower_bound=-5.0, l2norm_in_kernel=True, beta_sigmoid=True)
BASE = dict(K=128, V=128, dtype=BF16)

CASES = [
    # the Kimi setting, GVA, a partial last chunk
    Case(B=2, T=300, H=2, HV=4, **BASE, **KIMI),
    # ragged T around the chunk, state layout, no initial state
    Case(B=1, T=1, H=1, HV=2, **BASE, **KIMI),
    Case(B=2, T=63, H=1, HV=1, **BASE, **KIMI, state_v_first=True),
    Case(B=1, T=64, H=1, HV=1, **BASE, **KIMI, h0=False),
    Case(B=1, T=65, H=2, HV=2, **BASE, **KIMI),
    Case(B=1, T=1000, H=1, HV=2, **BASE, **KIMI),
    # pre-gated g (clamped to [-5, 0] by the recipe) without l2norm or beta sigmoid; -1000 entries
    # clamped to the bound; scale
    Case(B=2, T=200, H=2, HV=2, **BASE, safe_gate=True, scale=0.1),
    Case(B=1, T=257, H=1, HV=1, **BASE, safe_gate=True, mask_p=0.2, mask_value=-1000.0),
    # the lower-bound gate without dt_bias; negative eigenvalues
    Case(B=1, T=130, H=1, HV=1, **BASE, gate_in_kernel=True, safe_gate=True, lower_bound=-5.0,
         l2norm_in_kernel=True, beta_sigmoid=True, neg_eig=True, dt_bias=False),
    # varlen with length-1 sequences and partial chunks; saved intermediates
    Case(cu_seqlens=[0, 1, 64, 65, 129, 500], H=2, HV=2, **BASE, recipe="varlen", **KIMI),
    Case(cu_seqlens=[0, 15, 16, 300], H=1, HV=2, **BASE, recipe="varlen", state_v_first=True,
         disable_recompute=True, **KIMI),
    Case(B=2, T=150, H=1, HV=1, **BASE, disable_recompute=True, **KIMI),
]

# Without safe_gate: the unbounded softplus gate (diagonal blocks within the median path's range),
# -1000 entries in a pre-gated g (blocks holding one take the element-wise path, the others the
# median one, in the same chunk), nearly every block element-wise, varlen with the state layout.
# The backward's recompute (Akk reused: no Aqk/L) runs the lean kernel too; with l2norm it hands
# the rstd on to the backward.
UNBOUNDED_CASES = [
    Case(B=1, T=200, H=1, HV=2, **BASE, gate_in_kernel=True, beta_sigmoid=True, l2norm_in_kernel=True),
    Case(B=1, T=200, H=1, HV=2, **BASE, mask_p=0.1, mask_value=-1000.0),
    Case(B=1, T=130, H=1, HV=1, **BASE, mask_p=0.9, mask_value=-1000.0, l2norm_in_kernel=True, scale=0.3),
    Case(cu_seqlens=[0, 1, 80, 81, 300], H=2, HV=4, **BASE, recipe="varlen", gate_in_kernel=True,
         l2norm_in_kernel=True, state_v_first=True),
    Case(cu_seqlens=[0, 1, 80, 81, 300], H=1, HV=2, **BASE, recipe="varlen", mask_p=0.2,
         mask_value=-1000.0, disable_recompute=True),
]


@requires_cuda
@pytest.mark.parametrize("save", [False, True], ids=["recompute", "saved"])
@pytest.mark.parametrize("case", CASES + UNBOUNDED_CASES, ids=lambda c: c.id())
def test_cuda_prep_lean_outputs_match_classic(case, save, monkeypatch):
    x = make_inputs(case, "cuda")
    monkeypatch.setenv("KDA_EXT_PREP_KERNEL", "lean")
    poison_allocator(x)
    lean = fwd_op_outputs(case, x, save)
    monkeypatch.setenv("KDA_EXT_PREP_KERNEL", "classic")
    poison_allocator(x)
    classic = fwd_op_outputs(case, x, save)
    assert_fwd_outputs_agree("lean vs classic", classic, lean, save)


@requires_cuda
@pytest.mark.parametrize("case", CASES + UNBOUNDED_CASES, ids=lambda c: c.id())
def test_cuda_prep_lean_against_reference(case, monkeypatch):
    ref, lean, again, classic = run_switch_pair(case, "KDA_EXT_PREP_KERNEL", monkeypatch,
                                                first="lean", second="classic")
    check_switch_pair(ref, lean, again, classic, same=(), tol=reference_tol(case))


@requires_cuda
def test_cuda_prep_lean_is_the_default(monkeypatch):
    # The agreement checks above also pass if both settings ran the same kernel: the profiler must
    # see chunk_prepare_lean by default and chunk_prepare with the switch at classic.
    case = CASES[0]
    x = make_inputs(case, "cuda")
    monkeypatch.delenv("KDA_EXT_PREP_KERNEL", raising=False)
    names = " ".join(kernels_launched(lambda: fwd_op_outputs(case, x, False)))
    assert "chunk_prepare_lean_kernel" in names, names
    monkeypatch.setenv("KDA_EXT_PREP_KERNEL", "classic")
    names = " ".join(kernels_launched(lambda: fwd_op_outputs(case, x, False)))
    assert "chunk_prepare_lean_kernel" not in names and "chunk_prepare_kernel" in names, names


@requires_cuda
def test_cuda_prep_switch_rejects_unknown(monkeypatch):
    case = CASES[1]
    x = make_inputs(case, "cuda")
    monkeypatch.setenv("KDA_EXT_PREP_KERNEL", "fast")
    with pytest.raises(RuntimeError, match="KDA_EXT_PREP_KERNEL must be auto, lean or classic"):
        run_kernel(case, x)

# tests/test_bwd_state_mma.py: the register-resident reverse state pass (bwd_state_mma.cuh).
"""For bf16 inputs, chunk 64 and K = 128 the backward's reverse state pass runs
bwd_state_mma_kernel (dS in registers, mma.sync, the fp32 operands as bf16 hi + lo) unless
KDA_EXT_BWD_STATE_KERNEL=wmma selects bwd_state_kernel. Each case runs the backward under both and
checks each against the float64 reference with FLA's tolerances, and the two against each other
tighter (the register kernel carries ~16 bits of dS and dv_new into its products where the wmma
kernel's tf32 carries 11, so they differ at about tf32's rounding, far below a layout error's
O(1)). Both must also be bitwise deterministic.
"""
import pytest
import torch

from conftest import Case, assert_kernels_agree, check_switch_pair, make_inputs, requires_cuda, run_kernel, run_switch_pair

BF16 = torch.bfloat16

KIMI = dict(gate_in_kernel=True, safe_gate=True, lower_bound=-5.0, l2norm_in_kernel=True, beta_sigmoid=True)

CASES = [
    # the Kimi setting with GVA and a partial last chunk
    Case(B=2, T=300, H=2, HV=4, K=128, V=128, dtype=BF16, **KIMI),
    # ragged T around the chunk, both state layouts, no initial state
    Case(B=1, T=1, H=1, HV=2, K=128, V=128, dtype=BF16),
    Case(B=2, T=63, H=1, HV=1, K=128, V=128, dtype=BF16, state_v_first=True),
    Case(B=1, T=64, H=1, HV=1, K=128, V=128, dtype=BF16, h0=False),
    Case(B=1, T=65, H=2, HV=2, K=128, V=128, dtype=BF16),
    # V not a multiple of 8, odd V, several slices with a partial last one, V below one slice
    Case(B=1, T=130, H=1, HV=2, K=128, V=100, dtype=BF16),
    Case(B=1, T=97, H=1, HV=1, K=128, V=33, dtype=BF16, state_v_first=True),
    Case(B=1, T=150, H=1, HV=1, K=128, V=200, dtype=BF16),
    Case(B=2, T=80, H=1, HV=1, K=128, V=16, dtype=BF16),
    # the unbounded softplus gate; -1000 gate entries (exact decay to zero)
    Case(B=1, T=200, H=1, HV=2, K=128, V=128, dtype=BF16, gate_in_kernel=True, beta_sigmoid=True),
    Case(B=1, T=200, H=1, HV=2, K=128, V=128, dtype=BF16, mask_p=0.1, mask_value=-1000.0),
    # varlen with a length-1 sequence and partial chunks; saved intermediates
    Case(cu_seqlens=[0, 1, 64, 65, 129, 500], H=2, HV=2, K=128, V=128, dtype=BF16, recipe="varlen"),
    Case(cu_seqlens=[0, 15, 16, 300], H=1, HV=2, K=128, V=96, dtype=BF16, recipe="varlen",
         state_v_first=True, disable_recompute=True, **KIMI),
]


@requires_cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id())
def test_cuda_bwd_state_kernels(case, monkeypatch):
    # bf16 gradients: a rounding flip is 2^-8 relative; fp32 dh0 2e-3. dA_log / ddt_bias are sums
    # over every token with cancellation, where the wmma kernel's tf32 products alone move them by
    # ~3e-3 (H100: 2.9e-3 for dA_log in the softplus case): FLA's 0.008 bar, which both kernels
    # also meet against the reference.
    check_switch_pair(*run_switch_pair(case, "KDA_EXT_BWD_STATE_KERNEL", monkeypatch))


@requires_cuda
def test_cuda_bwd_state_switch_rejects_unknown(monkeypatch):
    case = CASES[1]
    x = make_inputs(case, "cuda")
    monkeypatch.setenv("KDA_EXT_BWD_STATE_KERNEL", "fast")
    with pytest.raises(RuntimeError, match="KDA_EXT_BWD_STATE_KERNEL must be auto, mma or wmma"):
        run_kernel(case, x)


def test_kernels_agree_allows_one_rounding_step_only():
    # CPU check of the between-kernel rule: a one-step bf16 flip in a two-element tensor passes
    # (its RMS ratio, 4.5e-3, is above the 2e-3 bar), two steps or a swapped pair do not.
    a = torch.tensor([6.34375, -1.5], dtype=BF16)
    assert_kernels_agree("flip", a, torch.tensor([6.3125, -1.5], dtype=BF16), 2e-3)
    with pytest.raises(AssertionError):
        assert_kernels_agree("two steps", a, torch.tensor([6.28125, -1.5], dtype=BF16), 2e-3)
    with pytest.raises(AssertionError):
        assert_kernels_agree("swapped", a, a.flip(0), 2e-3)

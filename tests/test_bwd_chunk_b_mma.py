# tests/test_bwd_chunk_b_mma.py: kernel B of the backward in registers (bwd_chunk_b_mma.cuh).
"""For bf16 inputs, chunk 64 and K = V = 128 the backward's kernel B (dAkk -> dL, dAqk, dv, the
V part of dbeta) runs bwd_chunk_b_mma_kernel (mma.sync, the fp32 operands of its last two
products as bf16 hi + lo) unless KDA_EXT_BWD_B_KERNEL=wmma selects bwd_chunk_b_kernel. Each case
runs the backward under both and checks each against the float64 reference with FLA's
tolerances, and the two against each other tighter (the products differ only in the fp32
summation order and in carrying ~16 bits of dAkk / tmp where tf32 carries 11: far below a
layout or mask error's O(1)). Both must be bitwise deterministic. The fallback cases (V = 100,
chunk 32, fp16) run bwd_chunk_b_kernel under either setting and must agree bitwise.
"""
import pytest
import torch

from conftest import Case, assert_switch_pair_differs, check_switch_pair, make_inputs, requires_cuda, run_kernel, run_switch_pair

BF16 = torch.bfloat16

KIMI = dict(gate_in_kernel=True, safe_gate=True, lower_bound=-5.0, l2norm_in_kernel=True, beta_sigmoid=True)

CASES = [
    # the Kimi setting with GVA and a partial last chunk
    Case(B=2, T=300, H=2, HV=4, K=128, V=128, dtype=BF16, **KIMI),
    # ragged T around the chunk
    Case(B=1, T=1, H=1, HV=2, K=128, V=128, dtype=BF16),
    Case(B=2, T=63, H=1, HV=1, K=128, V=128, dtype=BF16, state_v_first=True),
    Case(B=1, T=64, H=1, HV=1, K=128, V=128, dtype=BF16, h0=False),
    Case(B=1, T=65, H=2, HV=2, K=128, V=128, dtype=BF16),
    # the unbounded softplus gate; -1000 gate entries (exact decay to zero)
    Case(B=1, T=200, H=1, HV=2, K=128, V=128, dtype=BF16, gate_in_kernel=True, beta_sigmoid=True),
    Case(B=1, T=200, H=1, HV=2, K=128, V=128, dtype=BF16, mask_p=0.1, mask_value=-1000.0),
    # varlen with a length-1 sequence and partial chunks; saved intermediates
    Case(cu_seqlens=[0, 1, 64, 65, 129, 500], H=2, HV=2, K=128, V=128, dtype=BF16, recipe="varlen"),
    Case(cu_seqlens=[0, 15, 16, 300], H=1, HV=2, K=128, V=128, dtype=BF16, recipe="varlen",
         disable_recompute=True, **KIMI),
]

# Configurations the register kernel does not take: both settings run bwd_chunk_b_kernel.
FALLBACK = [
    Case(B=1, T=130, H=1, HV=2, K=128, V=100, dtype=BF16),
    Case(B=1, T=100, H=1, HV=2, K=128, V=128, dtype=BF16, chunk_size=32),
    Case(B=1, T=100, H=1, HV=2, K=128, V=128, dtype=torch.float16),
]


@requires_cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id())
def test_cuda_bwd_chunk_b_kernels(case, monkeypatch):
    # bf16 gradients: a rounding flip is 2^-8 relative; fp32 dh0 2e-3; dA_log / ddt_bias FLA's bar.
    check_switch_pair(*run_switch_pair(case, "KDA_EXT_BWD_B_KERNEL", monkeypatch))


@requires_cuda
@pytest.mark.parametrize("case", FALLBACK, ids=lambda c: c.id())
def test_cuda_bwd_chunk_b_fallback(case, monkeypatch):
    ref, out_m, again, out_w = run_switch_pair(case, "KDA_EXT_BWD_B_KERNEL", monkeypatch)
    check_switch_pair(ref, out_m, again, out_w, same=tuple(out_m))


@requires_cuda
def test_cuda_bwd_chunk_b_switch_rejects_unknown(monkeypatch):
    case = CASES[1]
    x = make_inputs(case, "cuda")
    monkeypatch.setenv("KDA_EXT_BWD_B_KERNEL", "fast")
    with pytest.raises(RuntimeError, match="KDA_EXT_BWD_B_KERNEL must be auto, mma or wmma"):
        run_kernel(case, x)


@requires_cuda
def test_cuda_bwd_chunk_b_mma_is_dispatched(monkeypatch):
    _, out_m, _, out_w = run_switch_pair(CASES[0], "KDA_EXT_BWD_B_KERNEL", monkeypatch)
    assert_switch_pair_differs(out_m, out_w)

# tests/test_bwd_chunk_a_mma.py: kernel A with its products in registers (bwd_chunk_a_mma.cuh).
"""For bf16 inputs, chunk 64, K = V = 128 (aligned tensors, the l2norm rstd from the recompute or no
l2norm) the backward's kernel A runs bwd_chunk_a_mma_kernel (mma.sync; dw and kb as bf16 hi + lo)
unless KDA_EXT_BWD_A_KERNEL=wmma selects bwd_chunk_a_kernel. Each case runs the backward under
both and checks each against the float64 reference with FLA's tolerances, and the two against
each other tighter (the register kernel carries ~16 bits of dw and kb into dAkk and dkb where the
wmma kernel's tf32 carries 11; everything else is the same products in another fp32 order, so
they differ at about bf16 output rounding, far below a layout or mask error's O(1)). Both must be
bitwise deterministic. Where the register kernel does not apply (fallback cases) the two runs are
the same kernel and must agree bitwise.
"""
import pytest
import torch

from conftest import Case, assert_switch_pair_differs, check_switch_pair, make_inputs, requires_cuda, run_kernel, run_switch_pair

BF16 = torch.bfloat16

KIMI = dict(gate_in_kernel=True, safe_gate=True, lower_bound=-5.0, l2norm_in_kernel=True, beta_sigmoid=True)

# (case, whether bwd_chunk_a_mma_kernel applies)
CASES = [
    # the Kimi setting with GVA and a partial last chunk
    (Case(B=2, T=300, H=2, HV=4, K=128, V=128, dtype=BF16, **KIMI), True),
    # ragged T around the chunk, both state layouts, no initial state
    (Case(B=1, T=1, H=1, HV=2, K=128, V=128, dtype=BF16), True),
    (Case(B=2, T=63, H=1, HV=1, K=128, V=128, dtype=BF16, state_v_first=True), True),
    (Case(B=1, T=64, H=1, HV=1, K=128, V=128, dtype=BF16, h0=False), True),
    (Case(B=1, T=65, H=2, HV=2, K=128, V=128, dtype=BF16), True),
    (Case(B=1, T=300, H=2, HV=4, K=128, V=128, dtype=BF16, state_v_first=True, **KIMI), True),
    # the unbounded softplus gate; -1000 gate entries (exact decay to zero)
    (Case(B=1, T=200, H=1, HV=2, K=128, V=128, dtype=BF16, gate_in_kernel=True, beta_sigmoid=True), True),
    (Case(B=1, T=200, H=1, HV=2, K=128, V=128, dtype=BF16, mask_p=0.1, mask_value=-1000.0), True),
    # varlen with a length-1 sequence and partial chunks
    (Case(cu_seqlens=[0, 1, 64, 65, 129, 500], H=2, HV=2, K=128, V=128, dtype=BF16, recipe="varlen"), True),
    # saved intermediates without l2norm (no rstd to compute: the register kernel)
    (Case(cu_seqlens=[0, 15, 16, 300], H=1, HV=2, K=128, V=128, dtype=BF16, recipe="varlen",
          state_v_first=True, disable_recompute=True, gate_in_kernel=True, beta_sigmoid=True), True),
    # fallbacks: saved intermediates with l2norm (kernel A computes the rstd), chunk 32, V = 100
    (Case(B=1, T=150, H=1, HV=2, K=128, V=128, dtype=BF16, disable_recompute=True, **KIMI), False),
    (Case(B=1, T=100, H=1, HV=2, K=128, V=128, dtype=BF16, chunk_size=32), False),
    (Case(B=1, T=130, H=1, HV=2, K=128, V=100, dtype=BF16), False),
]


@requires_cuda
@pytest.mark.parametrize("case,applies", CASES, ids=lambda c: c.id() if isinstance(c, Case) else ("mma" if c else "fallback"))
def test_cuda_bwd_chunk_a_kernels(case, applies, monkeypatch):
    # The forward and the reverse state pass (dh0) do not depend on kernel A; a fallback case runs
    # the same kernel A twice. bf16 gradients: the wmma kernel's dAkk and dkb carry tf32's ~5e-4
    # relative rounding of dw and kb (the register kernel's hi + lo ~1e-5), which moves some bf16
    # roundings of the outputs: ~1e-3, far below a layout or mask error; dg (sums with
    # cancellation) gets bwd_state_mma's bar.
    ref, out_m, again, out_w = run_switch_pair(case, "KDA_EXT_BWD_A_KERNEL", monkeypatch)
    same = tuple(out_m) if not applies else ("o", "ht", "dh0")
    check_switch_pair(ref, out_m, again, out_w, same=same, bar16=2e-3, bars={"dg": 4e-3})


@requires_cuda
def test_cuda_bwd_chunk_a_switch_rejects_unknown(monkeypatch):
    case = CASES[1][0]
    x = make_inputs(case, "cuda")
    monkeypatch.setenv("KDA_EXT_BWD_A_KERNEL", "fast")
    with pytest.raises(RuntimeError, match="KDA_EXT_BWD_A_KERNEL must be auto, mma or wmma"):
        run_kernel(case, x)


@requires_cuda
def test_cuda_bwd_chunk_a_mma_is_dispatched(monkeypatch):
    _, out_m, _, out_w = run_switch_pair(CASES[0][0], "KDA_EXT_BWD_A_KERNEL", monkeypatch, first="auto")
    assert_switch_pair_differs(out_m, out_w)

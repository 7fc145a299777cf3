# tests/test_varlen.py: packed variable-length sequences (cu_seqlens) against per-sequence references.
import dataclasses

import pytest
import torch

import kda_ext
from conftest import (
    FLA_VARLEN_TOL,
    Case,
    assert_rel_close,
    compare,
    make_inputs,
    run_kernel,
    requires_cuda,
    run_reference,
)

F16 = torch.float16

# FLA's test_chunk_varlen matrix (KDA_REFERENCE §4):
# (H, D, mask_p, cu_seqlens, dtype, gate_in_kernel, safe_gate, disable_recompute, chunk_size)
FLA_VARLEN_CASES = [
    (4, 60, .1, [0, 15], F16, True, False, False, 64),
    (4, 64, .9, [0, 256, 500, 1000], F16, True, False, False, 64),
    (4, 128, .5, [0, 256, 500, 1000], F16, False, False, False, 64),
    (4, 100, 0, [0, 15, 100, 300, 1200, 2000], F16, True, False, False, 64),
    (4, 256, 0, [0, 100, 300, 1200, 3000, 4096], F16, False, True, True, 64),
    (4, 60, .1, [0, 31, 96, 160], F16, True, False, True, 32),
]


def _fla_varlen(H, D, mask_p, cu, dtype, gate, safe, norecomp, bt):
    return Case(H=H, HV=H, K=D, V=D, mask_p=mask_p, mask_value=-1000.0, cu_seqlens=cu, dtype=dtype,
                gate_in_kernel=gate, safe_gate=safe, disable_recompute=norecomp, chunk_size=bt,
                recipe="varlen", A_log_4d=True)


@pytest.mark.parametrize("case", [_fla_varlen(*c) for c in FLA_VARLEN_CASES], ids=lambda c: c.id())
def test_chunk_varlen_fla(case, device):
    if device == "cpu" and case.K * case.T > 200_000:
        # The fp32 recurrence over 4096 tokens with 256x256 states is the cost on 2 cores:
        # keep the lengths and dims, use fewer heads.
        case = dataclasses.replace(case, H=1, HV=1)
    x = make_inputs(case, device)
    ref = run_reference(case, x)
    out = run_kernel(case, x)
    compare(ref, out, FLA_VARLEN_TOL)


TIGHT = dict(o=2e-5, ht=2e-5, dq=1e-4, dk=1e-4, dv=1e-4, dg=2e-4, dbeta=1e-4, dh0=1e-4, dA_log=1e-4, ddt_bias=1e-4)
# -1000 gate entries: the fp32 within-chunk cumsum sits near -1000 where one ulp is 6e-5, so each
# exp(G_i - G_j) carries ~1e-5 relative error, inherent to the chunk form (see test_forward.py).
TIGHT_EXTREME = {n: 10 * r for n, r in TIGHT.items()}

VARLEN_EDGE_CASES = [
    Case(cu_seqlens=[0, 1, 2, 66, 67, 130], H=1, HV=2, K=32, V=32),  # length-1 sequences
    Case(cu_seqlens=[0, 1], H=1, HV=1, K=16, V=16),  # a single token
    Case(cu_seqlens=[0, 64, 128, 129, 193], H=2, HV=4, K=24, V=40),  # chunk-aligned boundaries, GVA
    Case(cu_seqlens=[0, 31, 32, 33, 97, 150], H=1, HV=2, K=32, V=16, chunk_size=32),
    Case(cu_seqlens=[0, 50, 170], H=1, HV=2, K=32, V=32, mask_p=0.2, mask_value=-1000.0),
    Case(cu_seqlens=[0, 50, 170], H=1, HV=2, K=32, V=32, gate_in_kernel=True, l2norm_in_kernel=True,
         beta_sigmoid=True, neg_eig=True, state_v_first=True, safe_gate=True, disable_recompute=True),
    Case(cu_seqlens=[0, 50, 170], H=1, HV=2, K=32, V=32, h0=False),
]


@pytest.mark.parametrize("case", [dataclasses.replace(c, dtype=torch.float32, recipe="varlen")
                                  for c in VARLEN_EDGE_CASES], ids=lambda c: c.id())
def test_varlen_fp32_tight_cpu(case):
    x = make_inputs(case, "cpu")
    compare(run_reference(case, x), run_kernel(case, x), TIGHT if case.mask_value > -100 else TIGHT_EXTREME)


@pytest.mark.parametrize("case", [dataclasses.replace(c, dtype=F16, recipe="varlen") for c in VARLEN_EDGE_CASES],
                         ids=lambda c: c.id())
def test_varlen_edges_fp16(case, device):
    x = make_inputs(case, device)
    compare(run_reference(case, x), run_kernel(case, x), FLA_VARLEN_TOL)


@pytest.mark.parametrize("state_v_first", [False, True])
@pytest.mark.parametrize("bounds", [[0, 40, 40, 100], [0, 0, 0, 70]])
def test_varlen_empty_sequence(device, bounds, state_v_first):
    # A zero-length sequence is valid (offsets are non-decreasing): its final state is its h0.
    # (With state_v_first the CUDA kernel once read that h0 back across warps without a barrier.)
    case = Case(cu_seqlens=bounds, H=1, HV=2, K=64, V=48, dtype=torch.float32, recipe="varlen",
                state_v_first=state_v_first)
    x = make_inputs(case, device)
    out = run_kernel(case, x, grads=False)
    for n in range(len(bounds) - 1):
        if bounds[n + 1] == bounds[n]:
            assert torch.equal(out["ht"][n], x["h0"][n].detach()), f"sequence {n}"
    compare(run_reference(case, x, grads=False), out, 2e-5 if device == "cpu" else 1e-3)


def test_more_sequences_times_heads_than_a_grid_row(device):
    # N * HV = 257 * 256 > 65535: sequences must not share a 65535-limited grid dimension with heads.
    bounds = list(range(257)) + [256 + 100]  # 256 single tokens, then one 100-token sequence
    case = Case(cu_seqlens=bounds, H=2, HV=256, K=16, V=16, dtype=torch.float16, recipe="varlen",
                gate_in_kernel=True)
    x = make_inputs(case, device)
    compare(run_reference(case, x), run_kernel(case, x), FLA_VARLEN_TOL)


def test_more_sequences_than_scan_threads(device):
    # 2100 sequences: the CUDA backward's offset scan (one block of 1024 threads) gives every
    # thread several sequences, and the gate-gradient partials span thousands of chunk slots.
    # Lengths 0..3 (empty ones included) and one 70-token sequence that crosses a chunk boundary.
    lengths = [(7 * n) % 4 for n in range(2099)] + [70]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    case = Case(cu_seqlens=bounds, H=1, HV=2, K=16, V=16, dtype=torch.float32, recipe="varlen",
                gate_in_kernel=True)
    x = make_inputs(case, device)
    compare(run_reference(case, x), run_kernel(case, x), FLA_VARLEN_TOL)


def _inputs_with_uncovered_tail():
    """q, k, v, g, beta of 50 tokens on CUDA whose device offsets [0, 5, 40] (no host copy, so
    not validated) leave the last 10 tokens to no sequence; plus the offsets and h0."""
    case = Case(cu_seqlens=[0, 5, 40], H=1, HV=2, K=32, V=32, dtype=torch.bfloat16, recipe="varlen")
    x = make_inputs(case, "cuda")
    q, k, v, g, beta = (torch.cat([x[n].detach(), torch.randn_like(x[n][:, :10])], dim=1)
                        for n in ("q", "k", "v", "g", "beta"))
    return [q, k, v, g.clamp(max=0), beta.sigmoid()], x["cu_seqlens"], x["h0"].detach()


def _leave_nan_in_allocator(numel, dtype):
    # Freed NaN blocks stay in the caching allocator, so a buffer the kernels do not write cannot
    # pass as zeros by luck.
    garbage = [torch.full((numel,), float("nan"), device="cuda", dtype=dtype) for _ in range(16)]
    del garbage


@requires_cuda
def test_uncovered_tokens_are_zero_with_unchecked_device_offsets():
    # Device offsets without a host copy are not validated (no sync); tokens past cu_seqlens[-1]
    # must come out as zeros, not uninitialised memory.
    inputs, cu, h0 = _inputs_with_uncovered_tail()
    _leave_nan_in_allocator(inputs[2].numel(), inputs[2].dtype)  # blocks of o's size
    o, _ = kda_ext.chunk_kda(*inputs, cu_seqlens=cu, initial_state=h0)
    assert torch.equal(o[:, 40:], torch.zeros_like(o[:, 40:]))


@requires_cuda
def test_uncovered_tokens_get_zero_gradients_with_unchecked_device_offsets():
    # The backward's per-token buffers (dv, dg, the dq/dk/dbeta partials) follow the same rule:
    # tokens past cu_seqlens[-1] do not reach the output, so their gradients are exactly zero,
    # never leftovers of earlier allocations.
    inputs, cu, h0 = _inputs_with_uncovered_tail()
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    _leave_nan_in_allocator(4 * inputs[0].numel(), torch.float32)  # fp32 workspaces too
    o, _ = kda_ext.chunk_kda(*leaves, cu_seqlens=cu, initial_state=h0)
    o.backward(torch.randn_like(o))
    for name, t in zip(("q", "k", "v", "g", "beta"), leaves):
        tail = t.grad[:, 40:]
        assert torch.equal(tail, torch.zeros_like(tail)), f"d{name} of uncovered tokens is not zero"
        assert torch.isfinite(t.grad).all(), f"d{name} is not finite"


def test_varlen_equals_separate_calls(device):
    bounds = [0, 7, 70, 71, 200]
    case = Case(cu_seqlens=bounds, H=2, HV=4, K=32, V=16, dtype=torch.float32, recipe="varlen",
                gate_in_kernel=True, chunk_size=32)
    x = make_inputs(case, device)
    packed = run_kernel(case, x, grads=False)
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        o, ht = kda_ext.chunk_kda(*(x[m].detach()[:, a:b] for m in ("q", "k", "v", "g", "beta")),
                                  initial_state=x["h0"].detach()[n:n + 1], output_final_state=True,
                                  use_gate_in_kernel=True, A_log=x["A_log"].detach(), dt_bias=x["dt_bias"].detach(),
                                  chunk_size=32)
        assert_rel_close(f"o[{n}]", o, packed["o"][:, a:b], 1e-6)
        assert_rel_close(f"ht[{n}]", ht, packed["ht"][n:n + 1], 1e-6)


def test_cu_seqlens_int32_and_cpu_copy(device):
    case = Case(cu_seqlens=[0, 33, 90, 100], H=1, HV=2, K=16, V=16, dtype=torch.float32, recipe="varlen")
    x = make_inputs(case, device)
    base = run_kernel(case, x, grads=False)
    x32 = dict(x, cu_seqlens=x["cu_seqlens"].to(torch.int32))
    as32 = run_kernel(case, x32, grads=False)
    with_cpu = run_kernel(case, x, grads=False, cu_seqlens_cpu=torch.tensor(case.cu_seqlens))
    for other in (as32, with_cpu):
        assert torch.equal(base["o"], other["o"]) and torch.equal(base["ht"], other["ht"])


@pytest.mark.parametrize("use_cpu_copy", [False, True])
@pytest.mark.parametrize("chunk_size", [32, 64])
def test_varlen_return_intermediate_states(device, use_cpu_copy, chunk_size):
    bounds = [0, 1, 64, 65, 200]
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    case = Case(cu_seqlens=bounds, H=1, HV=2, K=16, V=24, dtype=dt, recipe="varlen", chunk_size=chunk_size)
    x = make_inputs(case, device)
    extra = {"cu_seqlens_cpu": torch.tensor(bounds)} if use_cpu_copy else {}
    with torch.inference_mode():
        o, ht, h = kda_ext.chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                     output_final_state=True, cu_seqlens=x["cu_seqlens"],
                                     return_intermediate_states=True, chunk_size=chunk_size, **extra)
    counts = [-(-(b - a) // chunk_size) for a, b in zip(bounds[:-1], bounds[1:])]
    assert h.shape == (1, sum(counts), case.HV, case.K, case.V) and h.dtype == x["k"].dtype
    tol = 2e-5 if dt == torch.float32 else 0.01
    slot = 0
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        for c in range(counts[n]):
            t = a + c * chunk_size
            with torch.no_grad():
                _, want = kda_ext.naive_recurrent_kda(*(x[m].detach()[:, a:t] for m in ("q", "k", "v", "g", "beta")),
                                                      initial_state=x["h0"].detach()[n:n + 1],
                                                      output_final_state=True)
            assert_rel_close(f"h[seq {n}, chunk {c}]", want[0], h[0, slot], tol)
            slot += 1

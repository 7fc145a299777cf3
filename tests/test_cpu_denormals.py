# tests/test_cpu_denormals.py: the CPU kernels flush denormals inside their parallel regions
# (csrc/cpu/parallel.h) and leave the caller's floating-point mode as they found it.
import math

import pytest
import torch

from conftest import Case, compare, make_inputs, run_kernel, run_reference

# The fp32 CPU bar of tests/test_backward.py's test_chunk_fp32_tight_cpu.
from test_backward import TIGHT_TOL

LOG_FLT_MIN = math.log(torch.finfo(torch.float32).tiny)  # -87.3: e^x below this is a denormal


def product_is_flushed(numel: int = 1) -> bool:
    """Whether 1e-30 * 1e-10 (1e-40, below FLT_MIN) comes out as zero in torch right now.

    numel = 1 runs on the calling thread; a large tensor is split over torch's intra-op pool,
    the OpenMP threads the kernels' parallel regions run on.
    """
    x = torch.full((numel,), 1e-30, dtype=torch.float32) * 1e-10
    return bool((x == 0).any())


def strong_gate_case_inputs(gate_in_kernel: bool):
    """fp32 inputs whose decays produce denormals within a chunk (log-gates around -2.5)."""
    if gate_in_kernel:
        # The lower-bound gate, lower_bound * sigmoid(exp(A_log) (g + dt_bias)), in (-5, 0).
        case = Case(B=1, T=200, H=1, HV=2, K=32, V=32, dtype=torch.float32, gate_in_kernel=True,
                    lower_bound=-5.0, safe_gate=True, l2norm_in_kernel=True)
        x = make_inputs(case, "cpu")
        with torch.no_grad():
            x["A_log"].zero_()  # exp(A_log) = 1: the gate is -5 sigmoid(g + dt_bias), mean -2.5
            g = -5.0 * torch.sigmoid(x["g"] + x["dt_bias"].view(case.HV, case.K))
    else:
        case = Case(B=1, T=200, H=1, HV=2, K=32, V=32, dtype=torch.float32)
        x = make_inputs(case, "cpu")
        with torch.no_grad():
            x["g"].copy_(-5.0 * torch.sigmoid(torch.randn_like(x["g"])))
        g = x["g"].detach()
    # The case must reach the regime under test: some e^{G_i - G_j} inside a chunk below FLT_MIN.
    chunk = g[:, : case.chunk_size].double().sum(dim=1)
    assert chunk.min().item() < LOG_FLT_MIN, "the strong-gate case no longer produces denormals"
    return case, x


@pytest.mark.parametrize("gate_in_kernel", [False, True], ids=["pregated", "lowerbound-gate"])
def test_strong_gates_match_the_reference_cpu(gate_in_kernel):
    case, x = strong_gate_case_inputs(gate_in_kernel)
    ref = run_reference(case, x)
    out = run_kernel(case, x)
    compare(ref, out, TIGHT_TOL)


@pytest.mark.parametrize("caller_flushes", [False, True], ids=["caller-keeps", "caller-flushes"])
def test_cpu_kernels_restore_the_callers_denormal_mode(caller_flushes):
    if not torch.set_flush_denormal(caller_flushes):
        pytest.skip("torch.set_flush_denormal is not supported on this CPU")
    try:
        assert product_is_flushed() == caller_flushes  # the mode took effect before the call
        case, x = strong_gate_case_inputs(gate_in_kernel=False)
        out = run_kernel(case, x)  # forward and backward: every parallel region of both ops
        assert torch.isfinite(out["dg"]).all()
        assert product_is_flushed() == caller_flushes, "the calling thread's mode changed"
        if not caller_flushes:
            # torch.set_flush_denormal sets the calling thread only, so the pool threads are
            # checked where they must still keep denormals.
            assert not product_is_flushed(1 << 20), "an OpenMP pool thread was left flushing"
    finally:
        torch.set_flush_denormal(False)

# tests/test_forward.py: chunk_kda's outputs against naive_recurrent_kda, and the forward's API behaviour.
import dataclasses
import warnings

import pytest
import torch

import kda_ext
from conftest import (
    FLA_TOL,
    Case,
    assert_rel_close,
    compare,
    make_inputs,
    run_kernel,
    run_reference,
)

# The tight bar for fp32 on the CPU (the chunk form and the recurrence differ by rounding only),
# and for fp64 (only the order of operations differs).
FP32_TOL = 2e-5
FP64_TOL = 1e-10
# With -1000 gate entries the fp32 within-chunk cumsum G sits near -1000, where one ulp is 6e-5:
# every exp(G_i - G_j) then carries ~1e-5 relative error (inherent to the chunk form; the
# recurrence, which never forms G, does not see it).
FP32_TOL_EXTREME = 2e-4


def _fwd_pair(case, device):
    x = make_inputs(case, device)
    with torch.no_grad():
        ref = run_reference(case, x, grads=False)
        out = run_kernel(case, x, grads=False)
    return ref, out


EDGE_CASES = [
    Case(T=1, K=64),
    Case(T=63, K=64),
    Case(T=64, K=64),
    Case(T=65, K=64),
    Case(B=2, T=1000, H=2, HV=2, K=32),
    Case(B=2, T=130, H=1, HV=1, K=60, V=60),  # not a power of two
    Case(B=1, T=100, H=2, HV=2, K=48, V=20),  # K != V
    Case(B=1, T=100, H=1, HV=2, K=16, V=72),  # K < V
    Case(B=2, T=97, H=2, HV=6, K=32, V=24),  # GVA
    Case(B=1, T=77, H=1, HV=1, K=256, V=256),  # the largest head dims
    Case(B=1, T=150, H=1, HV=2, K=40, V=40, chunk_size=32),
    Case(B=1, T=33, H=1, HV=1, K=16, V=16, chunk_size=32),
    Case(B=1, T=200, H=1, HV=2, K=32, V=32, mask_p=0.1, mask_value=-1000.0),  # extreme decay
    Case(B=1, T=200, H=1, HV=2, K=32, V=32, mask_p=0.1, mask_value=-1000.0, chunk_size=32),
    Case(B=1, T=100, H=1, HV=1, K=32, V=32, normalizer=0.1),  # strong decay
    Case(B=1, T=100, H=1, HV=1, K=32, V=32, h0=False),
]


@pytest.mark.parametrize("case", [dataclasses.replace(c, dtype=torch.float32) for c in EDGE_CASES],
                         ids=lambda c: c.id())
def test_forward_fp32_tight_cpu(case):
    ref, out = _fwd_pair(case, "cpu")
    compare(ref, out, FP32_TOL if case.mask_value > -100 else FP32_TOL_EXTREME)


@pytest.mark.parametrize("case", [dataclasses.replace(c, dtype=torch.float64) for c in EDGE_CASES[:6]],
                         ids=lambda c: c.id())
def test_forward_fp64_cpu(case):
    ref, out = _fwd_pair(case, "cpu")
    compare(ref, out, FP64_TOL)


@pytest.mark.parametrize("case", [dataclasses.replace(c, dtype=dt) for c in EDGE_CASES
                                  for dt in (torch.float16, torch.bfloat16)],
                         ids=lambda c: c.id())
def test_forward_low_precision(case, device):
    ref, out = _fwd_pair(case, device)
    compare(ref, out, {"o": FLA_TOL["o"], "ht": FLA_TOL["ht"]})


FLAG_CASES = [
    Case(l2norm_in_kernel=True),
    Case(gate_in_kernel=True),
    Case(gate_in_kernel=True, dt_bias=False),
    Case(gate_in_kernel=True, A_log_4d=True),
    Case(gate_in_kernel=True, lower_bound=-5.0),  # the lower-bound gate without safe_gate
    Case(gate_in_kernel=True, lower_bound=-3.0, safe_gate=True),
    Case(safe_gate=True),  # pre-gated safe path (g clamped to [-5, 0])
    Case(beta_sigmoid=True),
    Case(beta_sigmoid=True, neg_eig=True),
    Case(state_v_first=True, V=48),
    Case(disable_recompute=True),
    Case(l2norm_in_kernel=True, gate_in_kernel=True, beta_sigmoid=True, neg_eig=True, safe_gate=True,
         state_v_first=True, disable_recompute=True, H=2, HV=4, V=40, chunk_size=32),
]


@pytest.mark.parametrize("case", [dataclasses.replace(c, T=150, B=2, K=32, V=c.V if c.V != 64 else 32,
                                                      H=c.H, HV=max(c.HV, 2), dtype=torch.float32)
                                  for c in FLAG_CASES], ids=lambda c: c.id())
def test_forward_flags_fp32(case, device):
    ref, out = _fwd_pair(case, device)
    compare(ref, out, FP32_TOL if device == "cpu" else 1e-3)


def test_lower_bound_gate_without_A_log(device):
    case = Case(B=1, T=90, H=1, HV=2, K=16, V=16, gate_in_kernel=True, lower_bound=-4.0, dtype=torch.float32)
    x = make_inputs(case, device)
    x.pop("A_log")
    with torch.no_grad():
        ref = run_reference(case, x, grads=False)
        out = run_kernel(case, x, grads=False)
    compare(ref, out, FP32_TOL if device == "cpu" else 1e-3)


def test_outputs_shapes_dtypes(device):
    B, T, H, HV, K, V = 2, 70, 2, 4, 32, 24
    q = torch.randn(B, T, H, K, dtype=torch.bfloat16, device=device)
    k = torch.nn.functional.normalize(torch.randn_like(q).float(), dim=-1).bfloat16()
    v = torch.randn(B, T, HV, V, dtype=torch.bfloat16, device=device)
    g = -torch.rand(B, T, HV, K, device=device)  # fp32 g with bf16 q, as FLA's tests pass it
    beta = torch.rand(B, T, HV, dtype=torch.bfloat16, device=device)
    o, ht = kda_ext.chunk_kda(q, k, v, g, beta)
    assert o.shape == (B, T, HV, V) and o.dtype == torch.bfloat16 and ht is None
    o, ht = kda_ext.chunk_kda(q, k, v, g, beta, output_final_state=True)
    assert ht.shape == (B, HV, K, V) and ht.dtype == torch.float32
    o, ht = kda_ext.chunk_kda(q, k, v, g, beta, output_final_state=True, state_v_first=True)
    assert ht.shape == (B, HV, V, K) and ht.dtype == torch.float32
    assert o.is_contiguous() and ht.is_contiguous()


def test_gate_params_ignored_without_gate_in_kernel(device):
    case = Case(B=1, T=40, H=1, HV=2, K=16, V=16, dtype=torch.float32)
    x = make_inputs(case, device)
    with torch.no_grad():
        base = run_kernel(case, x, grads=False)
        # Wrong sizes and dtypes too: they are discarded before any check, as in FLA.
        other = run_kernel(case, x, grads=False, A_log=torch.randn(7, dtype=torch.float16),
                           dt_bias=torch.randn(3))
    assert torch.equal(base["o"], other["o"]) and torch.equal(base["ht"], other["ht"])


def test_transpose_state_layout_alias(device):
    case = Case(B=1, T=40, H=1, HV=1, K=16, V=8, dtype=torch.float32, state_v_first=True)
    x = make_inputs(case, device)
    with torch.no_grad():
        base = run_kernel(case, x, grads=False)
        with pytest.warns(DeprecationWarning, match="transpose_state_layout"):
            alias = run_kernel(case, x, grads=False, state_v_first=False, transpose_state_layout=True)
    assert torch.equal(base["o"], alias["o"]) and torch.equal(base["ht"], alias["ht"])


def test_non_contiguous_inputs_match_contiguous(device):
    B, T, H, HV, K, V = 2, 80, 2, 4, 16, 12
    case = Case(B=B, T=T, H=H, HV=HV, K=K, V=V, dtype=torch.float32, gate_in_kernel=True,
                l2norm_in_kernel=True, A_log_4d=True)
    x = make_inputs(case, device)

    def strided(t):
        # Same values, permuted memory: [.., a, b] stored as [b, a]-major, then viewed back.
        return t.detach().transpose(0, -1).contiguous().transpose(0, -1)

    def run(q, k, v, g, beta, h0, A, b):
        return kda_ext.chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                 use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A, dt_bias=b)

    names = ["q", "k", "v", "g", "beta", "h0", "A_log", "dt_bias"]
    base = [x[n].detach() for n in names]
    nc = [strided(t) for t in base]
    nc[2] = torch.randn(B, T, HV, 2 * V, device=device)[..., ::2].copy_(base[2])  # sliced view
    assert not any(t.is_contiguous() for t in nc[:5])
    with torch.no_grad():
        o1, ht1 = run(*base)
        o2, ht2 = run(*nc)
    assert torch.equal(o1, o2) and torch.equal(ht1, ht2)


def test_inputs_not_modified(device):
    case = Case(B=2, T=70, H=1, HV=2, K=16, V=16, dtype=torch.float32, gate_in_kernel=True,
                l2norm_in_kernel=True, beta_sigmoid=True, neg_eig=True)
    x = make_inputs(case, device)
    clones = {n: t.detach().clone() for n, t in x.items()}
    out = run_kernel(case, x, grads=True, disable_recompute=True)
    for n, t in x.items():
        assert torch.equal(t.detach(), clones[n]), f"{n} was modified"
    assert out["dq"] is not None


@pytest.mark.parametrize("chunk_size", [32, 64])
@pytest.mark.parametrize("svf", [False, True])
def test_return_intermediate_states(device, chunk_size, svf):
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    case = Case(B=2, T=150, H=1, HV=2, K=16, V=24, dtype=dt, chunk_size=chunk_size, state_v_first=svf,
                recipe="varlen")
    x = make_inputs(case, device)
    with torch.inference_mode():
        o, ht, h = kda_ext.chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                     output_final_state=True, return_intermediate_states=True,
                                     state_v_first=svf, chunk_size=chunk_size)
        o2, ht2 = kda_ext.chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                    output_final_state=True, state_v_first=svf, chunk_size=chunk_size)
    NT = -(-case.T // chunk_size)
    st = (case.V, case.K) if svf else (case.K, case.V)
    assert h.shape == (case.B, NT, case.HV, *st) and h.dtype == x["k"].dtype
    assert torch.equal(o, o2) and torch.equal(ht, ht2)
    tol = FP32_TOL if dt == torch.float32 else 0.01
    assert_rel_close("h[0]", x["h0"].detach(), h[:, 0], tol)
    for c in range(1, NT):
        t = c * chunk_size
        sl = {n: x[n].detach()[:, :t] for n in ("q", "k", "v", "g", "beta")}
        with torch.no_grad():
            _, want = kda_ext.naive_recurrent_kda(sl["q"], sl["k"], sl["v"], sl["g"], sl["beta"],
                                                  initial_state=x["h0"].detach(), output_final_state=True,
                                                  state_v_first=svf)
        assert_rel_close(f"h[{c}]", want, h[:, c], tol)


def test_fp64_on_cpu_matches_reference():
    case = Case(B=1, T=70, H=2, HV=4, K=12, V=10, dtype=torch.float64, gate_in_kernel=True,
                l2norm_in_kernel=True, beta_sigmoid=True)
    ref, out = _fwd_pair(case, "cpu")
    assert out["o"].dtype == torch.float64 and out["ht"].dtype == torch.float64
    compare(ref, out, FP64_TOL)


def test_deterministic(device):
    case = Case(B=1, T=130, H=1, HV=2, K=32, V=32, dtype=torch.float16)
    x = make_inputs(case, device)
    a = run_kernel(case, x)
    b = run_kernel(case, x)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_no_warnings_on_plain_call(device):
    case = Case(B=1, T=20, H=1, HV=1, K=16, V=16, dtype=torch.float32)
    x = make_inputs(case, device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_kernel(case, x)

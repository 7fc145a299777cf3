# tests/test_reference.py: the plain-torch references against each other and against their formulas.
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_rel_close
from kda_ext.reference import (
    l2norm,
    naive_chunk_kda,
    naive_kda_gate,
    naive_kda_lowerbound_gate,
    naive_recurrent_kda,
)


def _inputs(B, T, H, HV, K, V, normalizer=1.0, dtype=torch.float32, N=None):
    q = F.normalize(torch.rand(B, T, H, K, dtype=dtype), p=2, dim=-1)
    k = F.normalize(torch.rand(B, T, H, K, dtype=dtype), p=2, dim=-1)
    v = torch.rand(B, T, HV, V, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, HV, K, dtype=dtype)) / normalizer
    beta = torch.randn(B, T, HV, dtype=dtype).sigmoid()
    h0 = torch.randn(N or B, HV, K, V, dtype=dtype)
    return q, k, v, g, beta, h0


# FLA's test_naive_chunk matrix (B, T, H, HV, D, scale, gate normaliser), plus GVA cases.
NAIVE_CHUNK_CASES = [
    (1, 64, 1, 1, 64, 1, 1),
    (2, 512, 3, 3, 60, 1, 1),
    (4, 1024, 4, 4, 128, 0.1, 1),
    (4, 1024, 4, 4, 128, 1, 10),
    (1, 64, 1, 2, 64, 1, 1),
    (2, 512, 2, 4, 60, 1, 1),
]


@pytest.mark.parametrize("B,T,H,HV,D,scale,normalizer", NAIVE_CHUNK_CASES,
                         ids=["B{}-T{}-H{}-HV{}-D{}-scale{}-norm{}".format(*c) for c in NAIVE_CHUNK_CASES])
def test_naive_chunk_matches_recurrent(B, T, H, HV, D, scale, normalizer):
    q, k, v, g, beta, h0 = _inputs(B, T, H, HV, D, D, normalizer)
    ref, ref_ht = naive_recurrent_kda(q, k, v, g, beta, scale, h0, output_final_state=True)
    out, out_ht = naive_chunk_kda(q, k, v, g, beta, scale, h0, output_final_state=True)
    assert_rel_close("o", ref, out, 0.005)
    assert_rel_close("ht", ref_ht, out_ht, 0.005)
    # In fp32 the two forms agree far more closely than FLA's bar.
    assert_rel_close("o(fp32 tight)", ref, out, 2e-5)
    assert_rel_close("ht(fp32 tight)", ref_ht, out_ht, 2e-5)


@pytest.mark.parametrize("chunk_size", [32, 64])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
def test_naive_chunk_edges(T, chunk_size):
    # K != V, neither a power of two, GVA, and -1000 gate entries (extreme decay).
    q, k, v, g, beta, h0 = _inputs(2, T, 2, 4, 20, 12, dtype=torch.float64)
    g = torch.where(torch.rand_like(g) < 0.1, torch.full_like(g, -1000.0), g)
    ref, ref_ht = naive_recurrent_kda(q, k, v, g, beta, 0.3, h0, output_final_state=True)
    out, out_ht = naive_chunk_kda(q, k, v, g, beta, 0.3, h0, output_final_state=True, chunk_size=chunk_size)
    assert_rel_close("o", ref, out, 1e-10)
    assert_rel_close("ht", ref_ht, out_ht, 1e-10)


def test_naive_chunk_gradients_match_recurrent():
    q, k, v, g, beta, h0 = _inputs(1, 100, 1, 2, 16, 8, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (q, k, v, g, beta, h0)]
    do, dht = torch.randn(1, 100, 2, 8, dtype=torch.float64), torch.randn_like(h0)

    def grads(fn, **kw):
        o, ht = fn(q, k, v, g, beta, None, h0, output_final_state=True, **kw)
        return torch.autograd.grad((o * do).sum() + (ht * dht).sum(), leaves)

    for name, a, b in zip("q k v g beta h0".split(), grads(naive_recurrent_kda),
                          grads(naive_chunk_kda, chunk_size=32)):
        assert_rel_close("d" + name, a, b, 1e-10)


def _definition(q, k, v, g, beta, scale, h0):
    # The recurrence written as matrices, one head at a time: S_t = (I - b k k^T) Diag(a) S + b k v^T.
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    o = torch.zeros(B, T, HV, V, dtype=torch.float64)
    hts = torch.zeros(B, HV, K, V, dtype=torch.float64)
    for b in range(B):
        for hv in range(HV):
            hq = hv // (HV // H)
            S = h0[b, hv].double().clone()
            for t in range(T):
                kt = k[b, t, hq].double().unsqueeze(1)
                P = torch.eye(K, dtype=torch.float64) - beta[b, t, hv].double() * (kt @ kt.T)
                S = P @ torch.diag(torch.exp(g[b, t, hv].double())) @ S + beta[b, t, hv].double() * kt @ v[b, t, hv].double().unsqueeze(0)
                o[b, t, hv] = S.T @ (scale * q[b, t, hq].double())
            hts[b, hv] = S
    return o, hts


def test_recurrent_matches_matrix_definition():
    q, k, v, g, beta, h0 = _inputs(2, 9, 2, 4, 6, 5, dtype=torch.float64)
    o_def, ht_def = _definition(q, k, v, g, beta, 0.7, h0)
    o, ht = naive_recurrent_kda(q, k, v, g, beta, 0.7, h0, output_final_state=True)
    assert_rel_close("o", o_def, o, 1e-12)
    assert_rel_close("ht", ht_def, ht, 1e-12)


def test_recurrent_gva_is_repeat_interleave_not_tile():
    q, k, v, g, beta, h0 = _inputs(1, 20, 2, 6, 8, 8)
    o, ht = naive_recurrent_kda(q, k, v, g, beta, None, h0, output_final_state=True)
    o_rep, ht_rep = naive_recurrent_kda(q.repeat_interleave(3, 2), k.repeat_interleave(3, 2), v, g, beta,
                                        None, h0, output_final_state=True)
    assert torch.equal(o, o_rep) and torch.equal(ht, ht_rep)
    o_tile, _ = naive_recurrent_kda(q.repeat(1, 1, 3, 1), k.repeat(1, 1, 3, 1), v, g, beta, None, h0)
    assert (o_tile - o).abs().max() > 1e-3


def test_recurrent_defaults_and_dtypes():
    q, k, v, g, beta, h0 = _inputs(1, 10, 1, 1, 16, 8)
    o_def, _ = naive_recurrent_kda(q, k, v, g, beta)
    o_scaled, _ = naive_recurrent_kda(q, k, v, g, beta, scale=16 ** -0.5)
    assert torch.equal(o_def, o_scaled)
    o16, ht = naive_recurrent_kda(q.half(), k.half(), v.half(), g, beta.half(), output_final_state=True)
    assert o16.dtype == torch.float16 and ht.dtype == torch.float32
    o64, ht64 = naive_recurrent_kda(q.double(), k.double(), v.double(), g.double(), beta.double(),
                                    output_final_state=True)
    assert o64.dtype == torch.float64 and ht64.dtype == torch.float64
    assert naive_recurrent_kda(q, k, v, g, beta)[1] is None


def test_recurrent_state_v_first_is_transpose():
    q, k, v, g, beta, h0 = _inputs(2, 30, 1, 2, 12, 7)
    o, ht = naive_recurrent_kda(q, k, v, g, beta, None, h0, output_final_state=True)
    o_t, ht_t = naive_recurrent_kda(q, k, v, g, beta, None, h0.transpose(-1, -2).contiguous(),
                                    output_final_state=True, state_v_first=True)
    assert torch.equal(o, o_t)
    assert torch.equal(ht, ht_t.transpose(-1, -2))


@pytest.mark.parametrize("fn", [naive_recurrent_kda, naive_chunk_kda])
def test_varlen_is_per_sequence(fn):
    bounds = [0, 1, 40, 41, 100]
    q, k, v, g, beta, h0 = _inputs(1, 100, 2, 2, 16, 16, N=4)
    o, ht = fn(q, k, v, g, beta, None, h0, output_final_state=True, cu_seqlens=torch.tensor(bounds))
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        o_n, ht_n = naive_recurrent_kda(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], None,
                                        h0[n:n + 1], output_final_state=True)
        assert_rel_close(f"o[{n}]", o_n, o[:, a:b], 1e-5)
        assert_rel_close(f"ht[{n}]", ht_n, ht[n:n + 1], 1e-5)


def _softplus(x):
    return x if x > 20 else math.log1p(math.exp(x))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("a_shape", ["flat", "4d"])
def test_kda_gate_formula(bias, a_shape):
    HV, K = 3, 5
    g = torch.randn(2, 4, HV, K, dtype=torch.float64) * 10
    A = torch.randn(HV, dtype=torch.float64)
    b = torch.randn(HV * K, dtype=torch.float64) if bias else None
    A_in = A if a_shape == "flat" else A.view(1, 1, HV, 1)
    out = naive_kda_gate(g, A_in, b)
    assert out.shape == g.shape and out.dtype == torch.float64
    for idx in [(0, 0, 0, 0), (1, 3, 2, 4), (0, 2, 1, 3), (1, 1, 0, 2)]:
        x = g[idx].item() + (b.view(HV, K)[idx[2], idx[3]].item() if bias else 0.0)
        want = -math.exp(A[idx[2]].item()) * _softplus(x)
        assert out[idx].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    # threshold 20: softplus(x) == x exactly above it
    big = torch.full((1, 1, HV, K), 30.0, dtype=torch.float64)
    assert torch.equal(naive_kda_gate(big, torch.zeros(HV, dtype=torch.float64)), -big)
    assert naive_kda_gate(g.float(), A.float()).dtype == torch.float32
    assert naive_kda_gate(g.half(), A.float()).dtype == torch.float32


@pytest.mark.parametrize("with_A", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lb", [-5.0, -1.5])
def test_lowerbound_gate_formula(with_A, bias, lb):
    HV, K = 2, 3
    g = torch.randn(1, 5, HV, K, dtype=torch.float64) * 4
    A = torch.randn(HV, dtype=torch.float64) if with_A else None
    b = torch.randn(HV * K, dtype=torch.float64) if bias else None
    out = naive_kda_lowerbound_gate(g, A, b, lb)
    assert ((out < 0) & (out > lb)).all()
    for idx in [(0, 0, 0, 0), (0, 4, 1, 2), (0, 2, 1, 0)]:
        x = g[idx].item() + (b.view(HV, K)[idx[2], idx[3]].item() if bias else 0.0)
        if with_A:
            x *= math.exp(A[idx[2]].item())
        want = lb / (1 + math.exp(-x))
        assert out[idx].item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_gates_are_differentiable():
    g = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, A, b: naive_kda_gate(g, A, b), (g, A, b))
    assert torch.autograd.gradcheck(lambda g, A, b: naive_kda_lowerbound_gate(g, A, b, -5.0), (g, A, b))


def test_gate_rejects_wrong_parameter_sizes():
    g = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="A_log"):
        naive_kda_gate(g, torch.randn(4))
    with pytest.raises(ValueError, match="dt_bias"):
        naive_kda_gate(g, torch.randn(3), torch.randn(3))


def test_l2norm_formula():
    x = torch.randn(3, 7, 33, dtype=torch.float64)
    y = l2norm(x)
    want = x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    assert torch.allclose(y, want, rtol=1e-14, atol=0)
    tiny = torch.zeros(1, 4, dtype=torch.float64)
    assert torch.equal(l2norm(tiny), tiny)  # eps inside the sqrt: no NaN at 0
    xh = x.half()
    assert l2norm(xh).dtype == torch.float16
    assert torch.equal(l2norm(xh), (xh.float() * torch.rsqrt((xh.float() ** 2).sum(-1, keepdim=True) + 1e-6)).half())
    xr = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(l2norm, (xr,))

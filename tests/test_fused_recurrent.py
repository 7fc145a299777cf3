# tests/test_fused_recurrent.py: kda_ext.fused_recurrent_kda (decode), CPU and CUDA.
"""The decode kernel against a float64 re-statement of the recurrence (naive_recurrent_kda with the
gates, l2norm and beta sigmoid applied in torch), against itself (T = 1 steps chained == one call,
in place == functional, both state layouts), against chunk_kda, and its serving features (in-place
update, state slots, padding), errors and torch.compile.

Tolerances: the final state is fp32 computed from inputs that the float64 reference sees exactly,
so it is held to 1e-5 (RMS ratio) for every dtype; o is held to 1e-5 in fp32 and to FLA's 0.005
in 16-bit dtypes (o is rounded to the input dtype; one rounding is ~0.002-0.004 RMS).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import kda_ext
from conftest import DEVICES, assert_rel_close, requires_cuda
from kda_ext.reference import naive_kda_gate, naive_kda_lowerbound_gate, naive_recurrent_kda

FR = kda_ext.fused_recurrent_kda
FWD = torch.ops.kda_ext.fused_recurrent_kda_fwd.default
INPLACE = torch.ops.kda_ext.fused_recurrent_kda_inplace.default

# (gate mode, lower_bound, has A_log, has dt_bias)
GATES = {
    "pre": (None, False, False),
    "softplus": (None, True, True),
    "softplus-nobias": (None, True, False),
    "lb": (-5.0, True, True),
    "lb-noA": (-3.0, False, True),
}


def o_tol(dtype):
    return 1e-5 if dtype in (torch.float32, torch.float64) else 0.005


HT_TOL = 1e-5


def make(device, B=2, T=3, H=2, HV=4, K=32, V=32, dtype=torch.float32, gate="pre", beta_sigmoid=False,
         neg_eig=False, l2norm=False, state_v_first=False, h0=True, cu=None, seed=0):
    """Inputs and keyword arguments of one fused_recurrent_kda call (FLA's test recipe)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt)

    if cu is not None:
        B, T = 1, cu[-1]
    N = B if cu is None else len(cu) - 1
    lb, has_a, has_bias = GATES[gate]
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    q, k = rnd(B, T, H, K), rnd(B, T, H, K)
    if not l2norm:
        q, k = F.normalize(q.double(), dim=-1).to(dtype), F.normalize(k.double(), dim=-1).to(dtype)
    x = dict(q=q, k=k, v=rnd(B, T, HV, V))
    if gate == "pre":
        x["g"] = F.logsigmoid(rnd(B, T, HV, K, dt=torch.float64)).to(sdt)
    else:
        x["g"] = rnd(B, T, HV, K)
    x["beta"] = rnd(B, T, HV) if beta_sigmoid else torch.sigmoid(rnd(B, T, HV, dt=torch.float64)).to(dtype)
    kw = dict(use_qk_l2norm_in_kernel=l2norm, use_gate_in_kernel=gate != "pre",
              use_beta_sigmoid_in_kernel=beta_sigmoid, allow_neg_eigval=neg_eig, lower_bound=lb,
              state_v_first=state_v_first, output_final_state=True)
    if has_a:
        kw["A_log"] = torch.log(torch.empty(HV, dtype=torch.float64).uniform_(1, 4, generator=gen)).to(sdt)
    if has_bias:
        kw["dt_bias"] = (0.5 * rnd(HV * K, dt=torch.float64)).to(sdt)
    shape = (N, HV, V, K) if state_v_first else (N, HV, K, V)
    if h0:
        kw["initial_state"] = rnd(*shape, dt=sdt)
    if cu is not None:
        kw["cu_seqlens"] = torch.tensor(cu, dtype=torch.int64)
    to = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return {n: to(t) for n, t in x.items()}, {n: to(t) for n, t in kw.items()}


def reference(x, kw):
    """float64 (o, final_state) of the same call, every in-kernel transform done in torch."""
    q, k, v, g, beta = (x[n].double() for n in ("q", "k", "v", "g", "beta"))
    if kw.get("use_qk_l2norm_in_kernel"):
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    if kw.get("use_gate_in_kernel"):
        A_log = kw.get("A_log")
        A_log = None if A_log is None else A_log.double()
        dt_bias = kw.get("dt_bias")
        dt_bias = None if dt_bias is None else dt_bias.double()
        if kw.get("lower_bound") is not None:
            g = naive_kda_lowerbound_gate(g, A_log, dt_bias, kw["lower_bound"])
        else:
            g = naive_kda_gate(g, A_log, dt_bias)
    if kw.get("use_beta_sigmoid_in_kernel"):
        beta = (2.0 if kw.get("allow_neg_eigval") else 1.0) * torch.sigmoid(beta)
    h0 = kw.get("initial_state")
    cu = kw.get("cu_seqlens")
    o, ht = naive_recurrent_kda(q, k, v, g, beta, scale=kw.get("scale"),
                                initial_state=None if h0 is None else h0.double(),
                                output_final_state=True, state_v_first=kw.get("state_v_first", False),
                                cu_seqlens=None if cu is None else cu.cpu())
    return o, ht


def check(out, ref, dtype):
    o, ht = out
    ro, rht = ref
    assert o.dtype == dtype and ht.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_rel_close("o", ro, o, o_tol(dtype))
    assert_rel_close("ht", rht, ht, HT_TOL)


# ---------------------------------------------------------------------------------------------
# Against the definition
# ---------------------------------------------------------------------------------------------

CASES = [
    # id, make() overrides
    ("decode-B4-fp32", dict(B=4, T=1)),
    ("decode-B4-bf16", dict(B=4, T=1, dtype=torch.bfloat16)),
    ("decode-fp16-vfirst", dict(B=3, T=1, dtype=torch.float16, state_v_first=True)),
    ("T7-gva", dict(T=7, H=1, HV=4)),
    ("T5-noh0", dict(T=5, h0=False)),
    ("kimi-bf16", dict(T=4, dtype=torch.bfloat16, gate="lb", beta_sigmoid=True, l2norm=True,
                       state_v_first=True)),
    ("softplus-negeig", dict(T=4, gate="softplus", beta_sigmoid=True, neg_eig=True)),
    ("softplus-nobias-l2", dict(T=3, gate="softplus-nobias", l2norm=True)),
    ("lb-noA-vfirst", dict(T=3, gate="lb-noA", state_v_first=True)),
    ("K128-V128-bf16", dict(B=2, T=2, H=2, HV=2, K=128, V=128, dtype=torch.bfloat16)),
    ("K128-V128-vfirst", dict(B=2, T=2, H=2, HV=2, K=128, V=128, state_v_first=True, gate="lb",
                              l2norm=True, beta_sigmoid=True)),
    # [K, V] at K = V = 128 runs the CUDA column-per-thread kernel: every gate, GVA, varlen with
    # length-1 and empty sequences, no initial state, each input dtype
    ("K128-kv-kimi-gva-varlen", dict(H=1, HV=2, K=128, V=128, cu=[0, 1, 4, 5, 5, 9], gate="lb",
                                     l2norm=True, beta_sigmoid=True, dtype=torch.bfloat16)),
    ("K128-kv-softplus-negeig-noh0-fp16", dict(B=2, T=3, HV=2, K=128, V=128, gate="softplus",
                                               neg_eig=True, beta_sigmoid=True, h0=False,
                                               dtype=torch.float16)),
    ("K128-kv-lbnoA-fp32", dict(B=1, T=5, H=1, HV=3, K=128, V=128, gate="lb-noA")),
    # sizes that take the 4-byte state path (K or V not a multiple of 4), partial 32-column
    # slices, and each padded key size of the CUDA kernel (64, 128, 256)
    ("K30-V18", dict(K=30, V=18, T=3)),
    ("K30-V18-vfirst", dict(K=30, V=18, T=3, state_v_first=True)),
    ("K60-V40", dict(K=60, V=40, T=2)),
    ("K100-V72-vfirst", dict(K=100, V=72, T=2, state_v_first=True, dtype=torch.bfloat16)),
    ("K200-V36", dict(K=200, V=36, T=2, HV=2, gate="softplus")),
    ("K256-V256-vfirst", dict(B=1, K=256, V=256, T=2, HV=2, state_v_first=True, l2norm=True)),
    ("K256-V256", dict(B=1, K=256, V=256, T=2, HV=2, dtype=torch.bfloat16)),
    ("K255-V33-vfirst", dict(B=1, K=255, V=33, T=2, HV=2, state_v_first=True)),
    ("varlen-len1", dict(cu=[0, 1, 4, 5, 5, 9])),
    ("varlen-all-len1-bf16", dict(cu=[0, 1, 2, 3], dtype=torch.bfloat16, gate="lb", l2norm=True,
                                  beta_sigmoid=True, state_v_first=True)),
]


@pytest.mark.parametrize("overrides", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_the_recurrence(device, overrides):
    x, kw = make(device, **overrides)
    out = FR(**x, **kw)
    check(out, reference(x, kw), x["q"].dtype)


def test_float64_on_cpu_matches_to_rounding():
    x, kw = make("cpu", T=6, dtype=torch.float64, gate="lb", l2norm=True, beta_sigmoid=True)
    o, ht = FR(**x, **kw)
    ro, rht = reference(x, kw)
    assert o.dtype == ht.dtype == torch.float64
    assert_rel_close("o", ro, o, 1e-12)
    assert_rel_close("ht", rht, ht, 1e-12)


def test_scale_is_used(device):
    x, kw = make(device, T=2)
    o1, _ = FR(**x, **kw)
    o2, _ = FR(**x, **dict(kw, scale=0.5))
    ro, _ = reference(x, dict(kw, scale=0.5))
    assert_rel_close("o", ro, o2, 1e-5)
    assert_rel_close("o default scale", reference(x, kw)[0], o1, 1e-5)


# ---------------------------------------------------------------------------------------------
# Against itself and chunk_kda
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [32, 128])
@pytest.mark.parametrize("state_v_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_of_one_token_chained_equal_one_call(device, state_v_first, dtype, dim):
    x, kw = make(device, T=6, dtype=dtype, gate="lb", l2norm=True, beta_sigmoid=True,
                 state_v_first=state_v_first, K=dim, V=dim)
    o_all, ht_all = FR(**x, **kw)
    state = kw["initial_state"]
    outs = []
    for t in range(6):
        step = {n: x[n][:, t:t + 1] for n in x}
        o, state = FR(**step, **dict(kw, initial_state=state))
        outs.append(o)
    # Same per-token arithmetic; the state passes through memory in fp32 between calls. Held near
    # bitwise (a 16-bit output may round to the neighbouring value if the compiler contracts a
    # multiply-add differently in the loop; a wrong chaining moves o by O(1)).
    assert_rel_close("o", o_all, torch.cat(outs, dim=1), 1e-6 if dtype == torch.float32 else 1e-3)
    torch.testing.assert_close(state, ht_all, rtol=1e-6, atol=1e-6)


def test_state_layouts_agree(device):
    x, kw = make(device, T=4, gate="softplus", l2norm=True)
    o_kv, ht_kv = FR(**x, **kw)
    kw_vk = dict(kw, state_v_first=True, initial_state=kw["initial_state"].transpose(-1, -2).contiguous())
    o_vk, ht_vk = FR(**x, **kw_vk)
    assert_rel_close("o", o_kv, o_vk, 1e-6)
    assert_rel_close("ht", ht_kv, ht_vk.transpose(-1, -2), 1e-6)


CHUNK_CASES = [
    ("fp32", dict(T=70)),
    ("bf16-kimi-vfirst", dict(T=70, dtype=torch.bfloat16, gate="lb", l2norm=True, beta_sigmoid=True,
                              state_v_first=True)),
    ("fp32-softplus-gva-negeig", dict(T=40, H=1, HV=4, gate="softplus", beta_sigmoid=True, neg_eig=True)),
    ("varlen", dict(cu=[0, 1, 30, 31, 90], gate="lb-noA")),
]


@pytest.mark.parametrize("overrides", [c[1] for c in CHUNK_CASES], ids=[c[0] for c in CHUNK_CASES])
def test_matches_chunk_kda(device, overrides):
    x, kw = make(device, K=64, V=64, **overrides)
    o, ht = FR(**x, **kw)
    ckw = {n: t for n, t in kw.items() if n not in ("A_log", "dt_bias")}
    co, cht = kda_ext.chunk_kda(**x, **ckw, A_log=kw.get("A_log"), dt_bias=kw.get("dt_bias"))
    assert_rel_close("o vs chunk_kda", co, o, 0.005)
    assert_rel_close("ht vs chunk_kda", cht, ht, 0.005)


def test_zero_length_batch_returns_the_initial_state(device):
    x, kw = make(device, T=0)
    o, ht = FR(**x, **kw)
    assert o.shape == x["v"].shape
    torch.testing.assert_close(ht, kw["initial_state"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Serving: in place, state slots, padding; nothing else modified
# ---------------------------------------------------------------------------------------------


def test_inputs_are_not_modified(device):
    x, kw = make(device, T=3, gate="lb", beta_sigmoid=True, l2norm=True)
    before = {n: t.clone() for n, t in {**x, **kw}.items() if isinstance(t, torch.Tensor)}
    FR(**x, **kw)
    FR(**x, **dict(kw, ssm_state_indices=torch.tensor([1, 0], device=device)))
    for n, t in {**x, **kw}.items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, before[n]), f"{n} was modified"


@pytest.mark.parametrize("dim", [32, 128])
@pytest.mark.parametrize("state_v_first", [False, True])
def test_in_place_update_equals_the_functional_call(device, state_v_first, dim):
    x, kw = make(device, T=2, gate="lb", l2norm=True, beta_sigmoid=True, state_v_first=state_v_first,
                 K=dim, V=dim)
    o_ref, ht_ref = FR(**x, **kw)
    state = kw["initial_state"].clone()
    o, ht = FR(**x, **dict(kw, initial_state=state, inplace_final_state=True))
    assert ht is state  # FLA returns the updated state tensor itself
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(state, ht_ref, rtol=0, atol=0)


def pool_case(device, dtype=torch.float32, state_v_first=False, P=7, strided=False, misaligned=False,
              dim=32):
    """Three sequences of one token each reading slots 5, 0, 3 of a pool of P slots; K = V = dim
    (128 in the [K, V] layout: the CUDA column-per-thread kernel)."""
    x, kw = make(device, B=3, T=1, dtype=dtype, gate="lb", l2norm=True, beta_sigmoid=True,
                 state_v_first=state_v_first, h0=False, K=dim, V=dim)
    shape = (dim, dim)
    HV = x["v"].shape[2]
    if strided:  # a view into a larger cache: slots 2 * HV * K * V apart
        pool = torch.randn(P, 2, HV, *shape, device=device)[:, 0]
    elif misaligned:  # 4 bytes off a 16-byte boundary: the CUDA kernel's 4-byte path
        flat = torch.randn(P * HV * dim * dim + 1, device=device)
        pool = flat[1:].view(P, HV, *shape)
    else:
        pool = torch.randn(P, HV, *shape, device=device)
    idx = torch.tensor([5, 0, 3], device=device)
    return x, kw, pool, idx


@pytest.mark.parametrize("dim", [32, 128])
@pytest.mark.parametrize("layout", ["dense", "strided", "misaligned"])
@pytest.mark.parametrize("state_v_first", [False, True])
def test_state_slots_in_place_out_of_order_leave_other_slots_untouched(device, layout, state_v_first, dim):
    x, kw, pool, idx = pool_case(device, state_v_first=state_v_first, strided=layout == "strided",
                                 misaligned=layout == "misaligned", dim=dim)
    before = pool.clone()
    ref_o, ref_ht = reference(x, dict(kw, initial_state=before[idx]))
    o, ht = FR(**x, **dict(kw, initial_state=pool, ssm_state_indices=idx, inplace_final_state=True))
    assert ht is pool
    assert_rel_close("o", ref_o, o, 1e-5)
    for n, slot in enumerate(idx.tolist()):
        assert_rel_close(f"slot {slot}", ref_ht[n], pool[slot], HT_TOL)
    untouched = [s for s in range(pool.shape[0]) if s not in idx.tolist()]
    assert torch.equal(pool[untouched], before[untouched])


def test_state_slots_read_only_without_in_place(device):
    x, kw, pool, idx = pool_case(device, dtype=torch.bfloat16)
    before = pool.clone()
    o, ht = FR(**x, **dict(kw, initial_state=pool, ssm_state_indices=idx.to(torch.int32)))
    assert torch.equal(pool, before)
    assert ht.shape == (3, *pool.shape[1:])
    check((o, ht), reference(x, dict(kw, initial_state=before[idx])), torch.bfloat16)


@pytest.mark.parametrize("dim", [32, 128])
def test_negative_slot_is_padding(device, dim):
    x, kw, pool, _ = pool_case(device, dim=dim)
    idx = torch.tensor([5, -1, 3], device=device)
    before = pool.clone()
    o, _ = FR(**x, **dict(kw, initial_state=pool, ssm_state_indices=idx, inplace_final_state=True))
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert o[0].abs().sum() > 0 and o[2].abs().sum() > 0
    keep = [s for s in range(pool.shape[0]) if s not in (5, 3)]
    assert torch.equal(pool[keep], before[keep])
    # The functional form returns zeros for the padding sequence's final state.
    o2, ht2 = FR(**x, **dict(kw, initial_state=before.clone(), ssm_state_indices=idx))
    assert torch.equal(ht2[1], torch.zeros_like(ht2[1]))
    torch.testing.assert_close(o2, o, rtol=0, atol=0)


@pytest.mark.parametrize("dim", [32, 128])
def test_varlen_with_slots_in_place(device, dim):
    x, kw = make(device, cu=[0, 1, 3, 4], gate="softplus", h0=False, K=dim, V=dim)
    pool = torch.randn(5, 4, dim, dim, device=device)
    idx = torch.tensor([4, 1, 2], device=device)
    before = pool.clone()
    ref_o, ref_ht = reference(x, dict(kw, initial_state=before[idx]))
    o, _ = FR(**x, **dict(kw, initial_state=pool, ssm_state_indices=idx, inplace_final_state=True))
    assert_rel_close("o", ref_o, o, 1e-5)
    assert_rel_close("slots", ref_ht, pool[idx], HT_TOL)
    assert torch.equal(pool[[0, 3]], before[[0, 3]])


@requires_cuda
@pytest.mark.parametrize("dim", [32, 128])
def test_cuda_out_of_range_slot_gives_nan_and_leaves_the_pool_alone(dim):
    x, kw, pool, _ = pool_case("cuda", dim=dim)
    idx = torch.tensor([5, 7, 3], device="cuda")  # 7 == P: out of range, not checkable without a sync
    before = pool.clone()
    o, _ = FR(**x, **dict(kw, initial_state=pool, ssm_state_indices=idx, inplace_final_state=True))
    assert torch.isnan(o[1]).all() and torch.isfinite(o[0]).all() and torch.isfinite(o[2]).all()
    keep = [0, 1, 2, 4, 6]
    assert torch.equal(pool[keep], before[keep])


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_out_of_range_slot_raises_on_cpu():
    x, kw, pool, _ = pool_case("cpu")
    with pytest.raises(IndexError, match=r"ssm_state_indices.*7.*7 slots"):
        FR(**x, **dict(kw, initial_state=pool, ssm_state_indices=torch.tensor([5, 7, 3])))
    # The op checks it too, for direct callers.
    with pytest.raises(IndexError, match="ssm_state_indices\\[1\\] = 7 is out of range"):
        FWD(x["q"], x["k"], x["v"], x["g"], x["beta"], 1.0, pool, None, None, None,
            torch.tensor([5, 7, 3]), False, False, False, False, None, False, True)


def test_grad_requested_raises(device):
    x, kw = make(device, T=1)
    x["q"].requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"forward-only.*`q`"):
        FR(**x, **kw)
    with torch.no_grad():
        o, _ = FR(**x, **kw)  # fine without grad mode
    assert not o.requires_grad
    h0 = kw["initial_state"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="`q`, `initial_state`"):
        FR(**x, **dict(kw, initial_state=h0))


def test_backward_through_the_op_raises():
    x, kw = make("cpu", T=1)
    q = x["q"].requires_grad_(True)
    o, _ = FWD(q, x["k"], x["v"], x["g"], x["beta"], 1.0, kw["initial_state"], None, None, None, None,
               False, False, False, False, None, False, True)
    with pytest.raises(NotImplementedError, match="forward-only"):
        o.sum().backward()


BAD = [
    ("g shape", lambda x, kw: ({**x, "g": x["g"][..., :-1]}, kw), ValueError, r"`g` must be \[2, 3, 4, 32\]"),
    ("beta shape", lambda x, kw: ({**x, "beta": x["beta"][..., :1]}, kw), ValueError, "`beta` must be"),
    ("per-value beta", lambda x, kw: ({**x, "beta": x["beta"][..., None].expand(-1, -1, -1, 32)}, kw),
     NotImplementedError, "per-value beta"),
    ("k shape", lambda x, kw: ({**x, "k": x["k"][:, :, :1]}, kw), ValueError, "`k` must have the shape of `q`"),
    ("gva", lambda x, kw: ({**x, "v": x["v"][:, :, :3], "g": x["g"][:, :, :3], "beta": x["beta"][:, :, :3]},
                           dict(kw, initial_state=None)), ValueError, "multiple of the q/k heads"),
    ("qkv dtype", lambda x, kw: ({**x, "k": x["k"].half()}, kw), TypeError, "share one dtype"),
    ("state dtype", lambda x, kw: (x, dict(kw, initial_state=kw["initial_state"].bfloat16())), TypeError,
     "`initial_state` must be torch.float32"),
    ("state shape", lambda x, kw: (x, dict(kw, initial_state=kw["initial_state"][:1])), ValueError,
     r"`initial_state` must be \[N, HV, K, V\]"),
    ("state device", lambda x, kw: (x, dict(kw, initial_state=kw["initial_state"].to("meta"))), ValueError,
     "`initial_state` must be on"),
    ("indices shape", lambda x, kw: (x, dict(kw, ssm_state_indices=torch.tensor([0, 1, 2]))), ValueError,
     r"`ssm_state_indices` must be \[N\] = \[2\]"),
    ("indices 2d", lambda x, kw: (x, dict(kw, ssm_state_indices=torch.tensor([[0], [1]]))), ValueError,
     "speculative decoding are not supported"),
    ("indices dtype", lambda x, kw: (x, dict(kw, ssm_state_indices=torch.tensor([0.0, 1.0]))), TypeError,
     "int32 or int64"),
    ("indices without pool", lambda x, kw: (x, dict(kw, initial_state=None, ssm_state_indices=torch.tensor([0, 1]))),
     ValueError, "must be passed as `initial_state`"),
    ("inplace without state", lambda x, kw: (x, dict(kw, initial_state=None, inplace_final_state=True)),
     ValueError, "must then be given"),
    ("inplace non-dense", lambda x, kw: (x, dict(kw, inplace_final_state=True,
                                                 initial_state=kw["initial_state"].transpose(-1, -2))),
     ValueError, "dense in its last three dims"),
    ("spec decoding", lambda x, kw: (x, dict(kw, num_accepted_tokens=torch.tensor([1, 1]))),
     NotImplementedError, "num_accepted_tokens"),
    ("unknown kwarg", lambda x, kw: (x, dict(kw, dt_bais=1)), TypeError, "'dt_bais'"),
    ("neg eig", lambda x, kw: (x, dict(kw, allow_neg_eigval=True)), ValueError, "requires `use_beta_sigmoid"),
    ("no A_log", lambda x, kw: ({**x}, dict(kw, use_gate_in_kernel=True)), ValueError, "`A_log` must be provided"),
    ("positive lower bound", lambda x, kw: (x, dict(kw, use_gate_in_kernel=True, lower_bound=1.0)), ValueError,
     "finite value <= 0"),
    ("A_log numel", lambda x, kw: (x, dict(kw, use_gate_in_kernel=True, A_log=torch.zeros(3))), ValueError,
     "`A_log` must have HV=4 elements"),
    ("cu batch", lambda x, kw: (x, dict(kw, cu_seqlens=torch.tensor([0, 3]))), ValueError, "batch size is expected to be 1"),
    ("cu dtype", lambda x, kw: ({n: t[:1] for n, t in x.items()},
                                dict(kw, initial_state=kw["initial_state"][:1], cu_seqlens=torch.tensor([0.0, 3.0]))),
     TypeError, "`cu_seqlens` must be int32 or int64"),
    ("K too large", lambda x, kw: ({**x, "q": x["q"].new_zeros(2, 3, 2, 300), "k": x["k"].new_zeros(2, 3, 2, 300)},
                                   kw), ValueError, "K <= 256"),
    ("not a tensor", lambda x, kw: ({**x, "v": 1.0}, kw), TypeError, "`v` must be a torch.Tensor"),
]


@pytest.mark.parametrize("mutate, exc, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(mutate, exc, match):
    x, kw = make("cpu")
    x, kw = mutate(x, kw)
    with pytest.raises(exc, match=match):
        FR(**x, **kw)


@requires_cuda
def test_cuda_errors_name_the_argument():
    x, kw = make("cuda")
    with pytest.raises(ValueError, match="`initial_state` must be on cuda"):
        FR(**x, **dict(kw, initial_state=kw["initial_state"].cpu()))
    with pytest.raises(ValueError, match="`ssm_state_indices` must be on cuda"):
        FR(**x, **dict(kw, ssm_state_indices=torch.tensor([0, 1])))
    with pytest.raises(TypeError, match="float64"):
        FR(**{**x, "g": x["g"].double()}, **kw)


def test_transpose_state_layout_alias_warns():
    x, kw = make("cpu", state_v_first=False)
    kw_vk = dict(kw, initial_state=kw["initial_state"].transpose(-1, -2).contiguous())
    del kw_vk["state_v_first"]
    with pytest.warns(DeprecationWarning, match="state_v_first"):
        o, ht = FR(**x, **kw_vk, transpose_state_layout=True)
    o_ref, ht_ref = FR(**x, **kw)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(ht.transpose(-1, -2), ht_ref)


# ---------------------------------------------------------------------------------------------
# Op contract: opcheck (schema incl. the declared mutation, fakes, dynamic shapes) and compile
# ---------------------------------------------------------------------------------------------


def _op_args(device, inplace, vfirst=False, cu=None, slots=False):
    x, kw = make(device, T=2, gate="lb", l2norm=True, beta_sigmoid=True, state_v_first=vfirst, cu=cu)
    state = kw["initial_state"]
    idx = None
    if slots:
        state = torch.randn(5, *state.shape[1:], device=device)
        idx = torch.tensor([3, 0] if cu is None else [3, 0, 1], device=device)
    common = [x["q"], x["k"], x["v"], x["g"], x["beta"], 0.3, state, kw["A_log"], kw["dt_bias"],
              kw.get("cu_seqlens"), idx, True, True, True, False, -5.0, vfirst]
    return common if inplace else common + [True]


@pytest.mark.parametrize("variant", [dict(), dict(vfirst=True, slots=True), dict(cu=[0, 1, 3, 4])],
                         ids=["plain", "vfirst-slots", "varlen"])
@pytest.mark.parametrize("inplace", [False, True], ids=["fwd", "inplace"])
def test_opcheck(device, inplace, variant):
    op = INPLACE if inplace else FWD
    torch.library.opcheck(op, _op_args(device, inplace, **variant))


def test_compiled_decode_step_updates_the_pool_like_eager(device):
    torch._dynamo.reset()
    x, kw, pool, idx = pool_case(device)

    def step(x, pool, idx):
        return FR(**x, A_log=kw["A_log"], dt_bias=kw["dt_bias"], use_qk_l2norm_in_kernel=True,
                  use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, lower_bound=-5.0,
                  initial_state=pool, ssm_state_indices=idx, inplace_final_state=True)[0]

    eager_pool = pool.clone()
    o_eager = step(x, eager_pool, idx)
    o = torch.compile(step, fullgraph=True)(x, pool, idx)
    torch.testing.assert_close(o, o_eager, rtol=0, atol=0)
    torch.testing.assert_close(pool, eager_pool, rtol=0, atol=0)


def test_signature_is_flas():
    # FLA 0.6.0's public fused_recurrent_kda, in order; the FLA backend calls us with it.
    import inspect

    fla_order = ["q", "k", "v", "g", "beta", "A_log", "dt_bias", "scale", "initial_state",
                 "output_final_state", "use_qk_l2norm_in_kernel", "use_gate_in_kernel",
                 "use_beta_sigmoid_in_kernel", "allow_neg_eigval", "lower_bound", "state_v_first",
                 "cu_seqlens"]
    params = inspect.signature(FR).parameters
    positional = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == fla_order
    assert all(params[n].default is None or params[n].default is False for n in fla_order[5:])
    x, kw = make("cpu", T=2, gate="softplus")
    o_pos, ht_pos = FR(x["q"], x["k"], x["v"], x["g"], x["beta"], kw["A_log"], kw["dt_bias"], None,
                       kw["initial_state"], True, False, True)
    o_kw, ht_kw = FR(**x, **kw)
    torch.testing.assert_close(o_pos, o_kw, rtol=0, atol=0)
    torch.testing.assert_close(ht_pos, ht_kw, rtol=0, atol=0)


@requires_cuda
def test_cuda_graph_replays_a_decode_step_on_the_pool():
    x, kw, pool, idx = pool_case("cuda", dtype=torch.bfloat16, state_v_first=True)
    kw = {n: t for n, t in kw.items() if n != "output_final_state"}
    eager_pool = pool.clone()
    o_eager, _ = FR(**x, **dict(kw, initial_state=eager_pool, ssm_state_indices=idx, inplace_final_state=True))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm up off the default stream, as capture requires
        FR(**x, **dict(kw, initial_state=pool.clone(), ssm_state_indices=idx, inplace_final_state=True))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, _ = FR(**x, **dict(kw, initial_state=pool, ssm_state_indices=idx, inplace_final_state=True))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(o, o_eager, rtol=0, atol=0)
    torch.testing.assert_close(pool, eager_pool, rtol=0, atol=0)

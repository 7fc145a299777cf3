# tests/test_compile.py: opcheck of both ops, torch.compile(fullgraph=True), CUDA graphs.
import pytest
import torch
import torch.nn.functional as F

import kda_ext
from conftest import assert_rel_close, requires_cuda

FWD = torch.ops.kda_ext.chunk_kda_fwd.default
BWD = torch.ops.kda_ext.chunk_kda_bwd.default

FWD_FLAGS = ("use_qk_l2norm", "use_gate_in_kernel", "use_beta_sigmoid", "allow_neg_eigval", "safe_gate",
             "lower_bound", "state_v_first", "chunk_size", "output_final_state", "save_intermediates",
             "return_states")

# Samples for opcheck: (id, shape overrides, flags, extras)
SAMPLES = [
    ("plain", dict(), dict(), ()),
    ("h0-final", dict(), dict(output_final_state=True), ("h0",)),
    ("gate-l2-sigmoid", dict(HV=4), dict(use_qk_l2norm=True, use_gate_in_kernel=True, use_beta_sigmoid=True,
                                         allow_neg_eigval=True, output_final_state=True), ("h0", "A_log", "dt_bias")),
    ("safe-lb-vfirst-bt32", dict(V=12), dict(use_gate_in_kernel=True, safe_gate=True, lower_bound=-5.0,
                                             state_v_first=True, chunk_size=32, output_final_state=True),
     ("h0", "dt_bias")),
    ("save-intermediates", dict(), dict(save_intermediates=True, output_final_state=True), ("h0",)),
    ("varlen", dict(), dict(output_final_state=True, chunk_size=32), ("h0", "cu")),
    ("varlen-save", dict(), dict(save_intermediates=True, output_final_state=True), ("h0", "cu")),
    ("return-states", dict(), dict(return_states=True), ("cu",)),
]


def _fwd_args(device, requires_grad, shape, flags, extras):
    dims = dict(B=2, T=45, H=2, HV=2, K=16, V=16)
    dims.update(shape)
    B, T, H, HV, K, V = (dims[n] for n in "B T H HV K V".split())
    cu = None
    if "cu" in extras:
        B, cu = 1, torch.tensor([0, 1, 20, 2 * T], device=device)
        T = 2 * T
    N = B if cu is None else cu.numel() - 1
    f = dict(use_qk_l2norm=False, use_gate_in_kernel=False, use_beta_sigmoid=False, allow_neg_eigval=False,
             safe_gate=False, lower_bound=None, state_v_first=False, chunk_size=64, output_final_state=False,
             save_intermediates=False, return_states=False)
    f.update(flags)
    q = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
    v = torch.randn(B, T, HV, V, device=device)
    g = torch.randn(B, T, HV, K, device=device) if f["use_gate_in_kernel"] else \
        F.logsigmoid(torch.randn(B, T, HV, K, device=device))
    beta = torch.randn(B, T, HV, device=device)
    if not f["use_beta_sigmoid"]:
        beta = beta.sigmoid()
    st = (V, K) if f["state_v_first"] else (K, V)
    h0 = torch.randn(N, HV, *st, device=device) if "h0" in extras else None
    A_log = torch.randn(HV, device=device) if "A_log" in extras else None
    dt_bias = torch.randn(HV * K, device=device) if "dt_bias" in extras else None
    if requires_grad:
        for t in (q, k, v, g, beta, h0, A_log, dt_bias):
            if t is not None:
                t.requires_grad_(True)
    return [q, k, v, g, beta, K ** -0.5, h0, A_log, dt_bias, cu] + [f[n] for n in FWD_FLAGS]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("sample", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_opcheck_fwd(sample, requires_grad, device):
    _, shape, flags, extras = sample
    if requires_grad and flags.get("return_states"):
        pytest.skip("return_states is inference-only")
    args = _fwd_args(device, requires_grad, shape, flags, extras)
    torch.library.opcheck(FWD, args)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("sample", SAMPLES[:-1], ids=[s[0] for s in SAMPLES[:-1]])
def test_opcheck_bwd(sample, requires_grad, device):
    _, shape, flags, extras = sample
    args = _fwd_args(device, requires_grad, shape, flags, extras)
    if requires_grad:
        with torch.no_grad():
            out = FWD(*args)
    else:
        out = FWD(*args)
    (q, k, v, g, beta, scale, h0, A_log, dt_bias, cu) = args[:10]
    fl = dict(zip(FWD_FLAGS, args[10:]))
    inter = list(out[4:11]) if fl["save_intermediates"] else [None] * 7
    do = torch.randn_like(out[0])
    dht = torch.randn_like(out[1]) if fl["output_final_state"] else None
    bwd_args = [q, k, v, g, beta, scale, h0, A_log, dt_bias, cu, out[2], out[3], *inter, do, dht,
                fl["use_qk_l2norm"], fl["use_gate_in_kernel"], fl["use_beta_sigmoid"], fl["allow_neg_eigval"],
                fl["safe_gate"], fl["lower_bound"], fl["state_v_first"], fl["chunk_size"]]
    # The backward op has no derivative of its own (no double backward): with requires_grad the
    # end-to-end aot_dispatch check would differentiate it, so it runs without grad only.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if requires_grad else \
        ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(BWD, bwd_args, test_utils=utils)


def test_double_backward_raises(device):
    args = _fwd_args(device, True, {}, dict(output_final_state=True), ("h0",))
    o, ht = FWD(*args)[:2]
    q = args[0]
    (dq,) = torch.autograd.grad(o.sum() + ht.sum(), [q], create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        dq.sum().backward()


def _forward_loss(q, k, v, g, beta, h0, A_log, dt_bias, do, dht):
    o, ht = kda_ext.chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                              use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                              A_log=A_log, dt_bias=dt_bias, chunk_size=32)
    return (o * do).sum() + (ht * dht).sum(), o, ht


def _step(fn):
    # A training step: the (compiled) forward and loss, then the backward AOTAutograd compiled with it.
    def step(*args):
        loss, o, ht = fn(*args)
        loss.backward()
        return o.detach(), ht.detach()
    return step


_train_step = _step(_forward_loss)


def _train_inputs(device, B=2, T=70, H=1, HV=2, K=16, V=16):
    leaves = dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, HV, V),
                  g=torch.randn(B, T, HV, K), beta=torch.randn(B, T, HV), h0=torch.randn(B, HV, K, V),
                  A_log=torch.randn(HV), dt_bias=torch.randn(HV * K))
    leaves = {n: t.to(device).requires_grad_(True) for n, t in leaves.items()}
    return leaves, torch.randn(B, T, HV, V, device=device), torch.randn(B, HV, K, V, device=device)


def _grads_after(fn, leaves, do, dht):
    for t in leaves.values():
        t.grad = None
    o, ht = fn(*leaves.values(), do, dht)
    return {"o": o, "ht": ht, **{"d" + n: t.grad.clone() for n, t in leaves.items()}}


def test_compile_fullgraph_training_step(device):
    torch._dynamo.reset()
    leaves, do, dht = _train_inputs(device)
    eager = _grads_after(_train_step, leaves, do, dht)
    compiled = _grads_after(_step(torch.compile(_forward_loss, fullgraph=True)), leaves, do, dht)
    for n in eager:
        assert_rel_close(n, eager[n], compiled[n], 1e-6)


def test_compile_fullgraph_varlen(device):
    torch._dynamo.reset()
    cu = torch.tensor([0, 3, 40, 70], device=device)

    def step(q, k, v, g, beta, h0):
        o, ht = kda_ext.chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                  use_qk_l2norm_in_kernel=True)
        return o, ht

    leaves, _, _ = _train_inputs(device, B=1)
    args = [leaves[n].detach() for n in ("q", "k", "v", "beta")]
    q, k, v, beta = args
    g = F.logsigmoid(leaves["g"].detach())
    h0 = torch.randn(3, 2, 16, 16, device=device)
    eo, eht = step(q, k, v, g, beta.sigmoid(), h0)
    co, cht = torch.compile(step, fullgraph=True)(q, k, v, g, beta.sigmoid(), h0)
    assert_rel_close("o", eo, co, 1e-6)
    assert_rel_close("ht", eht, cht, 1e-6)


def test_compile_dynamic_shapes(device):
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v, g, b: kda_ext.chunk_kda(q, k, v, g, b)[0], fullgraph=True, dynamic=True)
    for T in (33, 70):
        q = F.normalize(torch.randn(1, T, 1, 16, device=device), dim=-1)
        v = torch.randn(1, T, 1, 16, device=device)
        g = F.logsigmoid(torch.randn(1, T, 1, 16, device=device))
        b = torch.rand(1, T, 1, device=device)
        assert_rel_close(f"o(T={T})", kda_ext.chunk_kda(q, q, v, g, b)[0], fn(q, q, v, g, b), 1e-6)


@requires_cuda
def test_compile_reduce_overhead_cuda():
    # CUDA graphs catch launches on the wrong stream (extension-cpp's regression test).
    torch._dynamo.reset()
    leaves, do, dht = _train_inputs("cuda")
    fn = _step(torch.compile(_forward_loss, mode="reduce-overhead", fullgraph=True))
    eager = _grads_after(_train_step, leaves, do, dht)
    for _ in range(3):
        compiled = _grads_after(fn, leaves, do, dht)
    for n in eager:
        assert_rel_close(n, eager[n], compiled[n], 1e-5)


@requires_cuda
def test_cuda_graph_varlen_forward():
    T, H, K = 200, 2, 64
    cu = torch.tensor([0, 1, 64, 130, T], device="cuda")
    q = F.normalize(torch.randn(1, T, H, K, device="cuda", dtype=torch.bfloat16), dim=-1)
    k = F.normalize(torch.randn(1, T, H, K, device="cuda", dtype=torch.bfloat16), dim=-1)
    v = torch.randn(1, T, H, K, device="cuda", dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(1, T, H, K, device="cuda"))
    beta = torch.rand(1, T, H, device="cuda", dtype=torch.bfloat16)
    h0 = torch.randn(4, H, K, K, device="cuda")

    def fwd():
        return kda_ext.chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fwd()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_g, ht_g = fwd()
    # New inputs in the captured buffers, then replay.
    for t in (q, k, v):
        t.copy_(F.normalize(torch.randn_like(t, dtype=torch.float32), dim=-1).to(t.dtype))
    g.copy_(F.logsigmoid(torch.randn_like(g)))
    graph.replay()
    torch.cuda.synchronize()
    o, ht = fwd()
    assert torch.equal(o, o_g) and torch.equal(ht, ht_g)
    o_ref, ht_ref = kda_ext.naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                cu_seqlens=cu.cpu())
    assert_rel_close("o", o_ref, o_g, 0.005)
    assert_rel_close("ht", ht_ref, ht_g, 0.005)

# tests/test_nn.py: kda_ext.nn.KimiDeltaAttention against a re-statement of its maths, decoding,
# masks/packing, state-dict compatibility with FLA's layer, gradients, torch.compile(fullgraph).
import math

import pytest
import torch
import torch.nn.functional as F

import kda_ext
from kda_ext.nn import KDACache, KimiDeltaAttention
from kda_ext.reference import naive_recurrent_kda

try:
    import fla.layers.kda as fla_layers_kda
    FLA_ERROR = None
except Exception as error:  # ImportError, or an FLA that fails to import here
    fla_layers_kda, FLA_ERROR = None, f"{type(error).__name__}: {error}"
requires_fla = pytest.mark.skipif(
    fla_layers_kda is None,
    reason=f"flash-linear-attention's layers not importable ({FLA_ERROR}); pip install "
           "flash-linear-attention triton")

SMALL = dict(hidden_size=48, head_dim=8, num_heads=3)
CONFIGS = {
    "default": dict(),
    "no-conv": dict(use_short_conv=False),
    "gva-expand-v": dict(num_v_heads=6, expand_v=2),
    "neg-eigval-conv-bias": dict(allow_neg_eigval=True, conv_bias=True, conv_size=3),
    "safe-gate-lower-bound": dict(safe_gate=True, lower_bound=-5.0),
}

# FLA 0.6.0's KimiDeltaAttention(hidden_size=48, head_dim=8, num_heads=3): keys, in order, and shapes.
FLA_KEYS_SMALL = [
    ("A_log", (3,)), ("dt_bias", (24,)), ("q_proj.weight", (24, 48)), ("k_proj.weight", (24, 48)),
    ("v_proj.weight", (24, 48)), ("q_conv1d.weight", (24, 1, 4)), ("k_conv1d.weight", (24, 1, 4)),
    ("v_conv1d.weight", (24, 1, 4)), ("f_proj.0.weight", (8, 48)), ("f_proj.1.weight", (24, 8)),
    ("b_proj.weight", (3, 48)), ("g_proj.0.weight", (8, 48)), ("g_proj.1.weight", (24, 8)),
    ("g_proj.1.bias", (24,)), ("o_norm.weight", (8,)), ("o_proj.weight", (48, 24)),
]


def make_layer(dtype=torch.float64, layer_idx=0, **config):
    layer = KimiDeltaAttention(**SMALL, layer_idx=layer_idx, **config).to(dtype)
    with torch.no_grad():
        # Parameters FLA initialises to constants get random values, so that using them wrongly
        # (or not at all) changes the output.
        layer.o_norm.weight.uniform_(0.5, 1.5)
        layer.g_proj[1].bias.normal_()
        if layer.use_short_conv and layer.conv_bias:
            for conv in (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d):
                conv.bias.normal_()
        layer.A_log.normal_(0.0, 0.5)
    return layer


# --- the layer's maths, re-stated with loops -------------------------------------------------------

def restated_conv(x, weight, bias, history):
    """Causal depthwise conv + SiLU, tap by tap. x [B, T, D]; weight [D, 1, W]; history [B, D, W-1]."""
    B, T, D = x.shape
    W = weight.shape[-1]
    past = history.transpose(1, 2) if history is not None else x.new_zeros(B, W - 1, D)
    padded = torch.cat([past, x], dim=1)  # [B, W-1+T, D]
    out = x.new_zeros(B, T, D)
    for t in range(T):
        for j in range(W):
            out[:, t] += weight[:, 0, j] * padded[:, t + j]
        if bias is not None:
            out[:, t] += bias
    return F.silu(out), padded[:, -W:].transpose(1, 2)


def restated_layer(layer, x, state=None, conv=None):
    """Output, final recurrent state [B, HV, V, K] and conv windows for x [B, T, hidden]."""
    B, T, _ = x.shape
    H, HV, K, V = layer.num_heads, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim
    q, k, v = x @ layer.q_proj.weight.T, x @ layer.k_proj.weight.T, x @ layer.v_proj.weight.T
    windows = None
    if layer.use_short_conv:
        histories = [None] * 3 if conv is None else [c[..., 1:] for c in conv]
        convs = (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d)
        results = [restated_conv(t, c.weight, c.bias, h) for t, c, h in zip((q, k, v), convs, histories)]
        (q, wq), (k, wk), (v, wv) = results
        windows = (wq, wk, wv)
    else:
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
    q, k = q.view(B, T, H, K), k.view(B, T, H, K)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    v = v.view(B, T, HV, V)
    raw = ((x @ layer.f_proj[0].weight.T) @ layer.f_proj[1].weight.T).view(B, T, HV, K)
    raw = raw + layer.dt_bias.view(HV, K)
    a = layer.A_log.view(HV, 1)
    if layer.lower_bound is None:
        g = -torch.exp(a) * torch.log1p(torch.exp(raw))
    else:
        g = layer.lower_bound * torch.sigmoid(torch.exp(a) * raw)
    beta = torch.sigmoid(x @ layer.b_proj.weight.T) * (2.0 if layer.allow_neg_eigval else 1.0)
    o, final = naive_recurrent_kda(q, k, v, g, beta, initial_state=state, output_final_state=True,
                                   state_v_first=True)
    gate = ((x @ layer.g_proj[0].weight.T) @ layer.g_proj[1].weight.T + layer.g_proj[1].bias).view(B, T, HV, V)
    normed = o * torch.rsqrt((o * o).mean(-1, keepdim=True) + layer.o_norm.eps)
    o = (normed * layer.o_norm.weight * torch.sigmoid(gate)).reshape(B, T, HV * V)
    return o @ layer.o_proj.weight.T, final, windows


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kernel", ["chunk", "fused_recurrent"])
def test_layer_matches_restated_maths(name, kernel):
    layer = make_layer(**CONFIGS[name])
    x = torch.randn(2, 37, SMALL["hidden_size"], dtype=torch.float64)
    if kernel == "chunk":
        out, _, _ = layer.train()(x)
    else:
        with torch.no_grad():
            out, _, _ = layer.eval()(x)  # 37 <= 64 new tokens in eval: the decode kernel
    with torch.no_grad():
        expected, _, _ = restated_layer(layer, x)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["default", "gva-expand-v", "neg-eigval-conv-bias"])
@pytest.mark.parametrize("prefill", [2, 70])
def test_prefill_then_decode_equals_one_forward(name, prefill):
    # prefill=2 is shorter than the conv window (the cache keeps zeros and the new tokens);
    # prefill=70 runs the chunk kernel (> 64 tokens), the decode steps the recurrent one.
    layer = make_layer(**CONFIGS[name]).eval()
    x = torch.randn(2, prefill + 5, SMALL["hidden_size"], dtype=torch.float64)
    with torch.no_grad():
        whole, _, _ = layer(x)
        cache = KDACache()
        parts = [layer(x[:, :prefill], past_key_values=cache, use_cache=True)[0]]
        for t in range(prefill, prefill + 5):
            parts.append(layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0])
        expected, final, windows = restated_layer(layer, x)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(whole, expected, rtol=1e-9, atol=1e-11)
    assert cache.get_seq_length() == prefill + 5
    state = cache[0]
    assert state["recurrent_state"].shape == (2, layer.num_v_heads, layer.head_v_dim, layer.head_k_dim)
    torch.testing.assert_close(state["recurrent_state"], final, rtol=1e-9, atol=1e-11)
    for got, want in zip(state["conv_state"], windows):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_decode_continues_from_a_given_state():
    layer = make_layer().eval()
    x = torch.randn(2, 6, SMALL["hidden_size"], dtype=torch.float64)
    with torch.no_grad():
        _, state, windows = restated_layer(layer, torch.randn(2, 9, SMALL["hidden_size"], dtype=torch.float64))
        cache = KDACache()
        cache.update(recurrent_state=state, conv_state=windows, layer_idx=0, offset=9)
        out, _, _ = layer(x, past_key_values=cache, use_cache=True)
        expected, final, _ = restated_layer(layer, x, state=state, conv=windows)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(cache[0]["recurrent_state"], final, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kernel", ["chunk", "fused_recurrent"])
def test_padding_mask_and_packed_sequences_equal_separate_runs(kernel):
    layer = make_layer(num_v_heads=6)
    lengths = [11, 4, 7]
    seqs = [torch.randn(1, n, SMALL["hidden_size"], dtype=torch.float64) for n in lengths]
    T = max(lengths)
    padded = torch.zeros(len(lengths), T, SMALL["hidden_size"], dtype=torch.float64)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, s in enumerate(seqs):  # left padding, as in batched generation
        padded[i, T - lengths[i]:] = s[0]
        mask[i, T - lengths[i]:] = 1
    packed = torch.cat(seqs, dim=1)
    cu_seqlens = torch.tensor([0, 11, 15, 22])
    grad = torch.enable_grad() if kernel == "chunk" else torch.no_grad()
    layer.train(kernel == "chunk")
    with grad:
        alone = [layer(s)[0] for s in seqs]
        masked, _, _ = layer(padded, attention_mask=mask)
        packed_out, _, _ = layer(packed, cu_seqlens=cu_seqlens)
    for i, out in enumerate(alone):
        torch.testing.assert_close(masked[i, T - lengths[i]:], out[0], rtol=1e-9, atol=1e-11)
        assert torch.count_nonzero(masked[i, :T - lengths[i]]) == 0
    torch.testing.assert_close(packed_out, torch.cat(alone, dim=1), rtol=1e-9, atol=1e-11)


def test_packed_decode_with_cache_equals_separate_decodes():
    # Two packed decode steps: the second reads the conv windows the first wrote, for sequences
    # of one token each (shorter than the window, so the windows shift the cached inputs).
    layer = make_layer().eval()
    lengths = [5, 2, 9]
    seqs = [torch.randn(1, n + 2, SMALL["hidden_size"], dtype=torch.float64) for n in lengths]
    with torch.no_grad():
        separate = []
        for n, s in zip(lengths, seqs):
            cache = KDACache()
            layer(s[:, :n], past_key_values=cache, use_cache=True)
            separate.append(torch.cat([layer(s[:, t:t + 1], past_key_values=cache, use_cache=True)[0]
                                       for t in (n, n + 1)], dim=1))
        cache = KDACache()
        cu = torch.tensor([0, 5, 7, 16])
        layer(torch.cat([s[:, :-2] for s in seqs], 1), past_key_values=cache, use_cache=True, cu_seqlens=cu)
        steps = [layer(torch.cat([s[:, n + t:n + t + 1] for n, s in zip(lengths, seqs)], 1),
                       past_key_values=cache, use_cache=True, cu_seqlens=torch.arange(4))[0] for t in (0, 1)]
    for i in range(len(seqs)):
        torch.testing.assert_close(torch.cat([steps[0][:, i:i + 1], steps[1][:, i:i + 1]], dim=1), separate[i],
                                   rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_reach_every_parameter(name):
    layer = make_layer(dtype=torch.float32, **CONFIGS[name]).train()
    x = torch.randn(2, 70, SMALL["hidden_size"])
    out, _, _ = layer(x)
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None, f"{pname}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname}: zero gradient"


def test_gradients_match_the_restated_maths():
    layer = make_layer(num_v_heads=6)
    x = torch.randn(2, 20, SMALL["hidden_size"], dtype=torch.float64)
    out, _, _ = layer.train()(x)
    grads = torch.autograd.grad(out.pow(2).sum(), list(layer.parameters()))
    expected = restated_layer(layer, x)[0]
    want = torch.autograd.grad(expected.pow(2).sum(), list(layer.parameters()))
    for (pname, _), got, ref in zip(layer.named_parameters(), grads, want):
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10, msg=lambda m, n=pname: f"{n}: {m}")


def test_state_dict_layout_is_flas():
    layer = KimiDeltaAttention(**SMALL)
    assert [(k, tuple(v.shape)) for k, v in layer.state_dict().items()] == FLA_KEYS_SMALL
    assert layer.A_log.dtype == layer.dt_bias.dtype == torch.float32
    assert layer.A_log._no_weight_decay and layer.dt_bias._no_weight_decay
    # FLA's init: A = exp(A_log) in [1, 16]; softplus(dt_bias) in [1e-3, 1e-1]; o_norm weight 1.
    assert (layer.A_log.exp() >= 1 - 1e-6).all() and (layer.A_log.exp() <= 16 + 1e-5).all()
    dt = F.softplus(layer.dt_bias)
    assert (dt >= 1e-3 * (1 - 1e-4)).all() and (dt <= 0.1 * (1 + 1e-4)).all()
    assert torch.equal(layer.o_norm.weight, torch.ones(SMALL["head_dim"]))
    assert torch.equal(KimiDeltaAttention(**SMALL, safe_gate=True, lower_bound=-5.0).A_log, torch.zeros(3))


@requires_fla
@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_and_init_equal_flas_layer(name):
    config = dict(SMALL, **CONFIGS[name])
    torch.manual_seed(7)
    theirs = fla_layers_kda.KimiDeltaAttention(**config)
    torch.manual_seed(7)
    ours = KimiDeltaAttention(**config)
    theirs_sd, ours_sd = theirs.state_dict(), ours.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    for key in theirs_sd:
        assert ours_sd[key].shape == theirs_sd[key].shape, key
        assert torch.equal(ours_sd[key], theirs_sd[key]), f"{key}: initialised differently"
    for attribute in ("head_k_dim", "head_v_dim", "key_dim", "value_dim", "gate_dim", "num_v_heads",
                      "mode", "lower_bound", "safe_gate", "allow_neg_eigval", "use_short_conv"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    # A checkpoint loads strictly both ways.
    torch.manual_seed(8)
    other = fla_layers_kda.KimiDeltaAttention(**config)
    ours.load_state_dict(other.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), other.state_dict().values()))
    theirs.load_state_dict(ours.state_dict(), strict=True)


@requires_fla
def test_works_with_flas_cache_object():
    from fla.models.utils import Cache
    layer = make_layer().eval()
    x = torch.randn(2, 8, SMALL["hidden_size"], dtype=torch.float64)
    with torch.no_grad():
        ours, theirs = KDACache(), Cache()
        for cache in (ours, theirs):
            layer(x[:, :5], past_key_values=cache, use_cache=True)
        a = layer(x[:, 5:], past_key_values=ours, use_cache=True)[0]
        b = layer(x[:, 5:], past_key_values=theirs, use_cache=True)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ours[0]["recurrent_state"], theirs[0]["recurrent_state"], rtol=0, atol=0)


def test_compiles_whole_without_graph_break():
    layer = make_layer(dtype=torch.float32, num_v_heads=6).train()
    x = torch.randn(2, 40, SMALL["hidden_size"])
    eager_out = layer(x)[0]
    eager_grads = torch.autograd.grad(eager_out.pow(2).sum(), list(layer.parameters()))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)[0]
    grads = torch.autograd.grad(out.pow(2).sum(), list(layer.parameters()))
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compiled_decode_with_cache_equals_eager():
    layer = make_layer(dtype=torch.float32).eval()
    x = torch.randn(2, 12, SMALL["hidden_size"])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager_cache, compiled_cache = KDACache(), KDACache()
        layer(x[:, :10], past_key_values=eager_cache, use_cache=True)
        compiled(x[:, :10], past_key_values=compiled_cache, use_cache=True)
        for t in (10, 11):
            want = layer(x[:, t:t + 1], past_key_values=eager_cache, use_cache=True)[0]
            got = compiled(x[:, t:t + 1], past_key_values=compiled_cache, use_cache=True)[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_cache[0]["recurrent_state"], eager_cache[0]["recurrent_state"],
                               rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`mode` must be 'chunk' or 'fused_recurrent', got 'fast'"):
        KimiDeltaAttention(**SMALL, mode="fast")
    with pytest.raises(ValueError, match="`num_v_heads` must be a multiple of `num_heads`=3, got 4"):
        KimiDeltaAttention(**SMALL, num_v_heads=4)
    layer = KimiDeltaAttention(**SMALL)
    with pytest.raises(ValueError, match="requires `layer_idx`"):
        layer(torch.randn(1, 3, SMALL["hidden_size"]), past_key_values=KDACache())
    with pytest.raises(ValueError, match=r"`attention_mask` must be a \[batch_size, seq_len\]"):
        layer(torch.randn(1, 3, SMALL["hidden_size"]), attention_mask=torch.ones(1, 3, 3))


def test_decode_kernel_refuses_gradients():
    q = torch.randn(1, 1, 2, 8, requires_grad=True)
    k, v, g, beta = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), -torch.rand(1, 1, 2, 8), torch.rand(1, 1, 2)
    with pytest.raises(RuntimeError, match="forward-only.*`q` require"):
        kda_ext.fused_recurrent_kda(q, k, v, g, beta)
    with torch.no_grad():
        o, _ = kda_ext.fused_recurrent_kda(q, k, v, g, beta)
    assert math.isfinite(o.abs().sum().item())


@pytest.mark.parametrize("training, grad, T, mode, expected", [
    (True, True, 10, "chunk", "chunk"),
    (False, True, 10, "chunk", "chunk"),             # autograd on: always chunk
    (False, False, 64, "chunk", "fused_recurrent"),  # eval, <= 64 new tokens: decode kernel
    (False, False, 65, "chunk", "chunk"),
    (False, False, 65, "fused_recurrent", "fused_recurrent"),
])
def test_kernel_choice_follows_flas_rule(monkeypatch, training, grad, T, mode, expected):
    called = []
    for name in ("chunk_kda", "fused_recurrent_kda"):
        original = getattr(kda_ext, name)
        monkeypatch.setattr(kda_ext, name,
                            lambda *a, _f=original, _n=name, **kw: called.append(_n) or _f(*a, **kw))
    layer = KimiDeltaAttention(**SMALL, mode=mode).train(training)
    with torch.set_grad_enabled(grad):
        layer(torch.randn(1, T, SMALL["hidden_size"]))
    assert called == [expected.replace("chunk", "chunk_kda").replace("fused_recurrent", "fused_recurrent_kda")]

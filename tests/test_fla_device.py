# tests/test_fla_device.py (GPU + FLA): FLA's KimiDeltaAttention with and without kda_ext's backend,
# and kda_ext.nn.KimiDeltaAttention with FLA's state dict, forward, backward and decoding.
import os
import sys
import types

import pytest
import torch

import kda_ext
import kda_ext.fla as kfla
from conftest import assert_rel_close, requires_cuda
from kda_ext.nn import KDACache, KimiDeltaAttention


def _import_fla_layer():
    try:
        from fla.layers.kda import KimiDeltaAttention as FLALayer
        return FLALayer, None
    except ImportError as error:
        if "transformers" not in str(error):
            return None, f"{type(error).__name__}: {error}"
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"
    # fla/layers/__init__.py imports every layer, some of which need transformers; the KDA layer
    # does not. Without transformers (an offline GPU machine with only FLA's wheels), load the
    # package's modules without running its __init__.
    import fla
    package = types.ModuleType("fla.layers")
    package.__path__ = [os.path.join(os.path.dirname(fla.__file__), "layers")]
    sys.modules["fla.layers"] = package
    from fla.layers.kda import KimiDeltaAttention as FLALayer
    return FLALayer, None


try:
    FLALayer, FLA_ERROR = _import_fla_layer()
except Exception as error:
    FLALayer, FLA_ERROR = None, f"{type(error).__name__}: {error}"
requires_fla_layer = pytest.mark.skipif(
    FLALayer is None, reason=f"FLA's KimiDeltaAttention not importable ({FLA_ERROR})")
pytestmark = [requires_cuda, requires_fla_layer]

CONFIGS = {
    "kimi": dict(safe_gate=True, lower_bound=-5.0),
    "softplus": dict(),
    "gva-neg-eigval": dict(num_v_heads=16, allow_neg_eigval=True),
}
SIZES = dict(hidden_size=1024, head_dim=128, num_heads=8)
# The suite's bars (conftest): outputs 5e-3; input gradients 8e-3; gate-like parameters 2e-2.
OUTPUT_RATIO, INPUT_GRAD_RATIO, PARAM_GRAD_RATIO = 5e-3, 8e-3, 2e-2


@pytest.fixture(autouse=True)
def _unregistered():
    kfla.unregister()
    yield
    kfla.unregister()


@pytest.fixture
def count_kda_ext_calls(monkeypatch):
    counts = {"chunk_kda": 0, "fused_recurrent_kda": 0}
    for module, name in ((kda_ext.chunk, "chunk_kda"), (kda_ext, "fused_recurrent_kda")):
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return counts


def _fla_layer(config, seed=0):
    torch.manual_seed(seed)
    return FLALayer(**SIZES, **config, layer_idx=0).cuda().to(torch.bfloat16)


def _forward_backward(layer, x, do, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    o = layer(x, **kwargs)[0]
    (o * do).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    return o.detach(), x.grad, grads


def _compare(label, ref, out):
    o_ref, dx_ref, grads_ref = ref
    o, dx, grads = out
    assert_rel_close(f"{label} o", o_ref, o, OUTPUT_RATIO)
    assert_rel_close(f"{label} dx", dx_ref, dx, INPUT_GRAD_RATIO)
    for name in grads_ref:
        assert_rel_close(f"{label} d{name}", grads_ref[name], grads[name], PARAM_GRAD_RATIO)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padding-mask"])
def test_fla_layer_with_and_without_the_backend(name, masked, count_kda_ext_calls):
    layer = _fla_layer(CONFIGS[name])
    B, T = 2, 1000  # T is not a multiple of the chunk size
    x = torch.randn(B, T, SIZES["hidden_size"], device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(x)
    kwargs = {}
    if masked:
        mask = torch.ones(B, T, dtype=torch.long, device="cuda")
        mask[1, :377] = 0
        kwargs["attention_mask"] = mask
    fla_own = _forward_backward(layer, x, do, **kwargs)
    assert count_kda_ext_calls["chunk_kda"] == 0
    kfla.register()
    with_kda_ext = _forward_backward(layer, x, do, **kwargs)
    assert count_kda_ext_calls["chunk_kda"] == 1, "FLA's layer did not reach kda_ext"
    _compare(name, fla_own, with_kda_ext)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fla_layer_decoding_with_and_without_the_backend(name, count_kda_ext_calls):
    layer = _fla_layer(CONFIGS[name]).eval()
    x = torch.randn(2, 204, SIZES["hidden_size"], device="cuda", dtype=torch.bfloat16)

    def decode():
        cache = KDACache()  # FLA's cache protocol; FLA's own Cache needs transformers
        with torch.no_grad():
            outs = [layer(x[:, :200], past_key_values=cache, use_cache=True)[0]]
            outs += [layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0] for t in range(200, 204)]
        return torch.cat(outs, 1), cache[0]["recurrent_state"]

    fla_o, fla_state = decode()
    kfla.register()
    o, state = decode()
    assert count_kda_ext_calls["chunk_kda"] == 1 and count_kda_ext_calls["fused_recurrent_kda"] == 4
    assert_rel_close(f"{name} decode o", fla_o, o, OUTPUT_RATIO)
    assert_rel_close(f"{name} decode state", fla_state, state, OUTPUT_RATIO)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kda_ext_layer_with_flas_state_dict(name):
    theirs = _fla_layer(CONFIGS[name], seed=3)
    ours = KimiDeltaAttention(**SIZES, **CONFIGS[name], layer_idx=0).cuda().to(torch.bfloat16)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 1000, SIZES["hidden_size"], device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(x)
    _compare(name, _forward_backward(theirs, x, do), _forward_backward(ours, x, do))
    theirs.eval(), ours.eval()
    results = []
    for layer in (theirs, ours):
        cache = KDACache()
        with torch.no_grad():
            outs = [layer(x[:, :200], past_key_values=cache, use_cache=True)[0]]
            outs += [layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)[0] for t in range(200, 204)]
        results.append((torch.cat(outs, 1), cache[0]["recurrent_state"]))
    assert_rel_close(f"{name} decode o", results[0][0], results[1][0], OUTPUT_RATIO)
    assert_rel_close(f"{name} decode state", results[0][1], results[1][1], OUTPUT_RATIO)


def test_kda_ext_layer_compiled_on_the_gpu():
    ours = KimiDeltaAttention(**SIZES, **CONFIGS["kimi"]).cuda().to(torch.bfloat16)
    x = torch.randn(2, 512, SIZES["hidden_size"], device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(x)
    eager = _forward_backward(ours, x, do)
    # Module.compile keeps the parameter names (torch.compile's wrapper prefixes them _orig_mod.)
    ours.compile(fullgraph=True)
    _compare("compiled", eager, _forward_backward(ours, x, do))

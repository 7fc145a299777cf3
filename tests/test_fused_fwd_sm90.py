# tests/test_fused_fwd_sm90.py: the fused Hopper forward (csrc/cuda/sm90/fused_fwd_sm90.cuh).
"""The fused forward runs the whole pipeline in one kernel per (sequence, value head) with a
16-row chunk inside, for bf16, K = V = 128 and every gate mode (the bounded variant for the
in-kernel lower-bound gate with lower_bound in [-5, 0); else the range-checked one, whose chunks
out of the median-row range, such as those with -1000 gate entries, take an exact path), when no
gradient is wanted (KDA_EXT_FUSED_FWD: auto, on, off). On an sm_90 GPU each case checks, with
the fused kernel forced on and its launch seen by the profiler: o and the final state against the
float64 reference at FLA's tolerances; against the two-kernel path (chunk 64) within a bar that a
layout, mask or pipeline error would exceed by far (the two round at other points, so they are
not bitwise equal); bitwise equality run to run. Without a GPU the dispatch rule is tested.
"""
import pytest
import torch

from conftest import Case, FLA_TOL, assert_rel_close, compare, kernels_launched, make_inputs, run_kernel, run_reference

import kda_ext
from kda_ext import _dispatch
from kda_ext._build_info import load_build_config

BF16 = torch.bfloat16
KIMI = dict(gate_in_kernel=True, safe_gate=True, lower_bound=-5.0, l2norm_in_kernel=True, beta_sigmoid=True)
BASE = dict(K=128, V=128, dtype=BF16)

_SM90 = (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
         and bool((load_build_config() or {}).get("WITH_SM90")))
requires_sm90 = pytest.mark.skipif(not _SM90, reason="needs an sm_90 GPU and the sm_90a build")

CASES = [
    Case(B=2, T=300, H=2, HV=4, **BASE, **KIMI),                       # GVA
    Case(B=1, T=1, H=1, HV=2, **BASE, **KIMI),
    Case(B=2, T=15, H=1, HV=1, **BASE, **KIMI),
    Case(B=1, T=16, H=1, HV=1, **BASE, **KIMI, h0=False),
    Case(B=2, T=17, H=1, HV=1, **BASE, **KIMI, state_v_first=True),
    Case(B=2, T=63, H=1, HV=1, **BASE, **KIMI, state_v_first=True),
    Case(B=1, T=64, H=1, HV=1, **BASE, **KIMI, h0=False),
    Case(B=1, T=65, H=2, HV=2, **BASE, **KIMI),
    Case(B=1, T=1000, H=1, HV=2, **BASE, **KIMI),
    Case(B=1, T=1000, H=1, HV=2, **BASE, **dict(KIMI, lower_bound=-1.0)),
    Case(B=1, T=200, H=1, HV=2, **BASE, **dict(KIMI, l2norm_in_kernel=False, beta_sigmoid=False)),
    Case(B=1, T=200, H=2, HV=2, **BASE, **KIMI, neg_eig=True, dt_bias=False, A_log_4d=True),
    # varlen: length-1 sequences, sequences ending inside a 16-row chunk, the next sequence's rows
    Case(cu_seqlens=[0, 1, 64, 65, 129, 500], H=2, HV=2, **BASE, recipe="varlen", **KIMI),
    Case(cu_seqlens=[0, 15, 16, 17, 300], H=1, HV=2, **BASE, recipe="varlen", state_v_first=True, **KIMI),
]
# The range-checked variant (one producer): the unbounded softplus gate, a lower bound below -5,
# a given g with -1000 entries (FLA's varlen test: decays that end a chunk's memory), both layouts.
SOFTPLUS = dict(gate_in_kernel=True, l2norm_in_kernel=True, beta_sigmoid=True)
RANGE_CHECKED_CASES = [
    Case(B=2, T=300, H=2, HV=4, **BASE, **SOFTPLUS),
    Case(B=1, T=65, H=1, HV=2, **BASE, **SOFTPLUS, h0=False),
    Case(B=1, T=1000, H=1, HV=2, **BASE, gate_in_kernel=True, lower_bound=-8.0, l2norm_in_kernel=True),
    Case(B=1, T=1000, H=1, HV=2, **BASE, gate_in_kernel=True, lower_bound=-6.0, l2norm_in_kernel=True,
         dt_bias=False),
    Case(B=2, T=200, H=1, HV=2, **BASE, l2norm_in_kernel=True, mask_p=0.1, mask_value=-1000.0),
    Case(cu_seqlens=[0, 1, 64, 65, 129, 500], H=2, HV=2, **BASE, recipe="varlen", mask_p=0.1,
         mask_value=-1000.0, state_v_first=True),
    Case(B=1, T=200, H=1, HV=2, **BASE, neg_eig=True, beta_sigmoid=True, mask_p=0.5, mask_value=-1000.0),
]


def _fused_outputs(case, x, monkeypatch, switch="on", producers=1, cluster="off"):
    monkeypatch.setenv("KDA_EXT_FUSED_FWD", switch)
    monkeypatch.setenv("KDA_EXT_FUSED_PRODUCERS", str(producers))
    monkeypatch.setenv("KDA_EXT_FUSED_CLUSTER", cluster)
    with torch.no_grad():
        return run_kernel(case, x, grads=False)


# The bounded variant's three layouts: (KDA_EXT_FUSED_PRODUCERS, KDA_EXT_FUSED_CLUSTER) and the
# kernel instance the profiler must see.
LAYOUTS = {
    "1producer": (1, "off", "FusedFwdConfig<1, true, false>"),
    "2producers": (2, "off", "FusedFwdConfig<2, true, false>"),
    "cluster": (2, "on", "FusedFwdConfig<2, true, true>"),
}


@requires_sm90
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id())
def test_cuda_fused_fwd_against_reference_and_two_kernel_path(case, layout, monkeypatch):
    producers, cluster, kernel = LAYOUTS[layout]
    x = make_inputs(case, "cuda")
    ref = run_reference(case, x, grads=False)
    run = dict(producers=producers, cluster=cluster)
    names = kernels_launched(lambda: _fused_outputs(case, x, monkeypatch, **run))
    assert any(kernel in n for n in names), f"the fused kernel did not run: {names}"
    fused = _fused_outputs(case, x, monkeypatch, **run)
    again = _fused_outputs(case, x, monkeypatch, **run)
    two_kernel = _fused_outputs(case, x, monkeypatch, switch="off")
    compare(ref, fused, FLA_TOL, ["o", "ht"])
    compare(ref, two_kernel, FLA_TOL, ["o", "ht"])
    for n in ("o", "ht"):
        assert torch.equal(fused[n], again[n]), f"{n} changed between identical runs"
        # chunk 16 vs chunk 64: both near the reference; a wrong row, column or stage is O(1)
        assert_rel_close(f"{n} (fused vs two-kernel)", two_kernel[n], fused[n], 6e-3)


@requires_sm90
@pytest.mark.parametrize("case", RANGE_CHECKED_CASES, ids=lambda c: c.id())
def test_cuda_fused_fwd_range_checked_gate(case, monkeypatch):
    x = make_inputs(case, "cuda")
    ref = run_reference(case, x, grads=False)
    names = kernels_launched(lambda: _fused_outputs(case, x, monkeypatch, producers=2, cluster="on"))
    assert any("FusedFwdConfig<1, false, false>" in n for n in names), f"the range-checked kernel did not run: {names}"
    fused = _fused_outputs(case, x, monkeypatch)
    again = _fused_outputs(case, x, monkeypatch)
    two_kernel = _fused_outputs(case, x, monkeypatch, switch="off")
    compare(ref, fused, FLA_TOL, ["o", "ht"])
    for n in ("o", "ht"):
        assert torch.equal(fused[n], again[n]), f"{n} changed between identical runs"
        assert_rel_close(f"{n} (fused vs two-kernel)", two_kernel[n], fused[n], 6e-3)


@requires_sm90
def test_cuda_fused_fwd_fp32_gate_logits(monkeypatch):
    case = Case(B=1, T=200, H=1, HV=2, **BASE, **KIMI)
    x = make_inputs(case, "cuda")
    x["g"] = x["g"].detach().float()
    ref = run_reference(case, x, grads=False)
    compare(ref, _fused_outputs(case, x, monkeypatch), FLA_TOL, ["o", "ht"])


@requires_sm90
def test_cuda_fused_fwd_not_taken_when_a_gradient_is_wanted(monkeypatch):
    case = Case(B=1, T=100, H=1, HV=2, **BASE, **KIMI)
    x = make_inputs(case, "cuda")
    monkeypatch.setenv("KDA_EXT_FUSED_FWD", "on")
    names = kernels_launched(lambda: run_kernel(case, x))
    assert not any("fused_fwd_sm90" in n for n in names), names
    compare(run_reference(case, x), run_kernel(case, x), FLA_TOL)


@requires_sm90
def test_cuda_fused_fwd_compiled_fullgraph(monkeypatch):
    case = Case(B=1, T=130, H=1, HV=2, **BASE, **KIMI)
    x = make_inputs(case, "cuda")
    eager = _fused_outputs(case, x, monkeypatch)

    def step(q, k, v, g, beta, h0, A_log, dt_bias):
        return kda_ext.chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, A_log=A_log,
                                 dt_bias=dt_bias, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                 use_beta_sigmoid_in_kernel=True, safe_gate=True, lower_bound=-5.0)
    args = [x[n].detach() for n in ("q", "k", "v", "g", "beta", "h0", "A_log", "dt_bias")]
    with torch.no_grad():
        o, ht = torch.compile(step, fullgraph=True)(*args)
    assert torch.equal(o, eager["o"]) and torch.equal(ht, eager["ht"])


@requires_sm90
def test_cuda_fused_fwd_op_refuses_what_it_does_not_serve():
    q = torch.randn(1, 16, 1, 128, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="bf16"):
        torch.ops.kda_ext.chunk_kda_fwd_fused(q, q, q, q, q[..., 0], 0.1, None, None, None, None,
                                              True, True, True, False, -5.0, False, False)
    q64 = torch.randn(1, 16, 1, 64, device="cuda", dtype=BF16)
    with pytest.raises(RuntimeError, match="K = V = 128"):
        torch.ops.kda_ext.chunk_kda_fwd_fused(q64, q64, q64, q64, q64[..., 0], 0.1, None, None, None, None,
                                              True, True, True, False, -5.0, False, False)


def _applies(**overrides):
    kwargs = dict(device=torch.device("cuda", 0), dtype=BF16, K=128, V=128, needs_grad=False, with_sm90=True)
    kwargs.update(overrides)
    return _dispatch.fused_forward_applies(**kwargs)


@pytest.mark.parametrize("overrides", [
    dict(needs_grad=True), dict(dtype=torch.float16), dict(K=64), dict(V=64), dict(with_sm90=False),
    dict(device=torch.device("cpu")),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_fused_forward_rule_declines(overrides, monkeypatch):
    monkeypatch.setenv("KDA_EXT_FUSED_FWD", "on")
    assert not _applies(**overrides)


@pytest.mark.parametrize("gate, variant", [
    (dict(use_gate_in_kernel=True, lower_bound=-5.0), "bounded"),
    (dict(use_gate_in_kernel=True, lower_bound=-0.5), "bounded"),
    (dict(use_gate_in_kernel=True, lower_bound=-5.5), "range-checked"),
    (dict(use_gate_in_kernel=True, lower_bound=None), "range-checked"),   # softplus
    (dict(use_gate_in_kernel=False, lower_bound=-5.0), "range-checked"),  # a given g
    (dict(use_gate_in_kernel=False, lower_bound=None), "range-checked"),
])
def test_fused_forward_gate_variant(gate, variant):
    assert _dispatch.fused_forward_gate_variant(**gate) == variant


@pytest.mark.parametrize("shape, variant, taken", [
    (dict(num_seqs=2, HV=32, total_tokens=16384), "bounded", True),     # measured 2.0x the two-kernel path
    (dict(num_seqs=1, HV=96, total_tokens=8192), "bounded", True),      # 1.7x
    (dict(num_seqs=16, HV=16, total_tokens=32768), "bounded", True),    # varlen batch: 1.23x
    (dict(num_seqs=1, HV=16, total_tokens=32768), "bounded", False),    # few (sequence, head) pairs: slower
    (dict(num_seqs=1, HV=16, total_tokens=1024), "bounded", False),
    (dict(num_seqs=8, HV=32, total_tokens=8192), "bounded", False),     # 1024-token sequences
    (dict(num_seqs=2, HV=32, total_tokens=16384), "range-checked", False),  # the exact path: slower
], ids=["2x8192x32", "1x8192x96", "varlen16x16", "1x32768x16", "1x1024x16", "8x1024x32", "softplus"])
def test_fused_forward_auto_rule(shape, variant, taken, monkeypatch):
    monkeypatch.delenv("KDA_EXT_FUSED_FWD", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _applies(gate_variant=variant, num_sms=132, **shape) is taken
    monkeypatch.setenv("KDA_EXT_FUSED_FWD", "on")
    assert _applies(gate_variant=variant, num_sms=132, **shape)


def test_fused_forward_switch(monkeypatch):
    monkeypatch.setenv("KDA_EXT_FUSED_FWD", "off")
    assert not _applies()
    monkeypatch.setenv("KDA_EXT_FUSED_FWD", "sometimes")
    with pytest.raises(ValueError, match="KDA_EXT_FUSED_FWD"):
        _applies()


@pytest.mark.parametrize("num_seqs, HV, variant, cluster", [
    (2, 32, "bounded", True),          # 128 CTAs as clusters on 132 SMs
    (1, 96, "bounded", False),         # 96 (sequence, head) pairs: one CTA each fills the GPU
    (1, 16, "bounded", True),
    (1, 16, "range-checked", False),   # the range-checked variant runs one CTA
])
def test_fused_forward_cluster(num_seqs, HV, variant, cluster, monkeypatch):
    monkeypatch.delenv("KDA_EXT_FUSED_CLUSTER", raising=False)
    rule = dict(num_seqs=num_seqs, HV=HV, num_sms=132, gate_variant=variant)
    assert _dispatch.fused_forward_cluster(**rule) is cluster
    monkeypatch.setenv("KDA_EXT_FUSED_CLUSTER", "off")
    assert _dispatch.fused_forward_cluster(**rule) is False
    monkeypatch.setenv("KDA_EXT_FUSED_CLUSTER", "on")
    assert _dispatch.fused_forward_cluster(**rule) is (variant == "bounded")
    monkeypatch.setenv("KDA_EXT_FUSED_CLUSTER", "yes")
    with pytest.raises(ValueError, match="KDA_EXT_FUSED_CLUSTER"):
        _dispatch.fused_forward_cluster(**rule)


@pytest.mark.parametrize("shape, seg_len", [
    (dict(num_seqs=1, total_tokens=32768, HV=16), 4096),    # one long sequence, few heads: 8 segments
    (dict(num_seqs=1, total_tokens=32768, HV=8), 2048),
    (dict(num_seqs=2, total_tokens=16384, HV=32), None),    # segments would not be under a third
    (dict(num_seqs=1, total_tokens=8192, HV=96), None),     # the heads fill the GPU
    (dict(num_seqs=16, total_tokens=30000, HV=16), None),   # varlen batch: sequences x heads fill it
    (dict(num_seqs=1, total_tokens=1024, HV=16), None),     # short: the split's fixed costs dominate
], ids=["1x32768x16", "1x32768x8", "2x8192x32", "1x8192x96", "varlen16x16", "1x1024x16"])
def test_fused_segment_length(shape, seg_len, monkeypatch):
    monkeypatch.delenv("KDA_EXT_FUSED_SEGMENTS", raising=False)
    assert _dispatch.fused_segment_length(**shape, num_sms=132) == seg_len
    if seg_len is not None:
        assert seg_len % 16 == 0
        monkeypatch.setenv("KDA_EXT_FUSED_SEGMENTS", "off")
        assert _dispatch.fused_segment_length(**shape, num_sms=132) is None


def test_fused_segment_switch(monkeypatch):
    monkeypatch.setenv("KDA_EXT_FUSED_SEGMENTS", "on")
    assert _dispatch.fused_segment_length(num_seqs=1, total_tokens=1024, HV=16, num_sms=132) == 128
    monkeypatch.setenv("KDA_EXT_FUSED_SEGMENTS", "always")
    with pytest.raises(ValueError, match="KDA_EXT_FUSED_SEGMENTS"):
        _dispatch.fused_segment_length(num_seqs=1, total_tokens=1024, HV=16, num_sms=132)


@requires_sm90
@pytest.mark.parametrize("case", [
    Case(B=1, T=1000, H=1, HV=2, **BASE, **KIMI),
    Case(B=2, T=300, H=2, HV=4, **BASE, **SOFTPLUS, state_v_first=True),
    Case(cu_seqlens=[0, 1, 64, 65, 129, 700], H=2, HV=2, **BASE, recipe="varlen", mask_p=0.1,
         mask_value=-1000.0),
    Case(B=1, T=500, H=1, HV=1, **BASE, **KIMI, h0=False),
], ids=lambda c: c.id())
def test_cuda_fused_fwd_by_segments(case, monkeypatch):
    """Sequences cut into segments (KDA_EXT_FUSED_SEGMENTS=on forces it at these small shapes): three
    fused passes and the scan give the reference's o and final state, close to the unsplit run."""
    x = make_inputs(case, "cuda")
    ref = run_reference(case, x, grads=False)
    monkeypatch.setenv("KDA_EXT_FUSED_SEGMENTS", "off")
    whole = _fused_outputs(case, x, monkeypatch)
    monkeypatch.setenv("KDA_EXT_FUSED_SEGMENTS", "on")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _fused_outputs(case, x, monkeypatch)
        torch.cuda.synchronize()
    launches = sum(e.count for e in prof.key_averages() if "fused_fwd_sm90_kernel" in e.key)
    assert launches == 3, f"expected the A, C and output passes, got {launches} fused launches"
    split = _fused_outputs(case, x, monkeypatch)
    compare(ref, split, FLA_TOL, ["o", "ht"])
    for n in ("o", "ht"):
        assert_rel_close(f"{n} (segments vs whole)", whole[n], split[n], 6e-3)
    assert torch.equal(split["o"], _fused_outputs(case, x, monkeypatch)["o"])

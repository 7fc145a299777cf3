# tests/test_input_checks.py: chunk_kda's keyword-only parameters, head-first layout mix-ups and the
# opt-in value checks (check_inputs / KDA_EXT_CHECK_INPUTS), incl. that the default path reads no data.
import inspect
import warnings

import pytest
import torch

import kda_ext
import kda_ext.chunk as chunk_mod
from conftest import requires_cuda

B, T, H, HV, K, V = 2, 16, 2, 4, 8, 6

# FLA's positional parameters of fla.ops.kda.chunk_kda, in its order.
FLA_POSITIONAL = ("q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state",
                  "use_qk_l2norm_in_kernel", "use_gate_in_kernel", "use_beta_sigmoid_in_kernel",
                  "allow_neg_eigval", "safe_gate", "lower_bound", "disable_recompute",
                  "return_intermediate_states", "state_v_first", "cu_seqlens", "cu_seqlens_cpu",
                  "cp_context")


def _inputs(b=B, t=T, h=H, hv=HV, k=K, v=V, head_first=False):
    """q, k, v, g (a log-decay), beta; with head_first, each laid out [B, heads, T, ...]."""
    x = dict(q=torch.randn(b, t, h, k), k=torch.randn(b, t, h, k), v=torch.randn(b, t, hv, v),
             g=-torch.rand(b, t, hv, k), beta=torch.rand(b, t, hv))
    if head_first:
        x = {n: a.transpose(1, 2) for n, a in x.items()}
    return x


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --- the signature ----------------------------------------------------------------------------

def test_fla_positional_order_kept_and_extras_keyword_only():
    params = inspect.signature(kda_ext.chunk_kda).parameters
    positional = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert tuple(positional) == FLA_POSITIONAL
    keyword_only = {n: p.default for n, p in params.items() if p.kind == p.KEYWORD_ONLY}
    assert keyword_only == dict(A_log=None, dt_bias=None, chunk_size=64, check_inputs=False)


def test_A_log_cannot_be_passed_positionally():
    x = _inputs()
    positional = [x["q"], x["k"], x["v"], x["g"], x["beta"]] + [None] * 15
    with pytest.raises(TypeError, match="positional"):
        kda_ext.chunk_kda(*positional, torch.zeros(HV))


def test_keyword_A_log_and_dt_bias_reach_the_gate():
    # The gradient reaches both named parameters (they are not dropped on the way to the op).
    x = _inputs()
    A_log = torch.zeros(HV, requires_grad=True)
    dt_bias = torch.zeros(HV * K, requires_grad=True)
    o, _ = kda_ext.chunk_kda(**x, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias)
    o.sum().backward()
    assert A_log.grad is not None and A_log.grad.abs().sum() > 0
    assert dt_bias.grad is not None and dt_bias.grad.abs().sum() > 0


def test_unknown_keyword_lists_the_extras():
    with pytest.raises(TypeError, match=r"'dtbias'.*A_log, dt_bias, chunk_size, check_inputs, "
                                        r"transpose_state_layout"):
        kda_ext.chunk_kda(**_inputs(), dtbias=torch.zeros(HV * K))


def test_check_inputs_must_be_bool():
    with pytest.raises(TypeError, match="`check_inputs` must be a bool, got 1"):
        kda_ext.chunk_kda(**_inputs(), check_inputs=1)


# --- head-first inputs: the warning -----------------------------------------------------------

def test_head_first_inputs_warn():
    # All five tensors head-first with H == HV: every shape check passes, only T < H tells.
    x = _inputs(h=HV, head_first=True)
    with pytest.warns(UserWarning, match=r"T=4 time steps and H=16 heads.*head-first.*"
                                         r"transpose\(1, 2\)"):
        kda_ext.chunk_kda(**x)


def test_warning_points_at_the_caller():
    with pytest.warns(UserWarning, match="head-first") as record:
        kda_ext.chunk_kda(**_inputs(h=HV, head_first=True))
    assert record[0].filename == __file__


def test_short_decode_step_warns_like_fla():
    # FLA's rule is T < H, whatever the reason: one decoding step with 4 heads warns too.
    with pytest.warns(UserWarning, match="T=1 time steps and H=4 heads"):
        kda_ext.chunk_kda(**_inputs(t=1, h=4, hv=4))


@pytest.mark.parametrize("t", [T, H])  # T > H and T == H (FLA's rule is strict)
def test_no_warning_when_time_is_not_shorter_than_heads(t, no_warnings):
    kda_ext.chunk_kda(**_inputs(t=t))


def test_no_warning_and_no_graph_break_under_compile(no_warnings):
    # warnings.warn cannot be traced by Dynamo: with fullgraph=True a warning in the traced
    # region would be an error. The check stays quiet while tracing.
    torch._dynamo.reset()
    x = _inputs(h=HV, head_first=True)
    fn = torch.compile(kda_ext.chunk_kda, fullgraph=True, backend="eager")
    o, _ = fn(**x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, _ = kda_ext.chunk_kda(**x)
    torch.testing.assert_close(o, ref)


# --- head-first inputs: shapes that prove it --------------------------------------------------

def test_A_log_sized_for_the_head_axis_blames_the_layout():
    # Head-first inputs with the right gate parameters: A_log has as many elements as the axis
    # read as time. The message says so instead of blaming A_log.
    x = _inputs(h=HV, head_first=True)
    with pytest.warns(UserWarning, match="head-first"):
        with pytest.raises(ValueError, match=r"`A_log` must have HV=16 elements.*got 4.*T=4.*"
                                             r"head-first \[B, H, T, \.\.\.\].*transpose\(1, 2\)"):
            kda_ext.chunk_kda(**x, use_gate_in_kernel=True, A_log=torch.zeros(HV))


def test_dt_bias_sized_for_the_head_axis_blames_the_layout():
    x = _inputs(h=HV, head_first=True)
    with pytest.warns(UserWarning, match="head-first"):
        with pytest.raises(ValueError, match=r"`dt_bias` must have HV\*K=128 elements.*got 32.*"
                                             r"T\*K=32.*head-first.*transpose\(1, 2\)"):
            kda_ext.chunk_kda(**x, use_gate_in_kernel=True, lower_bound=-1.0,
                              dt_bias=torch.zeros(HV * K))


def test_wrong_A_log_size_without_layout_hint():
    with pytest.raises(ValueError, match="`A_log` must have HV=4 elements") as err:
        kda_ext.chunk_kda(**_inputs(), use_gate_in_kernel=True, A_log=torch.zeros(3))
    assert "head-first" not in str(err.value)


@pytest.mark.parametrize("name,expected", [
    ("beta", r"`beta` must be \[2, 16, 4\] \(\[B, T, HV\]\), got \[2, 4, 16\]"),
    ("g", r"`g` must be \[2, 16, 4, 8\] \(\[B, T, HV, K\]\), got \[2, 4, 16, 8\]"),
])
def test_head_first_beta_or_g_raises(name, expected):
    x = _inputs()
    x[name] = x[name].transpose(1, 2)
    with pytest.raises(ValueError, match=expected + r".*head-first.*transpose\(1, 2\)"):
        kda_ext.chunk_kda(**x)


def test_wrong_beta_shape_without_layout_hint():
    x = _inputs()
    x["beta"] = x["beta"][:, :, :2]
    with pytest.raises(ValueError, match=r"`beta` must be \[2, 16, 4\]") as err:
        kda_ext.chunk_kda(**x)
    assert "head-first" not in str(err.value)


def test_head_first_v_raises():
    x = _inputs()
    x["v"] = x["v"].transpose(1, 2)
    with pytest.raises(ValueError, match=r"`v` must be \[B=2, T=16, HV, V\].*head-first "
                                         r"\[B, HV, T, V\].*transpose\(1, 2\)"):
        kda_ext.chunk_kda(**x)


def test_all_head_first_with_gva_raises_on_v():
    # H != HV: v's head axis (read as time) disagrees with q's; both carry time on axis 2.
    x = _inputs(head_first=True)
    with pytest.warns(UserWarning, match="head-first"):
        with pytest.raises(ValueError, match=r"`v` must be \[B=2, T=2, HV, V\].*v.shape\[2\] "
                                             r"equals q.shape\[2\]=16.*all head-first"):
            kda_ext.chunk_kda(**x)


def test_head_first_k_raises():
    x = _inputs()
    x["k"] = x["k"].transpose(1, 2)
    with pytest.raises(ValueError, match=r"`k` must have the shape of `q`.*axes 1 and 2 are "
                                         r"swapped.*transpose\(1, 2\)"):
        kda_ext.chunk_kda(**x)


# --- check_inputs: positive log-gates, NaN and inf --------------------------------------------

def _gated_positive():
    x = _inputs()
    x["g"][1, 5, 2, 3] = 0.5
    x["g"][1, 7, 0, 0] = 0.25
    return x


def test_positive_gate_rejected_with_check_inputs():
    with pytest.raises(ValueError, match=r"`g` is a per-step log-decay and must be <= 0 when "
                                         r"use_gate_in_kernel=False.*2 element\(s\) are positive, "
                                         r"the first at batch 1, time 5, head 2, channel 3: "
                                         r"g\[1, 5, 2, 3\] = 0.5"):
        kda_ext.chunk_kda(**_gated_positive(), check_inputs=True)


def test_positive_gate_rejected_with_env_switch(monkeypatch):
    monkeypatch.setenv("KDA_EXT_CHECK_INPUTS", "1")
    with pytest.raises(ValueError, match=r"g\[1, 5, 2, 3\] = 0.5"):
        kda_ext.chunk_kda(**_gated_positive())


def test_env_switch_zero_is_off(monkeypatch):
    monkeypatch.setenv("KDA_EXT_CHECK_INPUTS", "0")
    kda_ext.chunk_kda(**_gated_positive())


def test_env_switch_bad_value(monkeypatch):
    monkeypatch.setenv("KDA_EXT_CHECK_INPUTS", "yes")
    with pytest.raises(ValueError, match="KDA_EXT_CHECK_INPUTS must be 0 or 1.*'yes'"):
        kda_ext.chunk_kda(**_inputs())


def test_zero_gate_is_accepted_by_the_check():
    x = _inputs()
    x["g"].zero_()
    o, _ = kda_ext.chunk_kda(**x, check_inputs=True)
    assert torch.isfinite(o).all()


def test_raw_gate_may_be_positive_with_gate_in_kernel():
    # With use_gate_in_kernel, g is a logit: positive values are legal and the check lets them be.
    x = _gated_positive()
    o, _ = kda_ext.chunk_kda(**x, use_gate_in_kernel=True, A_log=torch.zeros(HV), check_inputs=True)
    assert torch.isfinite(o).all()


def test_positive_gate_in_packed_sequences_names_the_sequence():
    x = _inputs(b=1)
    x["g"][0, 7, 1, 2] = 1.0
    with pytest.raises(ValueError, match=r"batch 0, time 7, head 1, channel 2 \(sequence 1, its "
                                         r"step 2\): g\[0, 7, 1, 2\] = 1.0"):
        kda_ext.chunk_kda(**x, cu_seqlens=torch.tensor([0, 5, 16]), check_inputs=True)


@pytest.mark.parametrize("name,index,value,where", [
    ("q", (0, 3, 1, 2), float("nan"), "batch 0, time 3, head 1, channel 2"),
    ("beta", (1, 0, 3), float("inf"), "batch 1, time 0, head 3"),
    ("g", (0, 2, 0, 0), float("-inf"), "batch 0, time 2, head 0, channel 0"),
])
def test_non_finite_input_rejected(name, index, value, where):
    x = _inputs()
    x[name][index] = value
    with pytest.raises(ValueError, match=rf"`{name}` must be finite; 1 element\(s\) are not, the "
                                         rf"first at {where}: {name}\[.*\] = {value}"):
        kda_ext.chunk_kda(**x, check_inputs=True)


def test_non_finite_initial_state_rejected():
    h0 = torch.zeros(B, HV, K, V)
    h0[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"`initial_state` must be finite.*sequence 1, head 2, "
                                         r"row 3, column 4"):
        kda_ext.chunk_kda(**_inputs(), initial_state=h0, check_inputs=True)


def test_non_finite_dt_bias_rejected():
    dt_bias = torch.zeros(HV * K)
    dt_bias[9] = float("inf")
    with pytest.raises(ValueError, match=r"`dt_bias` must be finite.*index 9: dt_bias\[9\] = inf"):
        kda_ext.chunk_kda(**_inputs(), use_gate_in_kernel=True, A_log=torch.zeros(HV),
                          dt_bias=dt_bias, check_inputs=True)


# --- the default path reads no data back --------------------------------------------------------

def test_check_is_off_by_default(monkeypatch):
    monkeypatch.delenv("KDA_EXT_CHECK_INPUTS", raising=False)
    calls = []
    monkeypatch.setattr(chunk_mod, "_check_input_values", lambda *a, **kw: calls.append(a))
    kda_ext.chunk_kda(**_gated_positive())
    assert calls == []
    kda_ext.chunk_kda(**_gated_positive(), check_inputs=True)
    assert len(calls) == 1


# Python-level ways of reading a tensor's data on the host (each a device sync for GPU tensors).
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu",
               "numpy")


def _count_host_reads(monkeypatch):
    counts = {}
    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def test_default_path_reads_no_tensor_data(monkeypatch):
    monkeypatch.delenv("KDA_EXT_CHECK_INPUTS", raising=False)
    x = {n: t.requires_grad_() for n, t in _inputs().items()}
    A_log, dt_bias = torch.zeros(HV, requires_grad=True), torch.zeros(HV * K, requires_grad=True)
    counts = _count_host_reads(monkeypatch)
    o, ht = kda_ext.chunk_kda(**x, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                              initial_state=torch.zeros(B, HV, K, V), output_final_state=True)
    (o.sum() + ht.sum()).backward()
    assert counts == {}
    # The counter does see the checks' reads: the test above can fail.
    kda_ext.chunk_kda(**{n: t.detach() for n, t in x.items()}, check_inputs=True)
    assert counts


@requires_cuda
def test_default_path_has_no_device_sync_on_cuda(monkeypatch):
    monkeypatch.delenv("KDA_EXT_CHECK_INPUTS", raising=False)
    x = {n: t.to(device="cuda", dtype=torch.bfloat16).requires_grad_() for n, t in _inputs().items()}
    A_log = torch.zeros(HV, device="cuda", requires_grad=True)
    dt_bias = torch.zeros(HV * K, device="cuda", requires_grad=True)
    kw = dict(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, safe_gate=True,
              lower_bound=-5.0, use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o, _ = kda_ext.chunk_kda(**x, **kw)
        o.float().sum().backward()
        with pytest.raises(RuntimeError, match="synchroniz"):
            kda_ext.chunk_kda(**x, **kw, check_inputs=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")

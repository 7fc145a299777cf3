# tests/test_errors.py: every argument check of chunk_kda, one bad input per test.
import pytest
import torch

import kda_ext
from conftest import requires_cuda

B, T, H, HV, K, V = 2, 16, 2, 4, 8, 6


def _args(dtype=torch.float32, device="cpu", b=B, t=T, h=H, hv=HV, k=K, v=V):
    q = torch.randn(b, t, h, k, dtype=dtype, device=device)
    return dict(
        q=q,
        k=torch.randn(b, t, h, k, dtype=dtype, device=device),
        v=torch.randn(b, t, hv, v, dtype=dtype, device=device),
        g=-torch.rand(b, t, hv, k, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32),
        beta=torch.rand(b, t, hv, dtype=dtype, device=device),
    )


def _varlen_args(bounds=(0, 5, 16), **kw):
    a = _args(b=1, **kw)
    a["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int64)
    return a


def _raises(exc, match, **kwargs):
    with pytest.raises(exc, match=match):
        kda_ext.chunk_kda(**kwargs)


# --- kwargs -----------------------------------------------------------------------------------

def test_unknown_keyword_is_named():
    _raises(TypeError, "dt_bais", **_args(), dt_bais=torch.randn(HV * K))


def test_transpose_state_layout_with_state_v_first():
    _raises(ValueError, "transpose_state_layout", **_args(), state_v_first=True, transpose_state_layout=True)


def test_transpose_state_layout_is_deprecated():
    with pytest.warns(DeprecationWarning, match="state_v_first"):
        # A later check fails so that no kernel runs; the warning comes first.
        _raises(ValueError, "chunk_size", **_args(), transpose_state_layout=True, chunk_size=16)


def test_cp_context_of_unknown_type():
    # (context parallelism itself: tests/test_cp.py)
    _raises(TypeError, "`cp_context` must be a context from kda_ext.build_cp_context", **_varlen_args(),
            cp_context=object())


def test_non_tensor_input():
    a = _args()
    a["q"] = a["q"].tolist()
    _raises(TypeError, "`q` must be a torch.Tensor", **a)


# --- FLA's checks, in its order ---------------------------------------------------------------

def test_varlen_needs_batch_one():
    a = _args()
    a["cu_seqlens"] = torch.tensor([0, 5, T])
    _raises(ValueError, "batch size is expected to be 1 rather than 2", **a)


def test_varlen_initial_state_count():
    a = _varlen_args()
    _raises(ValueError, r"number of initial states.*2.*got 3", **a, initial_state=torch.zeros(3, HV, K, V))


def test_initial_state_dtype():
    _raises(TypeError, "initial_state.*float32.*bfloat16", **_args(),
            initial_state=torch.zeros(B, HV, K, V, dtype=torch.bfloat16))


def test_initial_state_fp64_needs_fp64_q():
    _raises(TypeError, "initial_state.*float32.*float64", **_args(),
            initial_state=torch.zeros(B, HV, K, V, dtype=torch.float64))


def test_gate_in_kernel_needs_A_log_or_lower_bound():
    _raises(ValueError, "A_log", **_args(), use_gate_in_kernel=True)


@pytest.mark.parametrize("bad", [16, 128, 0, True])
def test_chunk_size(bad):
    _raises(ValueError, "`chunk_size` must be either 32 or 64", **_args(), chunk_size=bad)


def test_safe_gate_needs_lower_bound():
    _raises(ValueError, "lower_bound", **_args(), use_gate_in_kernel=True, safe_gate=True,
            A_log=torch.zeros(HV))


@pytest.mark.parametrize("lb", [-5.5, 0.0, 1.0])
def test_safe_gate_lower_bound_range(lb):
    _raises(ValueError, r"safe range \[-5, 0\).*" + str(lb), **_args(), use_gate_in_kernel=True,
            safe_gate=True, lower_bound=lb, A_log=torch.zeros(HV))


def test_neg_eigval_needs_beta_sigmoid():
    _raises(ValueError, "allow_neg_eigval.*use_beta_sigmoid_in_kernel", **_args(), allow_neg_eigval=True)


def test_k_shape():
    a = _args()
    a["k"] = a["k"][:, :, :1]
    _raises(ValueError, r"`k` must have the shape of `q`", **a)


def test_key_dim_limit():
    _raises(ValueError, "K <= 256.*K=257", **_args(k=257))


def test_value_dim_limit():
    _raises(ValueError, "V <= 256.*V=300", **_args(v=300))


def test_heads_divisible():
    _raises(ValueError, "HV=3.*H=2", **_args(hv=3))


def test_g_shape():
    a = _args()
    a["g"] = a["g"][..., :4]
    _raises(ValueError, r"`g` must be \[2, 16, 4, 8\]", **a)


def test_beta_shape():
    a = _args()
    a["beta"] = a["beta"].unsqueeze(-1)
    _raises(ValueError, r"`beta` must be \[2, 16, 4\]", **a)


def test_v_shape():
    a = _args()
    a["v"] = a["v"][:, :5]
    _raises(ValueError, "`v` must be", **a)


def test_q_rank():
    a = _args()
    a["q"] = a["q"][0]
    _raises(ValueError, r"`q` must be \[B, T, H, K\]", **a)


def test_intermediate_states_need_inference_mode():
    _raises(ValueError, "inference", **_args(), return_intermediate_states=True)


def test_intermediate_states_need_recompute():
    with torch.inference_mode():
        _raises(ValueError, "disable_recompute", **_args(), return_intermediate_states=True,
                disable_recompute=True)


# --- dtypes, devices, parameters --------------------------------------------------------------

def test_qkv_dtype_must_match():
    a = _args()
    a["k"] = a["k"].half()
    _raises(TypeError, "share one dtype", **a)


def test_q_integer_dtype():
    a = _args()
    a["q"], a["k"], a["v"] = (a[n].to(torch.int32) for n in ("q", "k", "v"))
    _raises(TypeError, "`q` must be float16, bfloat16, float32 or float64, got torch.int32", **a)


def test_g_integer_dtype():
    a = _args()
    a["g"] = a["g"].to(torch.int64)
    _raises(TypeError, "`g` must be a float16", **a)


def test_beta_integer_dtype():
    a = _args()
    a["beta"] = a["beta"].to(torch.int64)
    _raises(TypeError, "`beta` must be a float16", **a)


def test_device_mismatch():
    a = _args()
    a["v"] = a["v"].to("meta")
    _raises(ValueError, "`v` must be on cpu", **a)


def test_initial_state_device():
    _raises(ValueError, "`initial_state` must be on cpu", **_args(),
            initial_state=torch.zeros(B, HV, K, V, device="meta"))


@requires_cuda
def test_fp64_rejected_on_cuda():
    _raises(TypeError, "float64.*CPU", **_args(dtype=torch.float64, device="cuda"))


@requires_cuda
def test_cuda_device_mismatch():
    a = _args(device="cuda")
    a["beta"] = a["beta"].cpu()
    _raises(ValueError, "`beta` must be on cuda", **a)


def test_initial_state_shape():
    _raises(ValueError, r"`initial_state` must be \[N, HV, K, V\] = \[2, 4, 8, 6\]", **_args(),
            initial_state=torch.zeros(B, HV, V, K))


def test_initial_state_shape_v_first():
    _raises(ValueError, r"`initial_state` must be \[N, HV, V, K\] = \[2, 4, 6, 8\]", **_args(),
            initial_state=torch.zeros(B, HV, K, V), state_v_first=True)


def test_A_log_numel():
    _raises(ValueError, "`A_log` must have HV=4 elements, got 3", **_args(), use_gate_in_kernel=True,
            A_log=torch.zeros(3))


def test_A_log_dtype():
    _raises(TypeError, "`A_log` must be torch.float32", **_args(), use_gate_in_kernel=True,
            A_log=torch.zeros(HV, dtype=torch.bfloat16))


def test_A_log_device():
    _raises(ValueError, "`A_log` must be on cpu", **_args(), use_gate_in_kernel=True,
            A_log=torch.zeros(HV, device="meta"))


def test_dt_bias_numel():
    _raises(ValueError, "`dt_bias` must have HV\\*K=32 elements, got 8", **_args(), use_gate_in_kernel=True,
            A_log=torch.zeros(HV), dt_bias=torch.zeros(K))


def test_dt_bias_dtype():
    _raises(TypeError, "`dt_bias` must be torch.float32", **_args(), use_gate_in_kernel=True,
            A_log=torch.zeros(HV), dt_bias=torch.zeros(HV * K, dtype=torch.float16))


def test_scale_type():
    _raises(TypeError, "`scale` must be a float", **_args(), scale=torch.tensor(0.1))


@pytest.mark.parametrize("lb", [0.5, float("inf"), float("nan"), float("-inf")])
def test_in_kernel_lower_bound_must_be_finite_and_non_positive(lb):
    # Without safe_gate FLA accepts any bound; a positive one makes the state grow without limit.
    _raises(ValueError, "`lower_bound` must be a finite value <= 0", **_args(), use_gate_in_kernel=True,
            lower_bound=lb)


def test_zero_lower_bound_is_allowed_without_safe_gate():
    # lower_bound=0 is a constant zero log-decay (no forgetting): legal, and the output is finite.
    o, _ = kda_ext.chunk_kda(**_args(), use_gate_in_kernel=True, lower_bound=0.0)
    assert torch.isfinite(o).all()


def test_cuda_tensors_without_cuda_kernels(monkeypatch):
    # A CPU-only build handed CUDA tensors says how to rebuild instead of a dispatcher error.
    monkeypatch.setattr(kda_ext.chunk, "_HAS_CUDA_KERNELS", False)
    with pytest.raises(RuntimeError, match="no CUDA kernels.*KDA_EXT_CUDA=1"):
        kda_ext.chunk._check_backend(torch.device("cuda"))
    kda_ext.chunk._check_backend(torch.device("cpu"))


def test_lower_bound_type():
    _raises(TypeError, "`lower_bound` must be a float", **_args(), lower_bound="-5")


# --- cu_seqlens -------------------------------------------------------------------------------

def test_cu_seqlens_dtype():
    a = _varlen_args()
    a["cu_seqlens"] = a["cu_seqlens"].float()
    _raises(TypeError, "`cu_seqlens` must be int32 or int64, got torch.float32", **a)


def test_cu_seqlens_rank():
    a = _varlen_args()
    a["cu_seqlens"] = a["cu_seqlens"].view(1, -1)
    _raises(ValueError, "`cu_seqlens` must be a 1-D tensor", **a)


def test_cu_seqlens_too_short():
    a = _varlen_args()
    a["cu_seqlens"] = torch.tensor([0])
    _raises(ValueError, "`cu_seqlens` must be a 1-D tensor of N \\+ 1 >= 2", **a)


def test_cu_seqlens_device():
    a = _varlen_args()
    a["cu_seqlens"] = a["cu_seqlens"].to("meta")
    _raises(ValueError, "`cu_seqlens` must be on cpu", **a)


def test_cu_seqlens_must_start_at_zero():
    _raises(ValueError, "`cu_seqlens` must start at 0, got 1", **_varlen_args((1, 5, 16)))


def test_cu_seqlens_must_end_at_T():
    _raises(ValueError, "`cu_seqlens` must end at the total length T=16.*got 15", **_varlen_args((0, 5, 15)))


def test_cu_seqlens_must_not_decrease():
    _raises(ValueError, "`cu_seqlens` must be non-decreasing, got 9 followed by 5", **_varlen_args((0, 9, 5, 16)))


def test_cu_seqlens_cpu_values_checked():
    a = _varlen_args()
    # Checked on the host copy, which here disagrees with the device tensor's (valid) values.
    _raises(ValueError, "`cu_seqlens_cpu` must end at the total length", **a, cu_seqlens_cpu=torch.tensor([0, 5, 12]))


def test_cu_seqlens_cpu_must_match():
    _raises(ValueError, "`cu_seqlens_cpu` must hold the values of `cu_seqlens`", **_varlen_args(),
            cu_seqlens_cpu=torch.tensor([0, 6, 16]))


def test_cu_seqlens_cpu_shape():
    _raises(ValueError, "`cu_seqlens_cpu` must have the shape of `cu_seqlens`", **_varlen_args(),
            cu_seqlens_cpu=torch.tensor([0, 16]))


def test_cu_seqlens_cpu_dtype():
    _raises(TypeError, "`cu_seqlens_cpu` must be int32 or int64", **_varlen_args(),
            cu_seqlens_cpu=torch.tensor([0.0, 5.0, 16.0]))


def test_cu_seqlens_cpu_device():
    _raises(ValueError, "`cu_seqlens_cpu` must be on the CPU", **_varlen_args(),
            cu_seqlens_cpu=torch.tensor([0, 5, 16], device="meta"))


def test_cu_seqlens_cpu_without_cu_seqlens():
    _raises(ValueError, "`cu_seqlens_cpu` was given without `cu_seqlens`", **_args(),
            cu_seqlens_cpu=torch.tensor([0, 16]))


# --- the ops' own checks (direct calls bypass chunk_kda) --------------------------------------

def _op_args(**over):
    a = _args()
    args = dict(q=a["q"], k=a["k"], v=a["v"], g=a["g"], beta=a["beta"], scale=0.1, initial_state=None,
                A_log=None, dt_bias=None, cu_seqlens=None, use_qk_l2norm=False, use_gate_in_kernel=False,
                use_beta_sigmoid=False, allow_neg_eigval=False, safe_gate=False, lower_bound=None,
                state_v_first=False, chunk_size=64, output_final_state=False, save_intermediates=False,
                return_states=False)
    args.update(over)
    return list(args.values())


@pytest.mark.parametrize("over,match", [
    (dict(chunk_size=16), "chunk_size must be 32 or 64"),
    (dict(g=torch.zeros(B, T, HV, K + 1)), "g must be"),
    (dict(initial_state=torch.zeros(B, HV, K, V, dtype=torch.float16)), "initial_state must be"),
    (dict(use_gate_in_kernel=True), "needs A_log"),
], ids=["chunk_size", "g", "h0", "A_log"])
def test_op_checks_real_and_fake(over, match):
    from torch._subclasses.fake_tensor import FakeTensorMode
    args = _op_args(**over)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.kda_ext.chunk_kda_fwd.default(*args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        with pytest.raises(RuntimeError, match=match):
            torch.ops.kda_ext.chunk_kda_fwd.default(*fake)


@pytest.mark.parametrize("bad", ["Aqk_shape", "w_dtype", "dht_shape"])
def test_backward_op_rejects_malformed_saved_tensors(bad):
    # The backward op is public (torch.ops.kda_ext.chunk_kda_bwd): the tensors handed back to it
    # are checked by name, shape and dtype, not trusted.
    a = _args()
    q, k, v, g, beta = a["q"], a["k"], a["v"], a["g"], a["beta"]
    fwd = torch.ops.kda_ext.chunk_kda_fwd(q, k, v, g, beta, K ** -0.5, None, None, None, None,
                                          False, False, False, False, False, None, False, 64,
                                          True, True, False)
    o, ht, Aqk, Akk, g_cum, w, u, qg, kg, v_new, h = fwd
    dht = torch.randn_like(ht)
    if bad == "Aqk_shape":
        Aqk, match = Aqk[:, :-1], "Aqk must have shape"
    elif bad == "w_dtype":
        w, match = w.double(), "w must be"
    else:
        dht, match = dht[:1], "dht must have shape"
    with pytest.raises(RuntimeError, match=match):
        torch.ops.kda_ext.chunk_kda_bwd(q, k, v, g, beta, K ** -0.5, None, None, None, None, Aqk, Akk,
                                        g_cum, w, u, qg, kg, v_new, h, torch.randn_like(o), dht,
                                        False, False, False, False, False, None, False, 64)

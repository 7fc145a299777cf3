# kda_ext.recurrent: fused_recurrent_kda, the decode drop-in for fla.ops.kda.fused_recurrent_kda.
"""The token-by-token KDA recurrence for decoding (forward only). It validates its arguments as
FLA's ``fused_recurrent_kda`` does (plus what a kernel needs), then calls the
``kda_ext::fused_recurrent_kda_fwd`` custom op, or ``kda_ext::fused_recurrent_kda_inplace`` when the
state is updated in place. No arithmetic happens here.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Optional, Tuple

import torch

from . import ops
from .chunk import (
    _check_backend,
    _check_device,
    _check_gate_param_numel,
    _check_no_fp64_on_gpu,
    _is_compiling,
    _require_tensor,
    _shape_error,
)

__all__ = ["fused_recurrent_kda"]

_FN = "fused_recurrent_kda"
_KNOWN_KWARGS = ("transpose_state_layout",)
_KEYWORD_ONLY = ("inplace_final_state", "ssm_state_indices", "num_accepted_tokens") + _KNOWN_KWARGS
_QKV_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_grad_not_requested(named) -> None:
    if not torch.is_grad_enabled():
        return
    wanting = [name for name, x in named if x is not None and x.requires_grad]
    if wanting:
        raise RuntimeError(
            f"{_FN}: kda_ext's recurrent kernel is forward-only (it has no backward), but "
            f"{', '.join('`' + n + '`' for n in wanting)} require(s) grad while grad mode is on. "
            "Call it under torch.no_grad() or torch.inference_mode() (decoding), detach the "
            "inputs, or use kda_ext.chunk_kda, which is differentiable, for training")


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    lower_bound: Optional[float] = None,
    state_v_first: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
    *,
    inplace_final_state: bool = False,
    ssm_state_indices: Optional[torch.Tensor] = None,
    num_accepted_tokens: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    r"""Kimi Delta Attention, token by token (decoding): a drop-in for
    ``fla.ops.kda.fused_recurrent_kda``. **Forward only**: there is no backward; a call with an
    input that requires grad while grad mode is on raises a ``RuntimeError`` (use
    :func:`kda_ext.chunk_kda` to train).

    Per value head, with state ``S`` (``[K, V]``), for each token::

        S <- Diag(exp(g_t)) S;  S <- S + beta_t k_t (v_t - S^T k_t)^T;  o_t = S^T (scale q_t)

    computed in fp32 (fp64 for fp64 inputs on the CPU) with the state held on chip across the
    sequence's tokens: each state element is read once and written once per call. Works under
    ``torch.compile(fullgraph=True)``.

    B batch, T time, H q/k heads, HV value heads (HV % H == 0; value head ``hv`` reads q/k head
    ``hv // (HV // H)``), K key dim (<= 256), V value dim (<= 256), N sequences (B, or
    ``len(cu_seqlens) - 1``), P state slots of a pool.

    ================================ ===================================== ======================
    argument                         shape / dtype                         meaning
    ================================ ===================================== ======================
    ``q``, ``k``                     ``[B, T, H, K]``; fp16/bf16/fp32      queries, keys
                                     (fp64 on CPU only); one dtype with v
    ``v``                            ``[B, T, HV, V]``                     values
    ``g``                            ``[B, T, HV, K]``, any float dtype    per-step log decay
                                                                           (<= 0), or raw gate
                                                                           logits with
                                                                           ``use_gate_in_kernel``
    ``beta``                         ``[B, T, HV]``, any float dtype       step size, or logits
                                                                           with
                                                                           ``use_beta_sigmoid_in_kernel``
    ``A_log``                        HV elements, float32                  in-kernel gate's decay
                                                                           rate (optional with
                                                                           ``lower_bound``)
    ``dt_bias``                      HV*K elements, float32, optional      in-kernel gate's bias
    ``scale``                        float, default ``K ** -0.5``          query scale
    ``initial_state``                ``[N, HV, K, V]`` (``[N, HV, V, K]``  initial state; with
                                     with ``state_v_first``) float32       ``ssm_state_indices``
                                     (float64 with float64 q); with        a pool ``[P, HV, ..]``
                                     ``ssm_state_indices`` ``[P, HV, ..]``
    ``output_final_state``           bool, False                           return the final state
    ``use_qk_l2norm_in_kernel``      bool, False                           ``x * rsqrt(sum x^2 +
                                                                           1e-6)`` on q and k
                                                                           (fp32, not rounded)
    ``use_gate_in_kernel``           bool, False                           ``-exp(A_log) *
                                                                           softplus(g + dt_bias)``
                                                                           or, with
                                                                           ``lower_bound``,
                                                                           ``lower_bound *
                                                                           sigmoid(exp(A_log) *
                                                                           (g + dt_bias))``
    ``use_beta_sigmoid_in_kernel``   bool, False                           ``beta = sigmoid(beta)``
    ``allow_neg_eigval``             bool, False (needs the flag above)    ``beta = 2 *
                                                                           sigmoid(beta)``
    ``lower_bound``                  float or None                         selects the lower-bound
                                                                           gate (finite, <= 0)
    ``state_v_first``                bool, False                           state layout ``[V, K]``
    ``cu_seqlens``                   ``[N + 1]`` int32/int64 on q's device packed sequences (B = 1);
                                                                           read on the device only
    kw ``inplace_final_state``       bool, False                           write the final state
                                                                           into ``initial_state``
                                                                           (its slots with
                                                                           ``ssm_state_indices``)
    kw ``ssm_state_indices``         ``[N]`` int32/int64 on q's device     state slot of each
                                                                           sequence in the pool
                                                                           ``initial_state``;
                                                                           negative: padding
    kw ``num_accepted_tokens``       must be None                          speculative decoding
                                                                           is not supported
    kw ``transpose_state_layout``    bool (deprecated, in ``**kwargs``)    alias of
                                                                           ``state_v_first``
    ================================ ===================================== ======================

    The positional order is FLA's public ``fused_recurrent_kda``; ``inplace_final_state``,
    ``ssm_state_indices`` and ``num_accepted_tokens`` are the serving extras of FLA's
    ``fused_recurrent_kda_fwd`` (keyword-only here). ``A_log``/``dt_bias`` are ignored unless
    ``use_gate_in_kernel``. An unknown keyword raises a ``TypeError`` (FLA ignores it).

    State slots (serving): with ``ssm_state_indices``, sequence ``n`` starts from
    ``initial_state[ssm_state_indices[n]]`` and, with ``inplace_final_state=True``, its final
    state is written back to that slot (no gather, no scatter; slots no sequence names are left
    untouched). Without ``inplace_final_state`` the final state is returned as a new
    ``[N, HV, ..]`` tensor and the pool is only read. A negative index marks a padding sequence:
    nothing is read or written for it and its outputs (and returned final state) are zero. Two
    sequences must not name the same slot. An index ``>= P`` raises an ``IndexError`` on the
    CPU; on a GPU checking it would need a device sync, so the kernel instead leaves the pool
    untouched for that sequence and writes NaN to its outputs (never reads or writes outside
    the pool). A state updated in place must be dense in its last three dims; its first dim may
    be strided (a view into a larger cache).

    ``cu_seqlens`` are not read on the host: no device sync. On the CPU they are validated; on a
    GPU the kernel clamps each sequence to ``[0, T)`` and outputs that no sequence covers read as
    zero.

    Nothing the caller passes is modified, except ``initial_state`` with
    ``inplace_final_state=True``.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, HV, V]`` in q's dtype; ``final_state`` is
        ``initial_state`` itself (updated) with ``inplace_final_state``, else a new
        ``[N, HV, K, V]`` (or ``[N, HV, V, K]``) float32 tensor (float64 for float64 q) when
        ``output_final_state``, else None.

    Raises:
        TypeError: a non-tensor input, a wrong dtype, float64 on a GPU, an unknown keyword.
        ValueError: a wrong shape, device or flag combination.
        NotImplementedError: ``num_accepted_tokens`` (speculative decoding), per-value beta.
        RuntimeError: an input requires grad while grad mode is on.
        IndexError: (CPU) an ``ssm_state_indices`` entry ``>= P``.
    """
    unknown = [name for name in kwargs if name not in _KNOWN_KWARGS]
    if unknown:
        raise TypeError(
            f"{_FN}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"the keyword-only extras are {', '.join(_KEYWORD_ONLY)}")
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError(
                f"{_FN}: `transpose_state_layout` is a deprecated alias of `state_v_first`; "
                "pass only `state_v_first` (both were given)")
        if not _is_compiling():
            warnings.warn(f"{_FN}: `transpose_state_layout` is deprecated, use `state_v_first` "
                          "instead", DeprecationWarning, stacklevel=2)
        state_v_first = bool(kwargs["transpose_state_layout"])
    if num_accepted_tokens is not None:
        raise NotImplementedError(
            f"{_FN}: speculative decoding (`num_accepted_tokens`) is not supported by kda_ext; "
            "pass num_accepted_tokens=None")
    for x, name in ((q, "q"), (k, "k"), (v, "v"), (g, "g"), (beta, "beta")):
        _require_tensor(x, name, _FN)
    for flag, name in ((output_final_state, "output_final_state"),
                       (inplace_final_state, "inplace_final_state")):
        if not isinstance(flag, bool):
            raise TypeError(f"{_FN}: `{name}` must be a bool, got {flag!r}")

    if q.dim() != 4:
        raise ValueError(f"{_FN}: `q` must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if lower_bound is not None and (
            isinstance(lower_bound, bool) or not isinstance(lower_bound, numbers.Real)):
        raise TypeError(f"{_FN}: `lower_bound` must be a float or None, got {lower_bound!r}")
    indexed = ssm_state_indices is not None
    if cu_seqlens is not None:
        _require_tensor(cu_seqlens, "cu_seqlens", _FN)
        if B != 1:
            raise ValueError(
                f"{_FN}: the batch size is expected to be 1 rather than {B} when using "
                "`cu_seqlens`; flatten the variable-length inputs into one sequence before "
                "processing")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"{_FN}: `cu_seqlens` must be a 1-D tensor of N + 1 >= 2 offsets, got shape "
                f"{tuple(cu_seqlens.shape)}")
        N = cu_seqlens.shape[0] - 1
    else:
        N = B
    if initial_state is not None:
        _require_tensor(initial_state, "initial_state", _FN)
    if inplace_final_state and initial_state is None:
        raise ValueError(
            f"{_FN}: `inplace_final_state=True` writes the final state into `initial_state`, "
            "which must then be given")
    if indexed:
        _require_tensor(ssm_state_indices, "ssm_state_indices", _FN)
        if initial_state is None:
            raise ValueError(
                f"{_FN}: `ssm_state_indices` index a state pool, which must be passed as "
                "`initial_state` ([P, HV, K, V])")
        if ssm_state_indices.dim() != 1 or ssm_state_indices.shape[0] != N:
            raise ValueError(
                f"{_FN}: `ssm_state_indices` must be [N] = [{N}] (one state slot per sequence"
                f"{'; per-token slots for speculative decoding are not supported' if ssm_state_indices.dim() == 2 else ''}"
                f"), got shape {tuple(ssm_state_indices.shape)}")
        if ssm_state_indices.dtype not in _INDEX_DTYPES:
            raise TypeError(
                f"{_FN}: `ssm_state_indices` must be int32 or int64, got {ssm_state_indices.dtype}")

    if not use_gate_in_kernel:
        A_log = dt_bias = None  # FLA ignores them without the in-kernel gate
    elif A_log is None and lower_bound is None:
        raise ValueError(
            f"{_FN}: `A_log` must be provided when `use_gate_in_kernel=True` "
            "(it may only be omitted together with a `lower_bound`)")
    if use_gate_in_kernel and lower_bound is not None and not (-float("inf") < lower_bound <= 0):
        raise ValueError(
            f"{_FN}: `lower_bound` must be a finite value <= 0 (the in-kernel gate "
            f"lower_bound * sigmoid(...) is a log-decay), got {lower_bound}")
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError(
            f"{_FN}: `allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True` "
            "(beta = 2 * sigmoid(beta) is computed in the kernel)")

    if k.shape != q.shape:
        raise ValueError(f"{_FN}: `k` must have the shape of `q` {tuple(q.shape)}, got {tuple(k.shape)}")
    if not 0 < K <= 256:
        raise ValueError(f"{_FN}: only key head dims 1 <= K <= 256 are supported, got K={K}")
    if v.dim() != 4 or v.shape[0] != B or v.shape[1] != T:
        raise ValueError(f"{_FN}: `v` must be [B={B}, T={T}, HV, V], got shape {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if H == 0 or HV == 0 or HV % H != 0:
        raise ValueError(
            f"{_FN}: the value heads HV={HV} (v.shape[2]) must be a positive multiple of the "
            f"q/k heads H={H} (q.shape[2])")
    if not 0 < V <= 256:
        raise ValueError(f"{_FN}: only value head dims 1 <= V <= 256 are supported, got V={V}")
    if tuple(g.shape) != (B, T, HV, K):
        raise _shape_error("g", (B, T, HV, K), "[B, T, HV, K]", g, _FN)
    if beta.dim() == 4 and tuple(beta.shape) == (B, T, HV, V):
        raise NotImplementedError(
            f"{_FN}: a per-value beta [B, T, HV, V] is not supported by kda_ext; pass beta as "
            "[B, T, HV]")
    if tuple(beta.shape) != (B, T, HV):
        raise _shape_error("beta", (B, T, HV), "[B, T, HV]", beta, _FN)

    if q.dtype not in _QKV_DTYPES:
        raise TypeError(f"{_FN}: `q` must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"{_FN}: `q`, `k` and `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for x, name in ((g, "g"), (beta, "beta")):
        if x.dtype not in _QKV_DTYPES:
            raise TypeError(
                f"{_FN}: `{name}` must be a float16, bfloat16, float32 or float64 tensor, "
                f"got {x.dtype}")
    device = q.device
    _check_backend(device, _FN)
    for x, name in ((k, "k"), (v, "v"), (g, "g"), (beta, "beta")):
        _check_device(x, name, device, _FN)
    for x, name in ((q, "q"), (g, "g"), (beta, "beta")):
        _check_no_fp64_on_gpu(x, name, _FN)

    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if initial_state is not None:
        _check_device(initial_state, "initial_state", device, _FN)
        if initial_state.dtype != state_dtype:
            raise TypeError(
                f"{_FN}: `initial_state` must be {state_dtype}"
                f"{' (q is float64)' if state_dtype == torch.float64 else ''}, "
                f"got {initial_state.dtype}")
        r, c = (V, K) if state_v_first else (K, V)
        layout = "V, K" if state_v_first else "K, V"
        if indexed:
            if initial_state.dim() != 4 or tuple(initial_state.shape[1:]) != (HV, r, c):
                raise ValueError(
                    f"{_FN}: `initial_state` (the state pool of `ssm_state_indices`) must be "
                    f"[P, HV, {layout}] = [P, {HV}, {r}, {c}], got {list(initial_state.shape)}")
        elif tuple(initial_state.shape) != (N, HV, r, c):
            raise ValueError(
                f"{_FN}: `initial_state` must be [N, HV, {layout}] = {[N, HV, r, c]}, got "
                f"{list(initial_state.shape)}")
        if inplace_final_state:
            dense = (initial_state.stride(3) == 1 and initial_state.stride(2) == c
                     and initial_state.stride(1) == r * c)
            if not dense:
                raise ValueError(
                    f"{_FN}: a state updated in place (`inplace_final_state=True`) must be dense "
                    f"in its last three dims (strides [*, {r * c}, {c}, 1]), got strides "
                    f"{list(initial_state.stride())}")
            if initial_state.shape[0] > 1 and initial_state.stride(0) < HV * r * c:
                raise ValueError(
                    f"{_FN}: the slots of a state updated in place must not overlap: "
                    f"`initial_state.stride(0)` must be >= {HV * r * c}, got "
                    f"{initial_state.stride(0)}")
    if cu_seqlens is not None:
        if cu_seqlens.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{_FN}: `cu_seqlens` must be int32 or int64, got {cu_seqlens.dtype}")
        _check_device(cu_seqlens, "cu_seqlens", device, _FN)
    if indexed:
        _check_device(ssm_state_indices, "ssm_state_indices", device, _FN)
        if ssm_state_indices.device.type == "cpu" and not _is_compiling() and N > 0:
            # Free on the CPU (no device sync); the kernel checks again.
            top = int(ssm_state_indices.max())
            if top >= initial_state.shape[0]:
                raise IndexError(
                    f"{_FN}: `ssm_state_indices` holds {top}, out of range for a state pool of "
                    f"{initial_state.shape[0]} slots (initial_state.shape[0]); negative values "
                    "mark padding")

    for x, name in ((A_log, "A_log"), (dt_bias, "dt_bias")):
        if x is None:
            continue
        _require_tensor(x, name, _FN)
        _check_gate_param_numel(x, name, 1 if name == "A_log" else K,
                                "HV" if name == "A_log" else "HV*K", T, HV, _FN)
        allowed = (torch.float32,) if state_dtype == torch.float32 else (torch.float32, torch.float64)
        if x.dtype not in allowed:
            raise TypeError(f"{_FN}: `{name}` must be {' or '.join(map(str, allowed))}, got {x.dtype}")
        _check_device(x, name, device, _FN)

    if lower_bound is not None:
        lower_bound = float(lower_bound)
    if scale is None:
        scale = K ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{_FN}: `scale` must be a float or None, got {scale!r}")
    scale = float(scale)

    _check_grad_not_requested([("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta),
                               ("A_log", A_log), ("dt_bias", dt_bias),
                               ("initial_state", initial_state)])

    flags = (bool(use_qk_l2norm_in_kernel), bool(use_gate_in_kernel),
             bool(use_beta_sigmoid_in_kernel), bool(allow_neg_eigval), lower_bound,
             bool(state_v_first))
    if inplace_final_state:
        o = ops.fused_recurrent_kda_inplace(q, k, v, g, beta, scale, initial_state, A_log, dt_bias,
                                            cu_seqlens, ssm_state_indices, *flags)
        return o, initial_state
    o, final_state = ops.fused_recurrent_kda_fwd(
        q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens, ssm_state_indices,
        *flags, bool(output_final_state))
    return o, (final_state if output_final_state else None)

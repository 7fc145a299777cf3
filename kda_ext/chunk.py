# kda_ext.chunk: chunk_kda, the drop-in for fla.ops.kda.chunk_kda (signature, defaults, validation).
"""The public entry point. It validates its arguments as FLA's ``chunk_kda`` does (plus the checks
a kernel needs), then calls the ``kda_ext::chunk_kda_fwd`` custom op, whose autograd formula is
registered in :mod:`kda_ext.ops`. No arithmetic happens here.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import _dispatch, cp, ops, segments

__all__ = ["chunk_kda"]

# Keyword arguments accepted only through **kwargs: FLA's deprecated alias stays out of the signature.
_KNOWN_KWARGS = ("transpose_state_layout",)
_KEYWORD_ONLY = ("A_log", "dt_bias", "chunk_size", "check_inputs") + _KNOWN_KWARGS
_CHECK_INPUTS_ENV = "KDA_EXT_CHECK_INPUTS"
_QKV_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_DTYPES = _QKV_DTYPES
_INDEX_DTYPES = (torch.int32, torch.int64)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _with_sm90() -> bool:
    global _WITH_SM90
    if _WITH_SM90 is None:
        from ._build_info import load_build_config
        _WITH_SM90 = bool((load_build_config() or {}).get("WITH_SM90"))
    return _WITH_SM90


_WITH_SM90: Optional[bool] = None


_NUM_SMS: Dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def _fused_forward(q, k, v, g, beta, initial_state, A_log, dt_bias, num_seqs, gate_variant) -> bool:
    """Whether this call runs the fused Hopper forward (_dispatch.fused_forward_applies): only
    when no gradient is wanted, since it saves nothing for a backward."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, initial_state, A_log, dt_bias))
    return _dispatch.fused_forward_applies(
        device=q.device, dtype=q.dtype, K=q.shape[-1], V=v.shape[-1], needs_grad=needs_grad,
        with_sm90=_with_sm90(), gate_variant=gate_variant, num_seqs=num_seqs, HV=v.shape[2],
        total_tokens=q.shape[0] * q.shape[1], num_sms=_num_sms(q.device) if q.device.type == "cuda" else 132)


def _require_tensor(x: Any, name: str, fn: str = "chunk_kda") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {type(x).__name__}")


def _check_device(x: torch.Tensor, name: str, device: torch.device, fn: str = "chunk_kda") -> None:
    if x.device != device:
        raise ValueError(
            f"{fn}: `{name}` must be on {device} (the device of `q`), got {x.device}")


def _check_backend(device: torch.device, fn: str = "chunk_kda") -> None:
    """A clear error, instead of the dispatcher's, when this build has no kernel for the device."""
    if device.type not in ("cuda", "cpu", "meta"):
        raise NotImplementedError(
            f"{fn}: kda_ext has CPU and CUDA kernels only, got tensors on {device}")
    if device.type == "cuda" and not _HAS_CUDA_KERNELS:
        raise RuntimeError(
            f"{fn}: got CUDA tensors, but this build of kda_ext has no CUDA kernels "
            "(built with KDA_EXT_CUDA=0, or without nvcc or a CUDA build of torch); rebuild with "
            "KDA_EXT_CUDA=1, e.g. `KDA_EXT_CUDA=1 pip install --no-build-isolation .`")


def _probe_cuda_kernels() -> bool:
    try:
        from ._build_config import WITH_CUDA  # written by setup.py
    except ImportError:
        WITH_CUDA = False
    # The build's own record wins; the dispatcher is asked only when the build says "no CUDA".
    return bool(WITH_CUDA) or torch._C._dispatch_has_kernel_for_dispatch_key(
        "kda_ext::chunk_kda_fwd", "CUDA")


# Read once at import (kda_ext._C is loaded by then), so torch.compile sees a constant.
_HAS_CUDA_KERNELS = _probe_cuda_kernels()


def _check_no_fp64_on_gpu(x: torch.Tensor, name: str, fn: str = "chunk_kda") -> None:
    if x.dtype == torch.float64 and x.device.type != "cpu":
        raise TypeError(
            f"{fn}: `{name}` is float64, which only the CPU backend supports "
            f"(got a float64 tensor on {x.device}); use float32, float16 or bfloat16")


def _check_offsets(bounds: list, T: int, name: str) -> None:
    if bounds[0] != 0:
        raise ValueError(f"chunk_kda: `{name}` must start at 0, got {bounds[0]}")
    if bounds[-1] != T:
        raise ValueError(
            f"chunk_kda: `{name}` must end at the total length T={T} (q.shape[1]), got {bounds[-1]}")
    for i in range(len(bounds) - 1):
        if bounds[i + 1] < bounds[i]:
            raise ValueError(
                f"chunk_kda: `{name}` must be non-decreasing, got {bounds[i]} followed by "
                f"{bounds[i + 1]} at position {i}")


def _exact_num_chunks(bounds: list, BT: int) -> int:
    return sum((b - a + BT - 1) // BT for a, b in zip(bounds[:-1], bounds[1:]))


# --- layout mix-ups: [B, H, T, ...] (head-first) handed where [B, T, H, ...] is expected --------

_TRANSPOSE_HINT = ("kda_ext expects time before heads ([B, T, H, ...]); transpose head-first "
                   "tensors with x.transpose(1, 2)")


def _axes_1_2_swapped(shape: Tuple[int, ...], expected: Tuple[int, ...]) -> bool:
    """True when `shape` is `expected` with its time and head axes exchanged (and they differ)."""
    return (len(shape) == len(expected) >= 3 and expected[1] != expected[2]
            and shape[0] == expected[0] and shape[1] == expected[2] and shape[2] == expected[1]
            and shape[3:] == expected[3:])


def _shape_error(name: str, expected: Tuple[int, ...], layout: str, got: torch.Tensor,
                 fn: str = "chunk_kda") -> ValueError:
    message = f"{fn}: `{name}` must be {list(expected)} ({layout}), got {list(got.shape)}"
    if _axes_1_2_swapped(tuple(got.shape), expected):
        message += f"; it looks head-first (axes 1 and 2 swapped): {_TRANSPOSE_HINT}"
    return ValueError(message)


def _warn_if_time_looks_like_heads(T: int, H: int, shape: Tuple[int, ...]) -> None:
    # FLA's heuristic (it warned when q.shape[1] < q.shape[2]): fewer time steps than heads is
    # rare in training and is what a head-first tensor looks like. A warning, not an error: a
    # short legitimate input (T=1 decoding with many heads) looks the same. Not while tracing:
    # Dynamo cannot trace warnings.warn, and under fullgraph=True that would be an error.
    if T < H and not _is_compiling():
        warnings.warn(
            f"chunk_kda: `q` has shape {list(shape)}, read as [B, T, H, K] with T={T} time steps "
            f"and H={H} heads (fewer steps than heads). If q, k, v, g and beta are head-first "
            f"[B, H, T, ...], this is a layout mix-up and the result is wrong: {_TRANSPOSE_HINT}",
            UserWarning, stacklevel=3)


def _check_gate_param_numel(x: torch.Tensor, name: str, per_head: int, what: str,
                            T: int, HV: int, fn: str = "chunk_kda") -> None:
    numel = HV * per_head
    if x.numel() == numel:
        return
    message = (f"{fn}: `{name}` must have {what}={numel} elements, got {x.numel()} "
               f"(shape {tuple(x.shape)})")
    if T != HV and x.numel() == T * per_head:
        # The parameter is sized for the head count, which head-first inputs put on axis 1.
        message += (f"; that is {'T' if per_head == 1 else 'T*K'}={x.numel()} with T={T} read from "
                    f"q.shape[1], so `{name}` is probably right and q, k, v, g, beta are "
                    f"head-first [B, H, T, ...]: {_TRANSPOSE_HINT}")
    raise ValueError(message)


# --- opt-in value checks (check_inputs=True or KDA_EXT_CHECK_INPUTS=1) ------------------------

def _check_inputs_from_env() -> bool:
    value = os.environ.get(_CHECK_INPUTS_ENV, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise ValueError(f"{_CHECK_INPUTS_ENV} must be 0 or 1 (or unset), got {value!r}")


def _describe_position(index: Tuple[int, ...], axes: Tuple[str, ...], bounds: Optional[list]) -> str:
    where = ", ".join(f"{axis} {i}" for axis, i in zip(axes, index))
    if bounds is not None and len(axes) >= 2 and axes[1] == "time":
        # Packed sequences: also say which sequence the token belongs to.
        t = index[1]
        for n in range(len(bounds) - 1):
            if bounds[n] <= t < bounds[n + 1]:
                where += f" (sequence {n}, its step {t - bounds[n]})"
                break
    return where


def _first_position(mask: torch.Tensor) -> Tuple[int, ...]:
    # nonzero lists indices in row-major order: its first row is the first offending element.
    return tuple(int(i) for i in torch.nonzero(mask)[0].tolist())


def _check_input_values(named: list, g: torch.Tensor, use_gate_in_kernel: bool,
                        bounds: Optional[list]) -> None:
    """Raise on NaN/inf in any input and on g > 0 when g is a log-decay. Every test here reads
    the data back to the host (a device sync), which is why it runs only when asked for."""
    for name, x, axes in named:
        if x is None:
            continue
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            index = _first_position(bad)
            raise ValueError(
                f"chunk_kda: `{name}` must be finite; {int(bad.sum())} element(s) are not, the "
                f"first at {_describe_position(index, axes, bounds)}: {name}{list(index)} = "
                f"{x[index].item()}")
    if not use_gate_in_kernel:
        positive = g > 0
        if bool(positive.any()):
            index = _first_position(positive)
            raise ValueError(
                "chunk_kda: `g` is a per-step log-decay and must be <= 0 when "
                f"use_gate_in_kernel=False (exp(g) > 1 makes the state grow until it overflows); "
                f"{int(positive.sum())} element(s) are positive, the first at "
                f"{_describe_position(index, ('batch', 'time', 'head', 'channel'), bounds)}: "
                f"g{list(index)} = {g[index].item()}. Pass raw gate logits with "
                "use_gate_in_kernel=True, or make g a log-decay (e.g. F.logsigmoid(x))")


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    safe_gate: bool = False,
    lower_bound: Optional[float] = None,
    disable_recompute: bool = False,
    return_intermediate_states: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
    cu_seqlens_cpu: Optional[torch.LongTensor] = None,
    cp_context: Any = None,
    *,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    check_inputs: bool = False,
    **kwargs: Any,
) -> Union[Tuple[torch.Tensor, Optional[torch.Tensor]],
           Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]]:
    r"""Kimi Delta Attention, chunked: a drop-in for ``fla.ops.kda.chunk_kda``.

    Per value head, with state ``S`` (``[K, V]``): ``S <- Diag(exp(g_t)) S``,
    ``S <- S + beta_t k_t (v_t - S^T k_t)^T``, ``o_t = S^T (scale q_t)``; computed chunk-wise,
    forward and backward, by the ``kda_ext`` custom ops (CPU and CUDA). Works under
    ``torch.compile(fullgraph=True)``.

    B batch, T time, H q/k heads, HV value heads (HV % H == 0; value head ``hv`` reads q/k head
    ``hv // (HV // H)``), K key dim (<= 256), V value dim (<= 256), N sequences (B, or
    ``len(cu_seqlens) - 1``), BT the chunk size.

    ============================== ===================================== =====================
    argument                       shape / dtype                         meaning
    ============================== ===================================== =====================
    ``q``, ``k``                   ``[B, T, H, K]``; fp16/bf16/fp32      queries, keys
                                   (fp64 on CPU only); one dtype with v
    ``v``                          ``[B, T, HV, V]``                     values
    ``g``                          ``[B, T, HV, K]``, any float dtype    per-step log decay
                                                                         (must be <= 0: g > 0
                                                                         gives inf/NaN), or raw
                                                                         gate
                                                                         logits with
                                                                         ``use_gate_in_kernel``
    ``beta``                       ``[B, T, HV]``, any float dtype       delta-rule step size,
                                                                         or logits with
                                                                         ``use_beta_sigmoid_in_kernel``
    ``scale``                      float, default ``K ** -0.5``          query scale
    ``initial_state``              ``[N, HV, K, V]`` (``[N, HV, V, K]``  initial state
                                   with ``state_v_first``); float32
                                   (float64 when q is float64)
    ``output_final_state``         bool, False                           also return the final
                                                                         state
    ``use_qk_l2norm_in_kernel``    bool, False                           ``x * rsqrt(sum x^2 +
                                                                         1e-6)`` on q and k
    ``use_gate_in_kernel``         bool, False                           gate from raw g:
                                                                         ``-exp(A_log) *
                                                                         softplus(g + dt_bias)``,
                                                                         or ``lower_bound *
                                                                         sigmoid(exp(A_log) *
                                                                         (g + dt_bias))``
    ``use_beta_sigmoid_in_kernel`` bool, False                           ``beta = sigmoid(beta)``
    ``allow_neg_eigval``           bool, False (needs the flag above)    ``beta = 2 *
                                                                         sigmoid(beta)``
    ``safe_gate``                  bool, False                           faster diagonal blocks;
                                                                         the per-step gate must
                                                                         be >= ``lower_bound``
                                                                         >= -5
    ``lower_bound``                float or None                         selects the lower-bound
                                                                         gate; in [-5, 0) with
                                                                         ``safe_gate`` and the
                                                                         in-kernel gate
    ``disable_recompute``          bool, False                           save every forward
                                                                         intermediate instead of
                                                                         recomputing it in the
                                                                         backward (same grads)
    ``return_intermediate_states`` bool, False (inference mode only)     also return ``h``
    ``state_v_first``              bool, False                           state layout ``[V, K]``
    ``cu_seqlens``                 ``[N + 1]`` int32/int64 on q's device packed sequences (B = 1)
    ``cu_seqlens_cpu``             ``[N + 1]`` int on the CPU            host copy of cu_seqlens
                                                                         (validation and ``h``
                                                                         slicing without a sync)
    ``cp_context``                 from ``kda_ext.build_cp_context``     context parallelism:
                                   (or FLA's ``FLACPContext``,           q..beta hold this
                                   contiguous layout)                    rank's share [1, T_local,
                                                                         ...]; the context's
                                                                         offsets replace
                                                                         cu_seqlens; no
                                                                         initial/final state
                                                                         (kda_ext/cp.py)
    kw ``A_log``                   HV elements, float32 (float64 with    gate decay rate (in-
                                   float64 q)                            kernel gate; optional
                                                                         with ``lower_bound``)
    kw ``dt_bias``                 HV*K elements, float32 (or float64)   gate bias, optional
    kw ``chunk_size``              32 or 64, default 64                  BT
    kw ``check_inputs``            bool, False                           read the inputs back and
                                                                         raise on NaN/inf and on
                                                                         g > 0 (see below)
    kw ``transpose_state_layout``  bool (deprecated, in ``**kwargs``)    alias of
                                                                         ``state_v_first``
    ============================== ===================================== =====================

    Everything after ``cp_context`` is keyword-only; the positional order up to ``cp_context`` is
    FLA's. FLA takes ``A_log``, ``dt_bias`` and ``chunk_size`` through ``**kwargs``; passing them
    by keyword works with both. Unlike FLA, which silently ignores unknown keyword arguments, an
    unknown keyword raises a ``TypeError`` naming it (a typo such as ``dt_bais=`` would otherwise
    silently drop the bias). ``A_log``/``dt_bias`` are ignored unless ``use_gate_in_kernel``.
    Inputs may have any strides; none of them is modified.

    Layout: ``q``, ``k``, ``v``, ``g`` and ``beta`` are time-major (``[B, T, ...]``). When ``q`` has fewer time steps than
    heads (T < H), a ``UserWarning`` says that the inputs may be head-first ``[B, H, T, ...]``
    (FLA's heuristic; not emitted while ``torch.compile`` traces). Shapes that point to
    a head-first tensor (``g``/``beta`` with axes 1 and 2 swapped, ``A_log`` with T elements
    instead of HV) raise a ``ValueError`` that suggests ``x.transpose(1, 2)``.

    Gate contract: with ``use_gate_in_kernel=False``, ``g`` is the log of the per-step decay and
    must be <= 0. Positive entries are not rejected by default (that needs a device sync): the
    state grows as ``exp(sum g)`` and the output becomes inf/NaN. ``check_inputs=True``, or the
    environment variable ``KDA_EXT_CHECK_INPUTS=1``, reads the inputs back to the host (device
    syncs) and raises a ``ValueError`` naming the first positive ``g`` element (batch, time,
    head, channel and value) or the first NaN/inf element of any input. The check runs in eager
    mode only; while ``torch.compile`` traces, it is skipped (it would break the graph). Off by
    default: without it no device tensor is read back to the host (the one exception is the
    chunk count of ``return_intermediate_states`` below).

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, HV, V]`` in q's dtype; ``final_state``
        ``[N, HV, K, V]`` (or ``[N, HV, V, K]``) in float32 (float64 for float64 q), or None.
        With ``return_intermediate_states``: ``(o, final_state, h)``, ``h`` ``[B, NT, HV, K, V]``
        (or ``..., V, K]``) in k's dtype, the state entering each chunk; with ``cu_seqlens``,
        B = 1 and NT is the exact chunk count over all sequences (read from ``cu_seqlens_cpu``
        when given, otherwise from ``cu_seqlens``, which then costs a device sync).

    Raises:
        TypeError: a non-tensor input, a wrong dtype, float64 on a GPU, an unknown keyword.
        ValueError: a wrong shape, device or flag combination (messages name the argument, the
            expectation and the given value); with ``check_inputs``, NaN/inf or g > 0.
        RuntimeError: ``cp_context`` without an initialised process group.
    """
    # --- keyword arguments FLA only accepts through **kwargs ----------------------------------
    unknown = [name for name in kwargs if name not in _KNOWN_KWARGS]
    if unknown:
        raise TypeError(
            f"chunk_kda() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"the keyword-only extras are {', '.join(_KEYWORD_ONLY)}")
    if not isinstance(check_inputs, bool):
        raise TypeError(f"chunk_kda: `check_inputs` must be a bool, got {check_inputs!r}")
    for x, name in ((q, "q"), (k, "k"), (v, "v"), (g, "g"), (beta, "beta")):
        _require_tensor(x, name)

    # --- FLA's checks, in FLA's order ---------------------------------------------------------
    if "transpose_state_layout" in kwargs:
        transpose_state_layout = kwargs["transpose_state_layout"]
        if state_v_first:
            raise ValueError(
                "chunk_kda: `transpose_state_layout` is a deprecated alias of `state_v_first`; "
                "pass only `state_v_first` (both were given)")
        warnings.warn(
            "chunk_kda: `transpose_state_layout` is deprecated, use `state_v_first` instead",
            DeprecationWarning, stacklevel=2)
        state_v_first = bool(transpose_state_layout)

    cp_plan = None
    if cp_context is not None:
        # FLA's rules: the context's local offsets replace cu_seqlens; no state in or out (the
        # states at the rank boundaries are the context's business).
        if initial_state is not None:
            raise ValueError(
                "chunk_kda: `initial_state` is not supported with `cp_context` (the entry state of "
                "each rank's first sequence comes from the earlier ranks); pass initial_state=None")
        if output_final_state:
            raise ValueError(
                "chunk_kda: `output_final_state=True` is not supported with `cp_context`; pass "
                "output_final_state=False")
        if return_intermediate_states:
            raise ValueError(
                "chunk_kda: `return_intermediate_states=True` is not supported with `cp_context`")
        cp_plan = cp.read_context(cp_context, q.device, _is_compiling())
        if cu_seqlens is not None and cu_seqlens is not cp_plan.cu_seqlens:
            same = (tuple(cu_seqlens.shape) == tuple(cp_plan.cu_seqlens.shape) and (
                cu_seqlens.device.type != "cpu" or _is_compiling()
                or torch.equal(cu_seqlens.to(torch.int64), cp_plan.cu_seqlens.to(torch.int64))))
            if not same:
                raise ValueError(
                    "chunk_kda: `cu_seqlens` must be None (or the context's local offsets) with "
                    f"`cp_context`, whose local offsets replace it; got {cu_seqlens.tolist()} and "
                    f"cp_context.cu_seqlens {cp_plan.cu_seqlens.tolist()}")
        cu_seqlens, cu_seqlens_cpu = cp_plan.cu_seqlens, cp_plan.cu_seqlens_cpu
        if q.dim() != 4 or q.shape[0] != 1:
            raise ValueError(
                "chunk_kda: with `cp_context`, q must be this rank's tokens [1, T_local, H, K], got "
                f"shape {tuple(q.shape)}")
        if not _is_compiling() and cu_seqlens_cpu is not None and int(cu_seqlens_cpu[-1]) != q.shape[1]:
            raise ValueError(
                f"chunk_kda: `cp_context` holds {int(cu_seqlens_cpu[-1])} tokens on this rank "
                f"(cu_seqlens_cpu[-1]) but q has T_local={q.shape[1]} (q.shape[1])")

    if q.dim() != 4:
        raise ValueError(f"chunk_kda: `q` must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    _warn_if_time_looks_like_heads(T, H, tuple(q.shape))
    if lower_bound is not None and (
            isinstance(lower_bound, bool) or not isinstance(lower_bound, numbers.Real)):
        raise TypeError(f"chunk_kda: `lower_bound` must be a float or None, got {lower_bound!r}")
    if cu_seqlens is not None:
        _require_tensor(cu_seqlens, "cu_seqlens")
        if B != 1:
            raise ValueError(
                f"chunk_kda: the batch size is expected to be 1 rather than {B} when using "
                "`cu_seqlens`; flatten the variable-length inputs into one sequence before "
                "processing")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                "chunk_kda: `cu_seqlens` must be a 1-D tensor of N + 1 >= 2 offsets, got shape "
                f"{tuple(cu_seqlens.shape)}")
        N = cu_seqlens.shape[0] - 1
        if initial_state is not None:
            _require_tensor(initial_state, "initial_state")
            if initial_state.dim() < 1 or initial_state.shape[0] != N:
                raise ValueError(
                    f"chunk_kda: the number of initial states is expected to equal the number "
                    f"of input sequences, {N} (len(cu_seqlens) - 1), got "
                    f"{initial_state.shape[0] if initial_state.dim() else 'a 0-d tensor'}")
    else:
        N = B

    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if initial_state is not None:
        _require_tensor(initial_state, "initial_state")
        if initial_state.dtype != state_dtype:
            raise TypeError(
                f"chunk_kda: `initial_state` must be {state_dtype}"
                f"{' (q is float64)' if state_dtype == torch.float64 else ''}, "
                f"got {initial_state.dtype}")

    if not use_gate_in_kernel:
        A_log = dt_bias = None  # FLA ignores them without the in-kernel gate
    elif A_log is None and lower_bound is None:
        raise ValueError(
            "chunk_kda: `A_log` must be provided when `use_gate_in_kernel=True` "
            "(it may only be omitted together with a `lower_bound`)")

    if isinstance(chunk_size, bool) or chunk_size not in (32, 64):
        raise ValueError(f"chunk_kda: `chunk_size` must be either 32 or 64 for KDA, got {chunk_size!r}")

    if safe_gate and use_gate_in_kernel:
        if lower_bound is None:
            raise ValueError(
                "chunk_kda: `lower_bound` must be given when `safe_gate=True` and "
                "`use_gate_in_kernel=True` (e.g. lower_bound=-5.0)")
        if not (-5 <= lower_bound < 0):
            raise ValueError(
                "chunk_kda: `lower_bound` must be in the safe range [-5, 0) with `safe_gate`, "
                f"got {lower_bound}")
    if use_gate_in_kernel and lower_bound is not None and not (-math.inf < lower_bound <= 0):
        # FLA does not check this. The gate lower_bound * sigmoid(.) is a per-step log-decay and
        # must be <= 0: a positive (or non-finite) bound makes the state grow without limit, and the
        # result is inf/NaN rather than an error. We refuse it instead.
        raise ValueError(
            "chunk_kda: `lower_bound` must be a finite value <= 0 (the in-kernel gate "
            f"lower_bound * sigmoid(...) is a log-decay), got {lower_bound}")

    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError(
            "chunk_kda: `allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True` "
            "(beta = 2 * sigmoid(beta) is computed in the kernel)")

    if k.shape != q.shape:
        hint = ""
        if _axes_1_2_swapped(tuple(k.shape), tuple(q.shape)):
            hint = (f"; their axes 1 and 2 are swapped, so one of them is head-first: "
                    f"{_TRANSPOSE_HINT}")
        raise ValueError(
            f"chunk_kda: `k` must have the shape of `q` {tuple(q.shape)}, got {tuple(k.shape)}"
            f"{hint}")
    if not 0 < K <= 256:
        raise ValueError(
            f"chunk_kda: currently only key head dims 1 <= K <= 256 are supported for KDA, got K={K}")
    if v.dim() != 4 or v.shape[0] != B or v.shape[1] != T:
        hint = ""
        if v.dim() == 4 and v.shape[0] == B and v.shape[2] == T:
            hint = f"; it looks head-first [B, HV, T, V]: {_TRANSPOSE_HINT}"
        elif v.dim() == 4 and v.shape[0] == B and v.shape[2] == H:
            # q's axis 2 and v's axis 2 agree while axis 1 does not: both carry time on axis 2.
            hint = (f"; v.shape[2] equals q.shape[2]={H}, as when q, k, v are all head-first "
                    f"[B, H, T, ...]: {_TRANSPOSE_HINT}")
        raise ValueError(
            f"chunk_kda: `v` must be [B={B}, T={T}, HV, V], got shape {tuple(v.shape)}{hint}")
    HV, V = v.shape[2], v.shape[3]
    if H == 0 or HV == 0 or HV % H != 0:
        raise ValueError(
            f"chunk_kda: the value heads HV={HV} (v.shape[2]) must be a positive multiple of the "
            f"q/k heads H={H} (q.shape[2])")
    if tuple(g.shape) != (B, T, HV, K):
        raise _shape_error("g", (B, T, HV, K), "[B, T, HV, K]", g)
    if tuple(beta.shape) != (B, T, HV):
        raise _shape_error("beta", (B, T, HV), "[B, T, HV]", beta)

    if return_intermediate_states:
        if not torch.is_inference_mode_enabled():
            raise ValueError(
                "chunk_kda: `return_intermediate_states=True` is for inference only; "
                "call it under torch.inference_mode()")
        if disable_recompute:
            raise ValueError(
                "chunk_kda: `return_intermediate_states=True` requires `disable_recompute=False`")

    # --- what a kernel needs on top -----------------------------------------------------------
    if not 0 < V <= 256:
        raise ValueError(
            f"chunk_kda: currently only value head dims 1 <= V <= 256 are supported, got V={V}")
    if q.dtype not in _QKV_DTYPES:
        raise TypeError(
            f"chunk_kda: `q` must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"chunk_kda: `q`, `k` and `v` must share one dtype, got {q.dtype}, {k.dtype}, "
            f"{v.dtype}")
    for x, name in ((g, "g"), (beta, "beta")):
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"chunk_kda: `{name}` must be a float16, bfloat16, float32 or float64 tensor, "
                f"got {x.dtype}")
    device = q.device
    _check_backend(device)
    for x, name in ((k, "k"), (v, "v"), (g, "g"), (beta, "beta")):
        _check_device(x, name, device)
    for x, name in ((q, "q"), (g, "g"), (beta, "beta")):
        _check_no_fp64_on_gpu(x, name)

    if initial_state is not None:
        _check_device(initial_state, "initial_state", device)
        r, c = (V, K) if state_v_first else (K, V)
        expected = (N, HV, r, c)
        if tuple(initial_state.shape) != expected:
            raise ValueError(
                f"chunk_kda: `initial_state` must be [N, HV, {'V, K' if state_v_first else 'K, V'}]"
                f" = {list(expected)}, got {list(initial_state.shape)}")

    param_dtypes = (torch.float32,) if state_dtype == torch.float32 else (torch.float32, torch.float64)
    for x, name, per_head, what in ((A_log, "A_log", 1, "HV"), (dt_bias, "dt_bias", K, "HV*K")):
        if x is None:
            continue
        _require_tensor(x, name)
        _check_gate_param_numel(x, name, per_head, what, T, HV)
        if x.dtype not in param_dtypes:
            raise TypeError(
                f"chunk_kda: `{name}` must be {' or '.join(map(str, param_dtypes))}, "
                f"got {x.dtype}")
        _check_device(x, name, device)

    if lower_bound is not None:
        lower_bound = float(lower_bound)
    if scale is None:
        scale = K ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"chunk_kda: `scale` must be a float or None, got {scale!r}")
    scale = float(scale)

    bounds = None
    if cu_seqlens is not None:
        if cu_seqlens.dtype not in _INDEX_DTYPES:
            raise TypeError(f"chunk_kda: `cu_seqlens` must be int32 or int64, got {cu_seqlens.dtype}")
        _check_device(cu_seqlens, "cu_seqlens", device)
        if cu_seqlens_cpu is not None:
            _require_tensor(cu_seqlens_cpu, "cu_seqlens_cpu")
            if cu_seqlens_cpu.device.type != "cpu":
                raise ValueError(
                    f"chunk_kda: `cu_seqlens_cpu` must be on the CPU, got {cu_seqlens_cpu.device}")
            if cu_seqlens_cpu.dtype not in _INDEX_DTYPES:
                raise TypeError(
                    f"chunk_kda: `cu_seqlens_cpu` must be int32 or int64, got {cu_seqlens_cpu.dtype}")
            if tuple(cu_seqlens_cpu.shape) != tuple(cu_seqlens.shape):
                raise ValueError(
                    "chunk_kda: `cu_seqlens_cpu` must have the shape of `cu_seqlens` "
                    f"{tuple(cu_seqlens.shape)}, got {tuple(cu_seqlens_cpu.shape)}")
        # Offsets are read only where no device sync is needed (and not while tracing).
        if not _is_compiling():
            host = cu_seqlens_cpu if cu_seqlens_cpu is not None else (
                cu_seqlens if cu_seqlens.device.type == "cpu" else None)
            if host is not None:
                bounds = [int(x) for x in host.tolist()]
                _check_offsets(bounds, T, "cu_seqlens_cpu" if cu_seqlens_cpu is not None
                               else "cu_seqlens")
                if cu_seqlens_cpu is not None and cu_seqlens.device.type == "cpu":
                    if not torch.equal(cu_seqlens.to(torch.int64), cu_seqlens_cpu.to(torch.int64)):
                        raise ValueError(
                            "chunk_kda: `cu_seqlens_cpu` must hold the values of `cu_seqlens`, "
                            f"got {cu_seqlens_cpu.tolist()} and {cu_seqlens.tolist()}")
    elif cu_seqlens_cpu is not None:
        raise ValueError("chunk_kda: `cu_seqlens_cpu` was given without `cu_seqlens`")

    # Off by default: each check reads data back to the host, a device sync per tensor.
    if not _is_compiling() and (check_inputs or _check_inputs_from_env()):
        token, head = ("batch", "time", "head", "channel"), ("sequence", "head", "row", "column")
        _check_input_values(
            [("q", q, token), ("k", k, token), ("v", v, token), ("g", g, token),
             ("beta", beta, token[:3]), ("initial_state", initial_state, head),
             ("A_log", A_log, ("index",)), ("dt_bias", dt_bias, ("index",))],
            g, bool(use_gate_in_kernel), bounds)

    gate_variant = _dispatch.fused_forward_gate_variant(use_gate_in_kernel=bool(use_gate_in_kernel),
                                                        lower_bound=lower_bound)
    num_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    fused = (cp_plan is None and not return_intermediate_states
             and _fused_forward(q, k, v, g, beta, initial_state, A_log, dt_bias, num_seqs, gate_variant))
    if not _is_compiling():
        _dispatch.log_forward(q, v, int(chunk_size), bool(safe_gate), gate_variant if fused else None, num_seqs)
    if cp_plan is not None:
        flags = dict(use_qk_l2norm=bool(use_qk_l2norm_in_kernel), use_gate_in_kernel=bool(use_gate_in_kernel),
                     use_beta_sigmoid=bool(use_beta_sigmoid_in_kernel), allow_neg_eigval=bool(allow_neg_eigval),
                     safe_gate=bool(safe_gate), lower_bound=lower_bound)
        o = cp.chunk_kda_cp(q, k, v, g, beta, scale=scale, A_log=A_log, dt_bias=dt_bias, plan=cp_plan,
                            flags=flags, state_v_first=bool(state_v_first), chunk_size=int(chunk_size),
                            disable_recompute=bool(disable_recompute))
        return o, None
    if fused:
        flags = (bool(use_qk_l2norm_in_kernel), bool(use_gate_in_kernel), bool(use_beta_sigmoid_in_kernel),
                 bool(allow_neg_eigval), lower_bound)
        seg_len = _dispatch.fused_segment_length(num_seqs=num_seqs, total_tokens=q.shape[0] * q.shape[1],
                                                 HV=v.shape[2], num_sms=_num_sms(q.device))
        if seg_len is not None:
            def run(q_, k_, v_, g_, beta_, h0_, cu_):
                return ops.chunk_kda_fwd_fused(q_, k_, v_, g_, beta_, scale, h0_, A_log, dt_bias, cu_, *flags,
                                               False, True)
            return segments.forward_by_segments(run, q, k, v, g, beta, initial_state, cu_seqlens, seg_len,
                                                bool(state_v_first), bool(output_final_state))
        o, final_state = ops.chunk_kda_fwd_fused(
            q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens, *flags,
            bool(state_v_first), bool(output_final_state))
        return o, (final_state if output_final_state else None)
    out = ops.chunk_kda_fwd(
        q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens,
        bool(use_qk_l2norm_in_kernel), bool(use_gate_in_kernel), bool(use_beta_sigmoid_in_kernel),
        bool(allow_neg_eigval), bool(safe_gate), lower_bound, bool(state_v_first), int(chunk_size),
        bool(output_final_state), bool(disable_recompute), bool(return_intermediate_states))
    final_state = out.final_state if output_final_state else None
    if not return_intermediate_states:
        return out.o, final_state
    h = out.h
    if cu_seqlens is not None:
        if bounds is None:
            # Documented sync: the exact chunk count depends on the offsets' values.
            bounds = [int(x) for x in cu_seqlens.tolist()]
        h = h[:, :_exact_num_chunks(bounds, int(chunk_size))]
    return out.o, final_state, h

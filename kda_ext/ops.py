# kda_ext.ops: typed wrappers of the kda_ext custom ops, their fake kernels and the autograd formula.
"""The Python side of ``torch.ops.kda_ext.chunk_kda_fwd`` / ``chunk_kda_bwd``.

The schemas live in ``csrc/ops.cpp`` and the op contract (every output's shape and dtype) in
``docs/design.md``. The fakes below repeat the C++ invariants of ``csrc/checks.h`` with
``torch._check`` and allocate exactly what the kernels return (contiguous, same dtypes), so that
``torch.compile`` and ``torch.library.opcheck`` see the real metadata.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

__all__ = ["chunk_kda_fwd", "chunk_kda_fwd_fused", "chunk_kda_bwd", "FwdOutputs", "BwdOutputs",
           "fused_recurrent_kda_fwd", "fused_recurrent_kda_inplace"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class FwdOutputs(NamedTuple):
    o: torch.Tensor
    final_state: torch.Tensor
    Aqk: torch.Tensor
    Akk: torch.Tensor
    g_cum: torch.Tensor
    w: torch.Tensor
    u: torch.Tensor
    qg: torch.Tensor
    kg: torch.Tensor
    v_new: torch.Tensor
    h: torch.Tensor


class BwdOutputs(NamedTuple):
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dg: torch.Tensor
    dbeta: torch.Tensor
    dA_log: torch.Tensor
    ddt_bias: torch.Tensor
    dh0: torch.Tensor


def chunk_kda_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor],
    A_log: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    use_qk_l2norm: bool,
    use_gate_in_kernel: bool,
    use_beta_sigmoid: bool,
    allow_neg_eigval: bool,
    safe_gate: bool,
    lower_bound: Optional[float],
    state_v_first: bool,
    chunk_size: int,
    output_final_state: bool,
    save_intermediates: bool,
    return_states: bool,
) -> FwdOutputs:
    """Run the chunked KDA forward (``torch.ops.kda_ext.chunk_kda_fwd``); differentiable.

    Args:
        q, k: ``[B, T, H, K]`` raw (before the optional l2norm), one float dtype with v.
        v: ``[B, T, HV, V]``.
        g: ``[B, T, HV, K]`` per-step log decay, or raw logits with ``use_gate_in_kernel``.
        beta: ``[B, T, HV]``, or raw logits with ``use_beta_sigmoid``.
        scale: the query scale.
        initial_state: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first``), state dtype.
        A_log: HV elements; dt_bias: HV*K elements (read only with ``use_gate_in_kernel``).
        cu_seqlens: ``[N + 1]`` int32/int64 offsets (then B == 1), or None.
        The flags are those of :func:`kda_ext.chunk_kda`; ``save_intermediates`` keeps
        ``g_cum .. h`` for the backward (``disable_recompute``), ``return_states`` keeps ``h``.

    Returns:
        :class:`FwdOutputs` ``(o [B,T,HV,V], final_state, Aqk [B,T,HV,BT], Akk [B,T,HV,BT],
        g_cum, w, u, qg, kg, v_new, h)``; outputs that were not asked for have zero elements.
    """
    return FwdOutputs(*torch.ops.kda_ext.chunk_kda_fwd.default(
        q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens,
        use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval, safe_gate,
        lower_bound, state_v_first, chunk_size, output_final_state, save_intermediates,
        return_states))


def chunk_kda_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor],
    A_log: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    Aqk: torch.Tensor,
    Akk: torch.Tensor,
    g_cum: Optional[torch.Tensor],
    w: Optional[torch.Tensor],
    u: Optional[torch.Tensor],
    qg: Optional[torch.Tensor],
    kg: Optional[torch.Tensor],
    v_new: Optional[torch.Tensor],
    h: Optional[torch.Tensor],
    do: torch.Tensor,
    dht: Optional[torch.Tensor],
    use_qk_l2norm: bool,
    use_gate_in_kernel: bool,
    use_beta_sigmoid: bool,
    allow_neg_eigval: bool,
    safe_gate: bool,
    lower_bound: Optional[float],
    state_v_first: bool,
    chunk_size: int,
) -> BwdOutputs:
    """Run the chunked KDA backward (``torch.ops.kda_ext.chunk_kda_bwd``).

    Args:
        The forward's inputs and flags; ``Aqk``/``Akk`` saved by the forward; ``g_cum .. h``
        all given (saved with ``save_intermediates``) or all None (recomputed); ``do``
        ``[B, T, HV, V]``; ``dht`` the final state's gradient or None.

    Returns:
        :class:`BwdOutputs` ``(dq [B,T,H,K], dk [B,T,H,K], dv [B,T,HV,V], dg [B,T,HV,K],
        dbeta [B,T,HV], dA_log, ddt_bias, dh0)``; the last three are empty when their input
        was None (or the gate was not in the kernel).
    """
    return BwdOutputs(*torch.ops.kda_ext.chunk_kda_bwd.default(
        q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens, Aqk, Akk,
        g_cum, w, u, qg, kg, v_new, h, do, dht, use_qk_l2norm, use_gate_in_kernel,
        use_beta_sigmoid, allow_neg_eigval, safe_gate, lower_bound, state_v_first, chunk_size))


# ---------------------------------------------------------------------------------------------
# Fakes: mirrors of csrc/checks.h (check_chunk_kda_args) and of the allocations in design.md.
# ---------------------------------------------------------------------------------------------


class _Dims(NamedTuple):
    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    N: int
    BT: int
    NT: int
    varlen: bool


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check_common_inputs(q, k, v, g, beta, cu_seqlens) -> Tuple[int, int, int, int, int, int, int]:
    """The checks chunk_kda_fwd and fused_recurrent_kda_fwd share (shapes, dtypes and devices of
    q, k, v, g, beta; cu_seqlens): (B, T, H, K, HV, V, N), N the number of sequences."""
    torch._check(q.dim() == 4, lambda: f"kda_ext: q must be [B, T, H, K], got shape {tuple(q.shape)}")
    torch._check(k.shape == q.shape,
                 lambda: f"kda_ext: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    torch._check(v.dim() == 4, lambda: f"kda_ext: v must be [B, T, HV, V], got shape {tuple(v.shape)}")
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    torch._check(v.shape[0] == B and v.shape[1] == T,
                 lambda: f"kda_ext: v must be [{B}, {T}, HV, V] (B and T of q), got {tuple(v.shape)}")
    torch._check(H > 0 and HV > 0 and HV % H == 0,
                 lambda: f"kda_ext: the value heads HV={HV} must be a positive multiple of the q/k heads H={H}")
    torch._check(0 < K <= 256, lambda: f"kda_ext: key head dim K must be in [1, 256], got {K}")
    torch._check(0 < V <= 256, lambda: f"kda_ext: value head dim V must be in [1, 256], got {V}")
    torch._check(g.dim() == 4 and tuple(g.shape) == (B, T, HV, K),
                 lambda: f"kda_ext: g must be [{B}, {T}, {HV}, {K}], got {tuple(g.shape)}")
    torch._check(beta.dim() == 3 and tuple(beta.shape) == (B, T, HV),
                 lambda: f"kda_ext: beta must be [{B}, {T}, {HV}], got {tuple(beta.shape)}")
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (g, "g"), (beta, "beta")):
        torch._check(t.dtype in _FLOAT_DTYPES,
                     lambda: f"kda_ext: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        torch._check(t.device == q.device,
                     lambda: f"kda_ext: {name} must be on {q.device} (the device of q), got {t.device}")
    torch._check(k.dtype == q.dtype and v.dtype == q.dtype,
                 lambda: f"kda_ext: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens is not None:
        torch._check(cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2,
                     lambda: "kda_ext: cu_seqlens must be a 1-D tensor of N+1 >= 2 offsets, "
                             f"got shape {tuple(cu_seqlens.shape)}")
        torch._check(cu_seqlens.dtype in (torch.int32, torch.int64),
                     lambda: f"kda_ext: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        torch._check(cu_seqlens.device == q.device,
                     lambda: f"kda_ext: cu_seqlens must be on {q.device} (the device of q), got {cu_seqlens.device}")
        torch._check(B == 1, lambda: f"kda_ext: batch size must be 1 with cu_seqlens, got {B}")
        return B, T, H, K, HV, V, cu_seqlens.shape[0] - 1
    return B, T, H, K, HV, V, B


def _check_args(q, k, v, g, beta, initial_state, A_log, dt_bias, cu_seqlens, use_gate_in_kernel,
                lower_bound, state_v_first, chunk_size) -> _Dims:
    B, T, H, K, HV, V, N = _check_common_inputs(q, k, v, g, beta, cu_seqlens)
    torch._check(chunk_size in (32, 64),
                 lambda: f"kda_ext: chunk_size must be 32 or 64, got {chunk_size}")
    varlen = cu_seqlens is not None
    NT = (T + N * (chunk_size - 1)) // chunk_size if varlen else (T + chunk_size - 1) // chunk_size
    sdt = _compute_dtype(q)
    if initial_state is not None:
        r, c = (V, K) if state_v_first else (K, V)
        torch._check(initial_state.dim() == 4 and tuple(initial_state.shape) == (N, HV, r, c),
                     lambda: f"kda_ext: initial_state must be [{N}, {HV}, {r}, {c}], got {tuple(initial_state.shape)}")
        torch._check(initial_state.dtype == sdt,
                     lambda: f"kda_ext: initial_state must be {sdt}, got {initial_state.dtype}")
        torch._check(initial_state.device == q.device,
                     lambda: f"kda_ext: initial_state must be on {q.device} (the device of q), got {initial_state.device}")
    if use_gate_in_kernel:
        torch._check(A_log is not None or lower_bound is not None,
                     lambda: "kda_ext: the in-kernel softplus gate needs A_log")
        if A_log is not None:
            torch._check(A_log.numel() == HV,
                         lambda: f"kda_ext: A_log must have HV={HV} elements, got {A_log.numel()}")
            torch._check(A_log.dtype in (torch.float32, torch.float64),
                         lambda: f"kda_ext: A_log must be float32 or float64, got {A_log.dtype}")
            torch._check(A_log.device == q.device,
                         lambda: f"kda_ext: A_log must be on {q.device} (the device of q), got {A_log.device}")
        if dt_bias is not None:
            torch._check(dt_bias.numel() == HV * K,
                         lambda: f"kda_ext: dt_bias must have HV*K={HV * K} elements, got {dt_bias.numel()}")
            torch._check(dt_bias.dtype in (torch.float32, torch.float64),
                         lambda: f"kda_ext: dt_bias must be float32 or float64, got {dt_bias.dtype}")
            torch._check(dt_bias.device == q.device,
                         lambda: f"kda_ext: dt_bias must be on {q.device} (the device of q), got {dt_bias.device}")
    return _Dims(B, T, H, HV, K, V, N, chunk_size, NT, varlen)


@torch.library.register_fake("kda_ext::chunk_kda_fwd")
def _chunk_kda_fwd_fake(q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens,
                        use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval,
                        safe_gate, lower_bound, state_v_first, chunk_size, output_final_state,
                        save_intermediates, return_states):
    d = _check_args(q, k, v, g, beta, initial_state, A_log, dt_bias, cu_seqlens,
                    use_gate_in_kernel, lower_bound, state_v_first, chunk_size)
    cdt = _compute_dtype(q)
    state = (d.V, d.K) if state_v_first else (d.K, d.V)
    o = q.new_empty((d.B, d.T, d.HV, d.V), dtype=q.dtype)
    if output_final_state:
        final_state = q.new_empty((d.N, d.HV, *state), dtype=cdt)
    else:
        final_state = q.new_empty((0,), dtype=cdt)
    Aqk = q.new_empty((d.B, d.T, d.HV, d.BT), dtype=k.dtype)
    Akk = q.new_empty((d.B, d.T, d.HV, d.BT), dtype=k.dtype)
    tk = (d.B, d.T, d.HV, d.K)
    tv = (d.B, d.T, d.HV, d.V)

    def keep(shape, dtype, wanted):
        return q.new_empty(shape if wanted else (0,), dtype=dtype)

    si = save_intermediates
    g_cum = keep(tk, cdt, si)
    w = keep(tk, k.dtype, si)
    u = keep(tv, v.dtype, si)
    qg = keep(tk, k.dtype, si)
    kg = keep(tk, k.dtype, si)
    v_new = keep(tv, v.dtype, si)
    h = keep((d.B, d.NT, d.HV, *state), k.dtype, si or return_states)
    return o, final_state, Aqk, Akk, g_cum, w, u, qg, kg, v_new, h


@torch.library.register_fake("kda_ext::chunk_kda_bwd")
def _chunk_kda_bwd_fake(q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens,
                        Aqk, Akk, g_cum, w, u, qg, kg, v_new, h, do, dht, use_qk_l2norm,
                        use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval, safe_gate,
                        lower_bound, state_v_first, chunk_size):
    d = _check_args(q, k, v, g, beta, initial_state, A_log, dt_bias, cu_seqlens,
                    use_gate_in_kernel, lower_bound, state_v_first, chunk_size)
    cdt = _compute_dtype(q)
    state = (d.V, d.K) if state_v_first else (d.K, d.V)
    a_shape = (d.B, d.T, d.HV, d.BT)
    torch._check(tuple(Aqk.shape) == a_shape,
                 lambda: f"kda_ext: Aqk must be {list(a_shape)}, got {tuple(Aqk.shape)}")
    torch._check(tuple(Akk.shape) == a_shape,
                 lambda: f"kda_ext: Akk must be {list(a_shape)}, got {tuple(Akk.shape)}")
    inter = (g_cum, w, u, qg, kg, v_new, h)
    given = sum(t is not None for t in inter)
    torch._check(given in (0, len(inter)),
                 lambda: "kda_ext: g_cum, w, u, qg, kg, v_new and h must be given together "
                         f"(disable_recompute) or all be None, got {given} of 7")
    if given:
        tk = (d.B, d.T, d.HV, d.K)
        tv = (d.B, d.T, d.HV, d.V)
        for t, name, shape in ((g_cum, "g_cum", tk), (w, "w", tk), (u, "u", tv), (qg, "qg", tk),
                               (kg, "kg", tk), (v_new, "v_new", tv),
                               (h, "h", (d.B, d.NT, d.HV, *state))):
            torch._check(tuple(t.shape) == shape,
                         lambda: f"kda_ext: {name} must be {list(shape)}, got {tuple(t.shape)}")
    torch._check(tuple(do.shape) == (d.B, d.T, d.HV, d.V),
                 lambda: f"kda_ext: do must be [{d.B}, {d.T}, {d.HV}, {d.V}], got {tuple(do.shape)}")
    if dht is not None:
        torch._check(tuple(dht.shape) == (d.N, d.HV, *state),
                     lambda: f"kda_ext: dht must be [{d.N}, {d.HV}, {state[0]}, {state[1]}], got {tuple(dht.shape)}")
    dq = q.new_empty((d.B, d.T, d.H, d.K), dtype=q.dtype)
    dk = q.new_empty((d.B, d.T, d.H, d.K), dtype=k.dtype)
    dv = q.new_empty((d.B, d.T, d.HV, d.V), dtype=v.dtype)
    dg = q.new_empty((d.B, d.T, d.HV, d.K), dtype=g.dtype)
    dbeta = q.new_empty((d.B, d.T, d.HV), dtype=beta.dtype)
    if use_gate_in_kernel and A_log is not None:
        dA_log = q.new_empty(A_log.shape, dtype=A_log.dtype)
    else:
        dA_log = q.new_empty((0,), dtype=A_log.dtype if A_log is not None else cdt)
    if use_gate_in_kernel and dt_bias is not None:
        ddt_bias = q.new_empty(dt_bias.shape, dtype=dt_bias.dtype)
    else:
        ddt_bias = q.new_empty((0,), dtype=dt_bias.dtype if dt_bias is not None else cdt)
    if initial_state is not None:
        dh0 = q.new_empty(initial_state.shape, dtype=initial_state.dtype)
    else:
        dh0 = q.new_empty((0,), dtype=cdt)
    return dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dh0


# ---------------------------------------------------------------------------------------------
# Autograd: chunk_kda_fwd's backward is the chunk_kda_bwd op.
# ---------------------------------------------------------------------------------------------

# Positions of the differentiable inputs in chunk_kda_fwd's schema.
_Q, _K, _V, _G, _BETA, _H0, _A_LOG, _DT_BIAS = 0, 1, 2, 3, 4, 6, 7, 8
_NUM_FWD_INPUTS = 21


def _setup_context(ctx, inputs, output):
    (q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens, use_qk_l2norm,
     use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval, safe_gate, lower_bound,
     state_v_first, chunk_size, output_final_state, save_intermediates, return_states) = inputs
    o, final_state, Aqk, Akk, g_cum, w, u, qg, kg, v_new, h = output
    # Only o and final_state carry gradients; the rest are saved activations.
    ctx.mark_non_differentiable(Aqk, Akk, g_cum, w, u, qg, kg, v_new, h)
    ctx.set_materialize_grads(False)
    ctx.has_grad = any(ctx.needs_input_grad)
    if not ctx.has_grad:
        return
    ctx.scale = scale
    ctx.flags = (use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval, safe_gate,
                 lower_bound, state_v_first, chunk_size)
    ctx.output_final_state = output_final_state
    ctx.save_intermediates = save_intermediates
    ctx.has_h0 = initial_state is not None
    ctx.has_A_log = A_log is not None
    ctx.has_dt_bias = dt_bias is not None
    saved = [q, k, v, g, beta, initial_state, A_log, dt_bias, cu_seqlens, Aqk, Akk]
    if save_intermediates:
        saved += [g_cum, w, u, qg, kg, v_new, h]
    ctx.save_for_backward(*saved)


def _backward(ctx, *grads):
    if not ctx.has_grad:
        return (None,) * _NUM_FWD_INPUTS
    do, dht = grads[0], grads[1]
    saved = ctx.saved_tensors
    q, k, v, g, beta, initial_state, A_log, dt_bias, cu_seqlens, Aqk, Akk = saved[:11]
    inter = tuple(saved[11:]) if ctx.save_intermediates else (None,) * 7
    (use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval, safe_gate,
     lower_bound, state_v_first, chunk_size) = ctx.flags
    if do is None:
        # Only the final state was used downstream.
        do = q.new_zeros((v.shape[0], v.shape[1], v.shape[2], v.shape[3]), dtype=q.dtype)
    if not ctx.output_final_state:
        dht = None
    dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dh0 = chunk_kda_bwd(
        q, k, v, g, beta, ctx.scale, initial_state, A_log, dt_bias, cu_seqlens, Aqk, Akk,
        *inter, do, dht, use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval,
        safe_gate, lower_bound, state_v_first, chunk_size)
    need = ctx.needs_input_grad
    grads_in = [None] * _NUM_FWD_INPUTS
    for pos, grad in ((_Q, dq), (_K, dk), (_V, dv), (_G, dg), (_BETA, dbeta)):
        if need[pos]:
            grads_in[pos] = grad
    if ctx.has_h0 and need[_H0]:
        grads_in[_H0] = dh0
    if use_gate_in_kernel and ctx.has_A_log and need[_A_LOG]:
        grads_in[_A_LOG] = dA_log
    if use_gate_in_kernel and ctx.has_dt_bias and need[_DT_BIAS]:
        grads_in[_DT_BIAS] = ddt_bias
    return tuple(grads_in)


torch.library.register_autograd("kda_ext::chunk_kda_fwd", _backward, setup_context=_setup_context)


def _bwd_setup_context(ctx, inputs, output):
    pass


def _bwd_backward(ctx, *grads):
    raise NotImplementedError(
        "kda_ext: chunk_kda has no double backward (the backward op kda_ext::chunk_kda_bwd is not "
        "differentiable); do not differentiate through its gradients (create_graph=True)")


# Registered so that differentiating through the gradients raises instead of silently
# returning nothing (the dispatcher's fallback only warns).
torch.library.register_autograd("kda_ext::chunk_kda_bwd", _bwd_backward, setup_context=_bwd_setup_context)


# ---------------------------------------------------------------------------------------------
# Decode: kda_ext::fused_recurrent_kda_fwd / fused_recurrent_kda_inplace (forward only).
# ---------------------------------------------------------------------------------------------


def fused_recurrent_kda_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor],
    A_log: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    ssm_state_indices: Optional[torch.Tensor],
    use_qk_l2norm: bool,
    use_gate_in_kernel: bool,
    use_beta_sigmoid: bool,
    allow_neg_eigval: bool,
    lower_bound: Optional[float],
    state_v_first: bool,
    output_final_state: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence (``torch.ops.kda_ext.fused_recurrent_kda_fwd``); forward only.

    Args:
        As :func:`kda_ext.fused_recurrent_kda`; ``initial_state`` is ``[N, HV, ...]``, or with
        ``ssm_state_indices`` (``[N]``, negative = padding) a pool ``[P, HV, ...]`` that is only read.

    Returns:
        ``(o [B,T,HV,V] in q's dtype, final_state [N,HV,K,V] or [N,HV,V,K])``; final_state is empty
        (numel 0) unless ``output_final_state``.
    """
    return torch.ops.kda_ext.fused_recurrent_kda_fwd.default(
        q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens, ssm_state_indices,
        use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval, lower_bound,
        state_v_first, output_final_state)


def fused_recurrent_kda_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    state: torch.Tensor,
    A_log: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    ssm_state_indices: Optional[torch.Tensor],
    use_qk_l2norm: bool,
    use_gate_in_kernel: bool,
    use_beta_sigmoid: bool,
    allow_neg_eigval: bool,
    lower_bound: Optional[float],
    state_v_first: bool,
) -> torch.Tensor:
    """Run the recurrence with ``state`` updated in place
    (``torch.ops.kda_ext.fused_recurrent_kda_inplace``); returns ``o``.

    ``state`` is ``[N, HV, ...]``, or with ``ssm_state_indices`` a pool ``[P, HV, ...]`` of which
    only the named slots are read and written; dense in its last three dims.
    """
    return torch.ops.kda_ext.fused_recurrent_kda_inplace.default(
        q, k, v, g, beta, scale, state, A_log, dt_bias, cu_seqlens, ssm_state_indices,
        use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval, lower_bound,
        state_v_first)


def _check_recurrent_args(q, k, v, g, beta, state, A_log, dt_bias, cu_seqlens, ssm_state_indices,
                          use_gate_in_kernel, lower_bound, state_v_first, inplace):
    """Mirror of csrc/checks.h check_fused_recurrent_args; returns (B, T, HV, K, V, N)."""
    B, T, H, K, HV, V, N = _check_common_inputs(q, k, v, g, beta, cu_seqlens)
    indexed = ssm_state_indices is not None
    if indexed:
        torch._check(ssm_state_indices.dim() == 1 and ssm_state_indices.shape[0] == N,
                     lambda: f"kda_ext: ssm_state_indices must be [N] = [{N}] (one state slot per "
                             f"sequence), got shape {tuple(ssm_state_indices.shape)}")
        torch._check(ssm_state_indices.dtype in (torch.int32, torch.int64),
                     lambda: f"kda_ext: ssm_state_indices must be int32 or int64, got {ssm_state_indices.dtype}")
        torch._check(ssm_state_indices.device == q.device,
                     lambda: f"kda_ext: ssm_state_indices must be on {q.device} (the device of q), "
                             f"got {ssm_state_indices.device}")
        torch._check(state is not None,
                     lambda: "kda_ext: ssm_state_indices index a state pool, so initial_state must be given")
    if state is not None:
        r, c = (V, K) if state_v_first else (K, V)
        torch._check(state.dim() == 4 and tuple(state.shape[1:]) == (HV, r, c)
                     and (indexed or state.shape[0] == N),
                     lambda: f"kda_ext: initial_state must be [{'P' if indexed else N}, {HV}, {r}, {c}], "
                             f"got {tuple(state.shape)}")
        sdt = _compute_dtype(q)
        torch._check(state.dtype == sdt, lambda: f"kda_ext: initial_state must be {sdt}, got {state.dtype}")
        torch._check(state.device == q.device,
                     lambda: f"kda_ext: initial_state must be on {q.device} (the device of q), got {state.device}")
        if inplace:
            torch._check(state.stride(3) == 1 and state.stride(2) == c and state.stride(1) == r * c,
                         lambda: "kda_ext: a state updated in place must be dense in its last three dims, "
                                 f"got strides {tuple(state.stride())}")
    if use_gate_in_kernel:
        torch._check(A_log is not None or lower_bound is not None,
                     lambda: "kda_ext: the in-kernel softplus gate needs A_log")
        if A_log is not None:
            torch._check(A_log.numel() == HV,
                         lambda: f"kda_ext: A_log must have HV={HV} elements, got {A_log.numel()}")
        if dt_bias is not None:
            torch._check(dt_bias.numel() == HV * K,
                         lambda: f"kda_ext: dt_bias must have HV*K={HV * K} elements, got {dt_bias.numel()}")
    return B, T, HV, K, V, N


@torch.library.register_fake("kda_ext::fused_recurrent_kda_fwd")
def _fused_recurrent_kda_fwd_fake(q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens,
                                  ssm_state_indices, use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid,
                                  allow_neg_eigval, lower_bound, state_v_first, output_final_state):
    B, T, HV, K, V, N = _check_recurrent_args(
        q, k, v, g, beta, initial_state, A_log, dt_bias, cu_seqlens, ssm_state_indices,
        use_gate_in_kernel, lower_bound, state_v_first, inplace=False)
    cdt = _compute_dtype(q)
    o = q.new_empty((B, T, HV, V), dtype=q.dtype)
    if output_final_state:
        state = (V, K) if state_v_first else (K, V)
        final_state = q.new_empty((N, HV, *state), dtype=cdt)
    else:
        final_state = q.new_empty((0,), dtype=cdt)
    return o, final_state


@torch.library.register_fake("kda_ext::fused_recurrent_kda_inplace")
def _fused_recurrent_kda_inplace_fake(q, k, v, g, beta, scale, state, A_log, dt_bias, cu_seqlens,
                                      ssm_state_indices, use_qk_l2norm, use_gate_in_kernel,
                                      use_beta_sigmoid, allow_neg_eigval, lower_bound, state_v_first):
    B, T, HV, K, V, N = _check_recurrent_args(
        q, k, v, g, beta, state, A_log, dt_bias, cu_seqlens, ssm_state_indices,
        use_gate_in_kernel, lower_bound, state_v_first, inplace=True)
    return q.new_empty((B, T, HV, V), dtype=q.dtype)


def _recurrent_setup_context(ctx, inputs, output):
    pass


def _recurrent_backward(ctx, *grads):
    raise NotImplementedError(
        "kda_ext: fused_recurrent_kda is forward-only (kda_ext::fused_recurrent_kda_fwd has no "
        "backward); use kda_ext.chunk_kda to train")


# Registered so that a backward through the op raises instead of silently returning nothing
# (the public function already refuses inputs that require grad).
torch.library.register_autograd("kda_ext::fused_recurrent_kda_fwd", _recurrent_backward,
                                setup_context=_recurrent_setup_context)


def chunk_kda_fwd_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor],
    A_log: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    use_qk_l2norm: bool,
    use_gate_in_kernel: bool,
    use_beta_sigmoid: bool,
    allow_neg_eigval: bool,
    lower_bound: Optional[float],
    state_v_first: bool,
    output_final_state: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused Hopper forward (``torch.ops.kda_ext.chunk_kda_fwd_fused``, sm_90a builds on an
    sm_90 GPU): ``(o, final_state)`` (final_state empty unless ``output_final_state``), nothing
    saved for a backward. Serves bf16, K = V = 128, every gate mode (chunk 16 inside; the
    arguments are those of :func:`chunk_kda_fwd` less ``safe_gate`` and ``chunk_size``, which
    only choose the two-kernel path's numerics). Not differentiable: :func:`kda_ext.chunk_kda` calls it only when no
    gradient is needed."""
    return torch.ops.kda_ext.chunk_kda_fwd_fused.default(
        q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens, use_qk_l2norm,
        use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval, lower_bound, state_v_first,
        output_final_state)


@torch.library.register_fake("kda_ext::chunk_kda_fwd_fused")
def _chunk_kda_fwd_fused_fake(q, k, v, g, beta, scale, initial_state, A_log, dt_bias, cu_seqlens,
                              use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval,
                              lower_bound, state_v_first, output_final_state):
    d = _check_args(q, k, v, g, beta, initial_state, A_log, dt_bias, cu_seqlens,
                    use_gate_in_kernel, lower_bound, state_v_first, 64)
    cdt = _compute_dtype(q)
    o = q.new_empty((d.B, d.T, d.HV, d.V), dtype=q.dtype)
    if output_final_state:
        state = (d.V, d.K) if state_v_first else (d.K, d.V)
        final_state = q.new_empty((d.N, d.HV, *state), dtype=cdt)
    else:
        final_state = q.new_empty((0,), dtype=cdt)
    return o, final_state


def _fused_fwd_backward(ctx, *grads):
    raise NotImplementedError(
        "kda_ext: kda_ext::chunk_kda_fwd_fused saves nothing for a backward; kda_ext.chunk_kda "
        "runs kda_ext::chunk_kda_fwd whenever a gradient is needed")


torch.library.register_autograd("kda_ext::chunk_kda_fwd_fused", _fused_fwd_backward,
                                setup_context=_recurrent_setup_context)

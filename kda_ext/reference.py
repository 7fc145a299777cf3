# kda_ext.reference: plain-PyTorch definitions of KDA (recurrent and chunked forms, gates, l2norm).
"""Readable, differentiable references for Kimi Delta Attention.

Everything here is written with ordinary torch operators so that autograd supplies the gradients
the kernels are checked against. The computation runs in float32, or float64 when the inputs are
float64 (so that ``torch.autograd.gradcheck`` can use these functions too).

Notation: B batch, T time, H q/k heads, HV value heads (HV % H == 0; value head ``hv`` reads
q/k head ``hv // (HV // H)``), K key dim, V value dim, N sequences.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "l2norm",
    "naive_kda_gate",
    "naive_kda_lowerbound_gate",
    "naive_recurrent_kda",
    "naive_chunk_kda",
]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the last dimension as the kernels do: ``x * rsqrt(sum(x^2) + eps)``.

    The epsilon sits inside the square root (``F.normalize`` instead clamps the norm), and the
    result is rounded back to ``x``'s dtype.

    Args:
        x: ``[..., D]``, any float dtype.
        eps: added to the sum of squares.

    Returns:
        ``[..., D]`` in ``x.dtype``.
    """
    xf = x.to(_compute_dtype(x))
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)


def _per_head(t: Optional[torch.Tensor], HV: int, K: int, what: str) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if what == "A_log":
        if t.numel() != HV:
            raise ValueError(f"A_log must have HV={HV} elements, got {t.numel()}")
        return t.reshape(HV, 1)
    if t.numel() != HV * K:
        raise ValueError(f"dt_bias must have HV*K={HV * K} elements, got {t.numel()}")
    return t.reshape(HV, K)


def naive_kda_gate(
    g: torch.Tensor, A_log: torch.Tensor, dt_bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Softplus gate: ``-exp(A_log[h]) * softplus(g + dt_bias[h])`` (softplus threshold 20).

    Args:
        g: raw gate logits ``[B, T, HV, K]``.
        A_log: HV elements (any shape, e.g. ``[HV]`` or ``[1, 1, HV, 1]``).
        dt_bias: optional, HV*K elements (any shape), read as ``[HV, K]``.

    Returns:
        The per-step log decay ``[B, T, HV, K]`` in float32 (float64 for float64 ``g``), <= 0.
    """
    HV, K = g.shape[-2], g.shape[-1]
    cdt = _compute_dtype(g)
    x = g.to(cdt)
    bias = _per_head(dt_bias, HV, K, "dt_bias")
    if bias is not None:
        x = x + bias.to(cdt)
    a = _per_head(A_log, HV, K, "A_log").to(cdt)
    return -torch.exp(a) * F.softplus(x, beta=1.0, threshold=20.0)


def naive_kda_lowerbound_gate(
    g: torch.Tensor,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    lower_bound: float = -5.0,
) -> torch.Tensor:
    """Lower-bound gate: ``lower_bound * sigmoid(exp(A_log[h]) * (g + dt_bias[h]))``.

    Without ``A_log`` the factor ``exp(A_log)`` is 1. Each value lies in ``(lower_bound, 0)``.

    Args:
        g: raw gate logits ``[B, T, HV, K]``.
        A_log: optional, HV elements (any shape).
        dt_bias: optional, HV*K elements (any shape), read as ``[HV, K]``.
        lower_bound: the most negative log decay per step.

    Returns:
        ``[B, T, HV, K]`` in float32 (float64 for float64 ``g``).
    """
    HV, K = g.shape[-2], g.shape[-1]
    cdt = _compute_dtype(g)
    x = g.to(cdt)
    bias = _per_head(dt_bias, HV, K, "dt_bias")
    if bias is not None:
        x = x + bias.to(cdt)
    a = _per_head(A_log, HV, K, "A_log")
    if a is not None:
        x = torch.exp(a.to(cdt)) * x
    return lower_bound * torch.sigmoid(x)


def _expand_heads(x: torch.Tensor, HV: int) -> torch.Tensor:
    # GVA: value head hv reads q/k head hv // (HV // H), i.e. repeat_interleave, not tile.
    H = x.shape[2]
    if HV % H != 0:
        raise ValueError(f"HV={HV} must be a multiple of H={H}")
    return x.repeat_interleave(HV // H, dim=2) if HV != H else x


def _split_varlen(cu_seqlens: Optional[torch.Tensor], B: int, T: int):
    if cu_seqlens is None:
        return None
    if B != 1:
        raise ValueError(f"the batch size must be 1 with cu_seqlens, got {B}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != T or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {bounds}")
    return list(zip(bounds[:-1], bounds[1:]))


def _varlen(fn, q, k, v, g, beta, scale, initial_state, output_final_state, state_v_first,
            segments, **extra):
    # Sequences are independent: run each one as a batch of one and stitch the results.
    outs, finals = [], []
    for n, (bos, eos) in enumerate(segments):
        h0 = None if initial_state is None else initial_state[n : n + 1]
        o, ht = fn(q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], g[:, bos:eos], beta[:, bos:eos],
                   scale, h0, output_final_state, state_v_first, **extra)
        outs.append(o)
        finals.append(ht)
    o = torch.cat(outs, dim=1)
    return o, (torch.cat(finals, dim=0) if output_final_state else None)


def _prepare(q, k, v, g, beta, scale, initial_state, state_v_first):
    HV = v.shape[2]
    cdt = _compute_dtype(q)
    q = _expand_heads(q, HV).to(cdt)
    k = _expand_heads(k, HV).to(cdt)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    B, K, V = q.shape[0], q.shape[-1], v.shape[-1]
    if initial_state is None:
        S = q.new_zeros(B, HV, K, V)
    else:
        S = initial_state.to(cdt)
        if state_v_first:
            S = S.transpose(-1, -2)
    return q, k, v.to(cdt), g.to(cdt), beta.to(cdt), scale, S


def _recurrent_fixed(q, k, v, g, beta, scale, initial_state, output_final_state, state_v_first):
    v_dtype = v.dtype
    q, k, v, g, beta, scale, S = _prepare(q, k, v, g, beta, scale, initial_state, state_v_first)
    T = q.shape[1]
    outs = []
    for t in range(T):
        # S' = Diag(exp(g_t)) S;  S = S' + beta_t k_t (v_t - S'^T k_t)^T;  o_t = S^T (scale q_t)
        S = S * torch.exp(g[:, t]).unsqueeze(-1)
        k_t = k[:, t]
        pred = torch.einsum("bhk,bhkv->bhv", k_t, S)
        delta = beta[:, t].unsqueeze(-1) * (v[:, t] - pred)
        S = S + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    ht = None
    if output_final_state:
        ht = S.transpose(-1, -2) if state_v_first else S
    return o.to(v_dtype), ht


def naive_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The definition of KDA: the token-by-token gated delta rule with per-channel decay.

    Per value head, with state ``S`` (``[K, V]``) starting at ``initial_state`` (or 0)::

        S   <- Diag(exp(g_t)) S
        S   <- S + beta_t k_t (v_t - S^T k_t)^T
        o_t  = S^T (scale q_t)

    No normalisation, gate or sigmoid is applied: pass ``l2norm(q)``, a gated ``g`` and the
    final ``beta`` yourself.

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, HV, V]``, HV a multiple of H.
        g: ``[B, T, HV, K]``, per-step log decay (natural log).
        beta: ``[B, T, HV]``.
        scale: defaults to ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` (``[N, HV, V, K]`` with ``state_v_first``).
        output_final_state: return the final state.
        state_v_first: state layout ``[V, K]`` for ``initial_state`` and the returned state.
        cu_seqlens: optional ``[N + 1]`` offsets of packed sequences (then B == 1); read on the
            host.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, HV, V]`` in v's dtype; ``final_state``
        ``[N, HV, K, V]`` (or ``[N, HV, V, K]``) in float32 (float64 for float64 ``q``), or None.
    """
    segments = _split_varlen(cu_seqlens, q.shape[0], q.shape[1])
    if segments is not None:
        return _varlen(_recurrent_fixed, q, k, v, g, beta, scale, initial_state,
                       output_final_state, state_v_first, segments)
    return _recurrent_fixed(q, k, v, g, beta, scale, initial_state, output_final_state,
                            state_v_first)


def _chunk_fixed(q, k, v, g, beta, scale, initial_state, output_final_state, state_v_first,
                 chunk_size):
    v_dtype = v.dtype
    q, k, v, g, beta, scale, S = _prepare(q, k, v, g, beta, scale, initial_state, state_v_first)
    B, T, HV, K = q.shape
    BT = chunk_size
    pad = (-T) % BT
    if pad:
        # Padded rows carry zero k, v, beta and a zero log decay: they change neither the
        # state nor the real rows' outputs, and leave the chunk's last cumulative gate intact.
        def padt(x):
            return F.pad(x, [0, 0] * (x.dim() - 2) + [0, pad])
        q, k, v, g, beta = map(padt, (q, k, v, g, beta))
    NT = (T + pad) // BT
    # [B, HV, NT, BT, ...]
    def chunks(x):
        return x.reshape(B, NT, BT, HV, *x.shape[3:]).transpose(1, 3).transpose(2, 3)
    q, k, v, g = map(chunks, (q, k, v, g))
    beta = beta.reshape(B, NT, BT, HV).permute(0, 3, 1, 2)
    G = g.cumsum(-2)
    incl = torch.ones(BT, BT, dtype=torch.bool, device=q.device).tril()
    strict = incl.tril(-1)
    eye = torch.eye(BT, dtype=q.dtype, device=q.device)
    outs = []
    for c in range(NT):
        qc, kc, vc, Gc, bc = q[:, :, c], k[:, :, c], v[:, :, c], G[:, :, c], beta[:, :, c]
        # exp(G_i - G_j) per channel, with j > i masked *before* the exp (it would overflow).
        diff = Gc.unsqueeze(-2) - Gc.unsqueeze(-3)  # [B, HV, BT(i), BT(j), K]
        decay = torch.exp(diff.masked_fill(~incl.unsqueeze(-1), float("-inf")))
        Aqk = scale * torch.einsum("bhik,bhjk,bhijk->bhij", qc, kc, decay)
        Lkk = bc.unsqueeze(-1) * torch.einsum("bhik,bhjk,bhijk->bhij", kc, kc, decay)
        Lkk = Lkk.masked_fill(~strict, 0.0)
        Akk = torch.linalg.solve_triangular(eye + Lkk, eye.expand_as(Lkk), upper=False,
                                            unitriangular=True)
        eG = torch.exp(Gc)
        w = Akk @ (bc.unsqueeze(-1) * kc * eG)
        u = Akk @ (bc.unsqueeze(-1) * vc)
        v_new = u - w @ S
        outs.append(scale * (qc * eG) @ S + Aqk @ v_new)
        G_last = Gc[:, :, -1]
        kg = kc * torch.exp(G_last.unsqueeze(-2) - Gc)
        S = torch.exp(G_last).unsqueeze(-1) * S + kg.transpose(-1, -2) @ v_new
    o = torch.stack(outs, dim=2)  # [B, HV, NT, BT, V]
    o = o.reshape(B, HV, NT * BT, -1).transpose(1, 2)[:, :T]
    ht = None
    if output_final_state:
        ht = S.transpose(-1, -2) if state_v_first else S
    return o.to(v_dtype), ht


def naive_chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Optional[torch.LongTensor] = None,
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The chunked form of KDA (the pipeline of docs/design.md, "Op contract") in plain torch.

    Within each chunk of ``chunk_size`` rows (G = inclusive cumsum of g inside the chunk)::

        Aqk[i,j] = scale sum_k q_ik k_jk exp(G_ik - G_jk)        (j <= i)
        L[i,j]   = beta_i sum_k k_ik k_jk exp(G_ik - G_jk)       (j < i)
        Akk = (I + L)^-1;  w = Akk (beta k exp(G));  u = Akk (beta v)
        v_new = u - w S;   o = scale (q exp(G)) S + Aqk v_new
        S <- Diag(exp(G_last)) S + (k exp(G_last - G))^T v_new

    It exists to validate the chunk algebra against :func:`naive_recurrent_kda`; the pairwise
    per-channel decay tensor is ``[B, HV, BT, BT, K]`` per chunk, so keep shapes modest.

    Args: as :func:`naive_recurrent_kda`, plus ``chunk_size`` (any positive int, 32 or 64 in
    practice).

    Returns:
        ``(o, final_state)`` as :func:`naive_recurrent_kda`.
    """
    segments = _split_varlen(cu_seqlens, q.shape[0], q.shape[1])
    if segments is not None:
        return _varlen(_chunk_fixed, q, k, v, g, beta, scale, initial_state, output_final_state,
                       state_v_first, segments, chunk_size=chunk_size)
    return _chunk_fixed(q, k, v, g, beta, scale, initial_state, output_final_state,
                        state_v_first, chunk_size)

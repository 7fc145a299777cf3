# kda_ext.recurrent: fused_recurrent_kda, FLA's decode entry point (PROVISIONAL: through chunk_kda).
"""Provisional ``fused_recurrent_kda`` with the signature of ``fla.ops.kda.fused_recurrent_kda``.

This stand-in exists so that :mod:`kda_ext.fla` and :mod:`kda_ext.nn` can be written and tested
against the final name while the decode kernel is developed on another branch. It computes the
same thing as the recurrent form (the chunked algorithm is exact for any T, T=1 included) by
calling :func:`kda_ext.chunk_kda`, and it is forward only. The dedicated kernel replaces this file.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Tuple

import torch

from .chunk import chunk_kda

__all__ = ["fused_recurrent_kda"]


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
    **kwargs: Any,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """KDA token by token (decoding): FLA's ``fused_recurrent_kda`` signature and semantics.

    Shapes and flags are those of :func:`kda_ext.chunk_kda`. Forward only: a call that would
    need a gradient raises ``RuntimeError``.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, HV, V]``; ``final_state`` ``[N, HV, K, V]`` (or
        ``[N, HV, V, K]`` with ``state_v_first``) in float32, or None.
    """
    if torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad
            for x in (q, k, v, g, beta, A_log, dt_bias, initial_state)):
        raise RuntimeError(
            "fused_recurrent_kda: forward only (decoding); an input requires grad. Use "
            "kda_ext.chunk_kda for training, or call this under torch.no_grad()")
    if torch.compiler.is_compiling():
        return _forward(q, k, v, g, beta, A_log, dt_bias, scale, initial_state, output_final_state,
                        use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
                        allow_neg_eigval, lower_bound, state_v_first, cu_seqlens, kwargs)
    with warnings.catch_warnings():
        # chunk_kda warns when T < H (a head-first layout looks like that); a decode step has T=1.
        warnings.filterwarnings("ignore", message="chunk_kda: `q` has shape")
        return _forward(q, k, v, g, beta, A_log, dt_bias, scale, initial_state, output_final_state,
                        use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
                        allow_neg_eigval, lower_bound, state_v_first, cu_seqlens, kwargs)


def _forward(q, k, v, g, beta, A_log, dt_bias, scale, initial_state, output_final_state,
             use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
             allow_neg_eigval, lower_bound, state_v_first, cu_seqlens, kwargs):
    return chunk_kda(
        q, k, v, g, beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        use_gate_in_kernel=use_gate_in_kernel, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval, lower_bound=lower_bound, state_v_first=state_v_first,
        cu_seqlens=cu_seqlens, A_log=A_log, dt_bias=dt_bias, **kwargs)

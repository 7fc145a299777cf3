"""Sequences split into segments: the state update over a segment is affine in its entry state.

Over a run of tokens the KDA recurrence S_t = (I - b_t k_t k_t^T) Diag(exp g_t) S_{t-1} + b_t k_t v_t^T
maps the entry state to the exit state as S_end = A S_start + C, with
  A = the product of the per-token K x K factors (the exit state of the run from S_start = I with
      v = 0), and
  C = the exit state of the run from S_start = 0.
So a long sequence can be cut into segments whose (A, C) are computed independently (in parallel),
joined by a short scan S_start(s + 1) = A_s S_start(s) + C_s, and each segment's output computed
from its true entry state. This is the structure issue 17's few-heads forward (segments of one
sequence on one GPU) and context parallelism (kda_ext.cp: segments on several ranks) build on.

This module is the algorithm at the level of the public op: every piece is a `chunk_kda` call
(so it runs on the CPU and CUDA backends, with every gate and flag, and is differentiable), plus
the scan as batched matmuls. It is the executable reference for the fused kernels to come, not a
fast path: it runs the intra-chunk stage three times.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .chunk import chunk_kda

__all__ = ["segment_bounds", "sequence_state_maps", "segment_state_maps", "scan_segment_states", "chunk_kda_segmented"]


def segment_bounds(T: int, num_segments: int, chunk_size: int = 64) -> List[int]:
    """Boundaries [0, ..., T] of at most `num_segments` segments of one length-T sequence, each a
    whole number of chunks (the last may be shorter), so that no chunk straddles two segments and
    the intra-chunk work is the same as on the whole sequence."""
    if num_segments < 1:
        raise ValueError(f"segment_bounds: `num_segments` must be >= 1, got {num_segments}")
    chunks = -(-T // chunk_size)
    per = max(1, -(-chunks // num_segments))
    bounds = list(range(0, T, per * chunk_size)) + [T]
    return bounds if T > 0 else [0, 0]


def _pack(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])


def sequence_state_maps(final_state, q, k, v, g, beta, num_seqs) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A, C) of each of the `num_seqs` sequences of an input: A [N, HV, K, K], C [N, HV, K, V]
    (fp32, fp64 for fp64 inputs; states in the [K, V] layout), from two runs of
    `final_state(q, k, v, g, beta, initial_state)`, a chunk_kda forward (with the caller's gates,
    flags and sequence offsets) that returns the [N, HV, K, *] final states: A from v = 0 and
    initial state I, C from the real v and initial state 0. q only matters through l2norm's
    shapes, since no output is used."""
    K = k.shape[-1]
    HV = v.shape[2]
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # chunk_kda's rule
    eye = torch.eye(K, device=q.device, dtype=state_dtype).expand(num_seqs, HV, K, K).contiguous()
    zero_v = v.new_zeros(*v.shape[:-1], K)
    return final_state(q, k, zero_v, g, beta, eye), final_state(q, k, v, g, beta, None)


def segment_state_maps(q, k, v, g, beta, bounds: List[int], **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A, C) of every segment of every batch row: A [B, S, HV, K, K], C [B, S, HV, K, V] (fp32,
    states in the [K, V] layout), for inputs [B, T, ...] cut at `bounds` (the same for every row).
    `kwargs` are chunk_kda's flags (gates, l2norm, beta sigmoid, scale, chunk_size, ...)."""
    B, T, HV, V = v.shape
    K = k.shape[-1]
    S = len(bounds) - 1
    kwargs = {n: w for n, w in kwargs.items() if n not in ("state_v_first", "initial_state",
                                                          "output_final_state", "cu_seqlens")}
    # Every segment of every row as one packed varlen batch.
    cu = torch.tensor([b * T + x for b in range(B) for x in bounds[:-1]] + [B * T], device=q.device,
                      dtype=torch.int64)

    def final_state(q_, k_, v_, g_, beta_, initial_state):
        return chunk_kda(q_, k_, v_, g_, beta_, initial_state=initial_state, output_final_state=True,
                         cu_seqlens=cu, **kwargs)[1]

    A, C = sequence_state_maps(final_state, *(_pack(t) for t in (q, k, v, g, beta)), B * S)
    return A.reshape(B, S, HV, K, K), C.reshape(B, S, HV, K, V)


def scan_segment_states(A: torch.Tensor, C: torch.Tensor,
                        initial_state: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Entry states of the segments and the final state: S_start(0) = initial_state (or 0),
    S_start(s + 1) = A_s S_start(s) + C_s. A [B, S, HV, K, K], C [B, S, HV, K, V], initial_state
    [B, HV, K, V]; returns (entry states [B, S, HV, K, V], final state [B, HV, K, V])."""
    B, S, HV, K, V = C.shape
    state = (initial_state.to(C.dtype) if initial_state is not None
             else torch.zeros(B, HV, K, V, device=C.device, dtype=C.dtype))
    entries = []
    for s in range(S):
        entries.append(state)
        state = A[:, s] @ state + C[:, s]
    return torch.stack(entries, dim=1), state


def chunk_kda_segmented(q, k, v, g, beta, num_segments: int, initial_state=None,
                        output_final_state: bool = False, state_v_first: bool = False, **kwargs):
    """chunk_kda on fixed-length inputs [B, T, ...] computed segment by segment: the segments' state
    maps, the scan, then every segment's output from its entry state. Same results as chunk_kda up
    to rounding (the tests hold it to that)."""
    B, T = q.shape[:2]
    chunk_size = int(kwargs.get("chunk_size", 64))
    bounds = segment_bounds(T, num_segments, chunk_size)
    S = len(bounds) - 1
    h0 = initial_state
    if h0 is not None and state_v_first:
        h0 = h0.transpose(-1, -2)
    A, C = segment_state_maps(q, k, v, g, beta, bounds, **kwargs)
    entries, final = scan_segment_states(A, C, h0)
    cu = torch.tensor([b * T + x for b in range(B) for x in bounds[:-1]] + [B * T], device=q.device,
                      dtype=torch.int64)
    o, _ = chunk_kda(_pack(q), _pack(k), _pack(v), _pack(g), _pack(beta),
                     initial_state=entries.reshape(B * S, *entries.shape[2:]).contiguous(),
                     output_final_state=False, cu_seqlens=cu, **kwargs)
    o = o.reshape(B, T, *o.shape[2:])
    if not output_final_state:
        return o, None
    return o, (final.transpose(-1, -2) if state_v_first else final)

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

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch

# (chunk.py imports this module for the fused few-heads forward: chunk_kda is looked up at call time)
from . import chunk as _chunk

__all__ = ["segment_bounds", "sequence_state_maps", "segment_state_maps", "scan_segment_states", "chunk_kda_segmented",
           "SegmentPlan", "plan_segments", "scan_entry_states", "forward_by_segments"]


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
        return _chunk.chunk_kda(q_, k_, v_, g_, beta_, initial_state=initial_state, output_final_state=True,
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
    o, _ = _chunk.chunk_kda(_pack(q), _pack(k), _pack(v), _pack(g), _pack(beta),
                     initial_state=entries.reshape(B * S, *entries.shape[2:]).contiguous(),
                     output_final_state=False, cu_seqlens=cu, **kwargs)
    o = o.reshape(B, T, *o.shape[2:])
    if not output_final_state:
        return o, None
    return o, (final.transpose(-1, -2) if state_v_first else final)


# ---- The device-side form: segments planned, scanned and run without a host sync -------------------
#
# The few-heads forward (issue 17) cuts every sequence of a packed token stream at a global grid of
# `seg_len` tokens. The plan is computed with tensor ops from the device's cu_seqlens, so its shapes
# depend on (N, total tokens, seg_len) only: no host sync, one graph for every batch of the same
# shapes under torch.compile and CUDA graphs. The three passes (A, C, then the outputs from the true
# entry states) are any varlen forward `run` (the fused Hopper kernel on the GPU; chunk_kda on the
# CPU in the tests).


class SegmentPlan(NamedTuple):
    """Segments of a packed stream of N sequences (`total` tokens), S = N + ceil(total / seg_len) of
    them, some empty (a grid point on a sequence start, or past the last sequence's end):
    `offsets` [S + 1] (int64, the segments as varlen offsets), `sequence` [S] (the sequence each
    belongs to), `is_first` [S] (it starts its sequence: its entry state is the sequence's initial
    state), `last` [N] (each sequence's last segment; meaningless for an empty sequence),
    `empty_sequence` [N], `max_steps` (an upper bound of segments per sequence, minus one: the scan's
    length)."""
    offsets: torch.Tensor
    sequence: torch.Tensor
    is_first: torch.Tensor
    last: torch.Tensor
    empty_sequence: torch.Tensor
    max_steps: int


def plan_segments(cu_seqlens: torch.Tensor, total: int, seg_len: int) -> SegmentPlan:
    """The segments of the sequences `cu_seqlens` (int32/int64 [N + 1], on any device) cut at every
    multiple of `seg_len`. Sequence starts and grid points, sorted, are the segment starts; grid
    points past the stream's end are clamped to it (empty segments)."""
    if seg_len < 1:
        raise ValueError(f"plan_segments: `seg_len` must be >= 1, got {seg_len}")
    cu = cu_seqlens.to(torch.int64)
    end = cu[-1:]
    grid = torch.arange(0, total, seg_len, device=cu.device, dtype=torch.int64)
    starts = torch.sort(torch.cat([cu[:-1], torch.minimum(grid, end)])).values
    offsets = torch.cat([starts, end])
    n = cu.numel() - 1
    # right=True: a segment starting on a sequence start belongs to that sequence (and an empty
    # sequence, whose start equals the next one's, owns no segment)
    sequence = (torch.searchsorted(cu, starts, right=True) - 1).clamp(0, max(n - 1, 0))
    is_first = starts == cu[sequence]
    last = (torch.searchsorted(starts, cu[1:], right=False) - 1).clamp(min=0)
    empty_sequence = cu[1:] == cu[:-1]
    return SegmentPlan(offsets, sequence, is_first, last, empty_sequence, -(-total // seg_len))


def scan_entry_states(A: torch.Tensor, C: torch.Tensor, initial: torch.Tensor, plan: SegmentPlan
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit states of every segment: entry(s) = the initial state of its sequence if it
    starts one, else exit(s - 1); exit(s) = A_s entry(s) + C_s. A [S, HV, K, K], C [S, HV, K, V],
    initial [S, HV, K, V] (each segment's sequence's initial state). `plan.max_steps` rounds of
    one batched product each carry the entries along the longest chain."""
    is_first = plan.is_first.view(-1, 1, 1, 1)
    entry = initial
    for _ in range(plan.max_steps):
        exit_prev = torch.matmul(A[:-1], entry[:-1]) + C[:-1]
        entry = torch.cat([entry[:1], torch.where(is_first[1:], initial[1:], exit_prev)])
    return entry, torch.matmul(A, entry) + C


def forward_by_segments(run: Callable, q, k, v, g, beta, initial_state: Optional[torch.Tensor],
                        cu_seqlens: Optional[torch.Tensor], seg_len: int, state_v_first: bool,
                        output_final_state: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A forward over segments of at most `seg_len` tokens run side by side: the segments' maps A
    (v = 0 from I) and C (from 0), the scan, and the outputs from the true entry states.
    `run(q, k, v, g, beta, initial_state, cu_seqlens) -> (o, final_state)` is a varlen forward over
    packed [1, total, ...] inputs with [K, V]-layout states (the caller's gates and flags bound).
    Inputs [B, T, ...] (or packed with `cu_seqlens`); returns o and (if asked) the final states in
    the caller's layout."""
    B, T, HV, V = v.shape
    K = k.shape[-1]
    total = B * T
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, total + 1, T, device=q.device, dtype=torch.int64)
    plan = plan_segments(cu_seqlens, total, seg_len)
    packed = [_pack(t) for t in (q, k, v, g, beta)]
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # chunk_kda's rule
    h0 = initial_state
    if h0 is not None and state_v_first:
        h0 = h0.transpose(-1, -2)
    num_segments = plan.offsets.numel() - 1
    eye = torch.eye(K, device=q.device, dtype=state_dtype).expand(num_segments, HV, K, K).contiguous()
    zero_v = packed[2].new_zeros(*packed[2].shape[:-1], K)
    A = run(packed[0], packed[1], zero_v, packed[3], packed[4], eye, plan.offsets)[1]
    C = run(*packed, None, plan.offsets)[1]
    if h0 is None:
        initial = torch.zeros(num_segments, HV, K, V, device=q.device, dtype=state_dtype)
    else:
        initial = h0.to(state_dtype)[plan.sequence]
    entry, exit_ = scan_entry_states(A, C, initial, plan)
    o = run(*packed, entry.contiguous(), plan.offsets)[0].reshape(B, T, HV, V)
    if not output_final_state:
        return o, None
    final = exit_[plan.last]
    if h0 is not None:
        final = torch.where(plan.empty_sequence.view(-1, 1, 1, 1), h0.to(state_dtype), final)
    else:
        final = torch.where(plan.empty_sequence.view(-1, 1, 1, 1), torch.zeros_like(final), final)
    return o, (final.transpose(-1, -2).contiguous() if state_v_first else final)

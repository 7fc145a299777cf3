# kda_ext.cp: context parallelism, one packed token stream split across the ranks of a process group.
"""Context parallelism (CP) for ``chunk_kda`` on ``torch.distributed``.

The global token stream (packed sequences, ``cu_seqlens`` over all ranks) is cut into contiguous
shares, one per rank, in rank order. Rank ``r`` holds ``[1, T_r, H, K]`` inputs. A sequence may
start on an earlier rank (its first local piece then needs the state it had there) and may go on
on later ranks (its last local piece's exit state is then needed there). :func:`build_cp_context`
works out this rank's part; ``chunk_kda(..., cp_context=ctx)`` does the rest.

The scheme (docs/design.md, "Context parallelism"): over a run of tokens the KDA state update is
affine in the entry state, ``S_exit = A S_entry + C`` (:mod:`kda_ext.segments`). Every rank computes
``(A, C)`` of its last local sequence, all ranks all-gather them (one collective), and every rank
folds the maps of the ranks its first local sequence started on into that sequence's true entry
state, then runs its local ``chunk_kda`` from it. The backward is the same computation's autograd:
the all-gather's adjoint is a reduce-scatter (sum), which hands every rank the gradient of its own
``(A, C)`` from the later ranks that used them.

Communication per rank and per call: forward, one all-gather in which every rank contributes
``HV * K * (K + V)`` state-dtype values (fp32, fp64 for fp64 inputs), i.e. ``A`` (K x K) and ``C``
(K x V) per value head, and receives ``world_size`` times that; backward, one reduce-scatter of the
same size. Independent of the local length T_r: with HV = 32, K = V = 128 that is 4 MiB sent per
rank per call (fp32), whatever the number of tokens.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["CPContext", "build_cp_context"]


@dataclasses.dataclass
class CPContext:
    """This rank's part of a context-parallel split; made by :func:`build_cp_context`.

    The field names and meanings are FLA's ``FLACPContext`` (contiguous layout), so code that reads
    an FLA context reads this one too:

    - ``cu_seqlens`` / ``cu_seqlens_cpu``: this rank's local offsets (int32; on the device of the
      global ``cu_seqlens``, and on the CPU), ``[0, ..., T_local]``. A sequence cut by a rank
      boundary appears as its local piece.
    - ``pre_num_ranks``: on how many earlier ranks the first local sequence started (0: it starts
      here); ``is_first_rank`` is ``pre_num_ranks == 0``.
    - ``post_num_ranks``: on how many later ranks the last local sequence goes on (0: it ends here);
      ``is_last_rank`` is ``post_num_ranks == 0``.
    - ``pre_num_conv_tokens``: tokens of the first local sequence held by earlier ranks (for a
      short convolution's left context), ``conv1d_kernel_size`` as given.

    kda_ext's own additions: ``rank`` and ``world_size`` (of ``group``), ``tokens_per_rank`` (the
    split), and ``pre_num_ranks_dev`` (``pre_num_ranks`` as a device tensor, read under
    ``torch.compile`` so that a new split does not recompile).
    """
    group: Any = None
    cu_seqlens: Optional[torch.Tensor] = None
    cu_seqlens_cpu: Optional[torch.Tensor] = None
    is_last_rank: Optional[bool] = None
    pre_num_ranks: Optional[int] = None
    is_first_rank: Optional[bool] = None
    post_num_ranks: Optional[int] = None
    conv1d_kernel_size: Optional[int] = None
    pre_num_conv_tokens: Optional[int] = None
    layout: str = "contiguous"
    rank: Optional[int] = None
    world_size: Optional[int] = None
    tokens_per_rank: Optional[tuple] = None
    pre_num_ranks_dev: Optional[torch.Tensor] = None

    @property
    def num_seqs(self) -> int:
        """Number of local sequences (pieces) on this rank."""
        return 0 if self.cu_seqlens is None else len(self.cu_seqlens) - 1

    @property
    def is_cp_enabled(self) -> bool:
        return self.group is not None or (self.world_size or 1) > 1

    def copy_for_backward(self) -> "CPContext":
        """A copy with its own offset tensors (FLA's method of this name, for pipeline schedules
        that keep a context alive until a later backward)."""
        return dataclasses.replace(
            self,
            cu_seqlens=None if self.cu_seqlens is None else self.cu_seqlens.clone(),
            cu_seqlens_cpu=None if self.cu_seqlens_cpu is None else self.cu_seqlens_cpu.clone(),
            pre_num_ranks_dev=None if self.pre_num_ranks_dev is None else self.pre_num_ranks_dev.clone())


def _offsets_from(cu_seqlens: Any, cu_seqlens_cpu: Any) -> List[int]:
    """The global offsets as Python ints, validated (one device sync when only a GPU tensor is given)."""
    source, name = (cu_seqlens_cpu, "cu_seqlens_cpu") if cu_seqlens_cpu is not None else (cu_seqlens, "cu_seqlens")
    if not isinstance(source, torch.Tensor):
        raise TypeError(f"build_cp_context: `{name}` must be a torch.Tensor, got {type(source).__name__}")
    if source.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"build_cp_context: `{name}` must be int32 or int64, got {source.dtype}")
    if source.dim() != 1 or source.numel() < 2:
        raise ValueError(
            f"build_cp_context: `{name}` must be a 1-D tensor of N + 1 >= 2 global offsets, got shape "
            f"{tuple(source.shape)}")
    bounds = [int(x) for x in source.tolist()]
    if bounds[0] != 0:
        raise ValueError(f"build_cp_context: `{name}` must start at 0, got {bounds[0]}")
    for i in range(len(bounds) - 1):
        if bounds[i + 1] < bounds[i]:
            raise ValueError(
                f"build_cp_context: `{name}` must be non-decreasing, got {bounds[i]} followed by "
                f"{bounds[i + 1]} at position {i}")
    return bounds


def _split(total: int, world_size: int, tokens_per_rank: Optional[Sequence[int]]) -> List[int]:
    """Rank boundaries [0, ..., total]: equal shares (FLA's rule) or the given lengths."""
    if tokens_per_rank is None:
        if total < world_size or total % world_size != 0:
            raise ValueError(
                f"build_cp_context: the total number of tokens, {total} (cu_seqlens[-1]), must be a "
                f"positive multiple of the world size {world_size} for equal shares; pass "
                "`tokens_per_rank` for another split")
        share = total // world_size
        return [share * r for r in range(world_size + 1)]
    lengths = list(tokens_per_rank)
    if len(lengths) != world_size or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                         for n in lengths):
        raise ValueError(
            f"build_cp_context: `tokens_per_rank` must hold {world_size} (the world size) positive "
            f"ints, got {lengths}")
    if sum(lengths) != total:
        raise ValueError(
            f"build_cp_context: `tokens_per_rank` must sum to the total number of tokens {total} "
            f"(cu_seqlens[-1]), got {lengths} (sum {sum(lengths)})")
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return bounds


def build_cp_context(
    cu_seqlens: torch.Tensor,
    group: Any = None,
    conv1d_kernel_size: Optional[int] = None,
    cu_seqlens_cpu: Optional[torch.Tensor] = None,
    layout: str = "contiguous",
    *,
    tokens_per_rank: Optional[Sequence[int]] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> CPContext:
    """This rank's part of a context-parallel split of a packed token stream (FLA's
    ``fla.ops.cp.build_cp_context``, contiguous layout).

    Args:
        cu_seqlens: ``[N + 1]`` int32/int64 offsets of the sequences of the whole (global) stream,
            the same on every rank. The local offsets are put on its device.
        group: the CP process group; None: the default group (``torch.distributed`` must then be
            initialised, unless ``rank`` and ``world_size`` are given).
        conv1d_kernel_size: kept on the context for a short convolution (FLA's field); unused here.
        cu_seqlens_cpu: a host copy of ``cu_seqlens`` (avoids a device sync).
        layout: ``"contiguous"`` only (FLA's ``"zigzag"`` is not supported).
        tokens_per_rank: the length of every rank's share, in rank order; default equal shares
            (then ``cu_seqlens[-1]`` must be a multiple of the world size, as in FLA).
        rank, world_size: this rank and the group size, instead of asking ``group`` (both or
            neither; checked against ``group`` when it is given).

    Returns:
        :class:`CPContext`. Pass it to ``chunk_kda(..., cp_context=ctx)`` with this rank's
        ``[1, T_local, ...]`` tokens, ``T_local = ctx.cu_seqlens_cpu[-1]``.
    """
    if layout != "contiguous":
        raise ValueError(
            f"build_cp_context: `layout` must be 'contiguous', got {layout!r} (kda_ext does not "
            "support FLA's zigzag layout)")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"build_cp_context: `cu_seqlens` must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if (rank is None) != (world_size is None):
        raise ValueError(
            f"build_cp_context: give both `rank` and `world_size` or neither, got rank={rank}, "
            f"world_size={world_size}")
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    if rank is None:
        if group is None:
            raise RuntimeError(
                "build_cp_context: torch.distributed is not initialised and no `group` was given; "
                "call torch.distributed.init_process_group first (or pass rank= and world_size=)")
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    else:
        for value, name in ((rank, "rank"), (world_size, "world_size")):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"build_cp_context: `{name}` must be an int, got {value!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"build_cp_context: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if group is not None and (dist.get_rank(group), dist.get_world_size(group)) != (rank, world_size):
            raise ValueError(
                f"build_cp_context: rank={rank}, world_size={world_size} disagree with `group` "
                f"(rank {dist.get_rank(group)} of {dist.get_world_size(group)})")
    bounds = _offsets_from(cu_seqlens, cu_seqlens_cpu)
    if cu_seqlens_cpu is not None and tuple(cu_seqlens_cpu.shape) != tuple(cu_seqlens.shape):
        raise ValueError(
            f"build_cp_context: `cu_seqlens_cpu` must have the shape of `cu_seqlens` "
            f"{tuple(cu_seqlens.shape)}, got {tuple(cu_seqlens_cpu.shape)}")
    ranks = _split(bounds[-1], world_size, tokens_per_rank)
    start, end = ranks[rank], ranks[rank + 1]

    def rank_holding(token: int) -> int:
        return bisect.bisect_right(ranks, token) - 1

    # The sequences holding this share's first and last token (empty sequences hold none).
    first_seq = bisect.bisect_right(bounds, start) - 1
    last_seq = bisect.bisect_left(bounds, end) - 1
    local = [0] + [b - start for b in bounds if start < b < end] + [end - start]
    local = sorted(set(local))   # several empty sequences at one offset become one boundary
    pre = rank - rank_holding(bounds[first_seq])
    post = rank_holding(bounds[last_seq + 1] - 1) - rank
    local_cpu = torch.tensor(local, dtype=torch.int32)
    return CPContext(
        group=group,
        cu_seqlens=local_cpu.to(cu_seqlens.device),
        cu_seqlens_cpu=local_cpu,
        is_last_rank=post == 0,
        pre_num_ranks=pre,
        is_first_rank=pre == 0,
        post_num_ranks=post,
        conv1d_kernel_size=conv1d_kernel_size,
        pre_num_conv_tokens=start - bounds[first_seq],
        rank=rank,
        world_size=world_size,
        tokens_per_rank=tuple(b - a for a, b in zip(ranks[:-1], ranks[1:])),
        pre_num_ranks_dev=torch.tensor(pre, dtype=torch.int32, device=cu_seqlens.device),
    )


# --- chunk_kda with a cp_context -------------------------------------------------------------

@dataclasses.dataclass
class _Plan:
    """What chunk_kda needs of a context (ours or FLA's), read once per call."""
    group: Any
    rank: int
    world_size: int
    cu_seqlens: torch.Tensor
    cu_seqlens_cpu: Optional[torch.Tensor]
    pre_num_ranks: Any      # int, or a 0-d int tensor on q's device (read under torch.compile)


def _field(ctx: Any, name: str) -> Any:
    if not hasattr(ctx, name):
        raise TypeError(
            f"chunk_kda: `cp_context` must be a context from kda_ext.build_cp_context (or FLA's "
            f"FLACPContext); got a {type(ctx).__name__} without the field `{name}`")
    return getattr(ctx, name)


def read_context(ctx: Any, device: torch.device, compiling: bool) -> _Plan:
    """Duck-typed: kda_ext's CPContext or FLA's FLACPContext (contiguous layout)."""
    layout = getattr(ctx, "layout", "contiguous")
    if layout != "contiguous":
        raise ValueError(
            f"chunk_kda: `cp_context` has layout {layout!r}; kda_ext supports the 'contiguous' layout "
            "only (each rank one contiguous share of the token stream)")
    cu = _field(ctx, "cu_seqlens")
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"chunk_kda: `cp_context.cu_seqlens` must be a tensor, got {type(cu).__name__}")
    if cu.device != device:
        raise ValueError(
            f"chunk_kda: `cp_context.cu_seqlens` must be on {device} (the device of `q`), got "
            f"{cu.device}; build the context from cu_seqlens on that device")
    cu_cpu = getattr(ctx, "cu_seqlens_cpu", None)
    group = _field(ctx, "group")
    world_size, rank = getattr(ctx, "world_size", None), getattr(ctx, "rank", None)
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    if group is None:
        if (world_size or 1) > 1 or world_size is None:
            raise RuntimeError(
                "chunk_kda: `cp_context` has no process group and torch.distributed is not "
                "initialised; call torch.distributed.init_process_group before chunk_kda")
    elif world_size is None or rank is None:
        # an FLA context: it does not record them
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    elif not compiling and (dist.get_rank(group), dist.get_world_size(group)) != (rank, world_size):
        raise ValueError(
            f"chunk_kda: `cp_context` was built for rank {rank} of {world_size}, but its group has "
            f"this process as rank {dist.get_rank(group)} of {dist.get_world_size(group)}")
    pre_dev = getattr(ctx, "pre_num_ranks_dev", None)
    if compiling and isinstance(pre_dev, torch.Tensor) and pre_dev.device == device:
        pre = pre_dev   # a tensor: a new split reuses the compiled graph
    else:
        pre, post = _field(ctx, "pre_num_ranks"), _field(ctx, "post_num_ranks")
        for value, name, most in ((pre, "pre_num_ranks", rank), (post, "post_num_ranks", world_size - 1 - rank)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
                raise ValueError(
                    f"chunk_kda: `cp_context.{name}` must be an int in [0, {most}] on rank {rank} of "
                    f"{world_size}, got {value!r}")
    return _Plan(group, rank, world_size, cu, cu_cpu, pre)


def _gather_maps(local_map: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """[W, *local_map.shape]: every rank's map, in rank order. A functional collective:
    differentiable (its backward is a reduce-scatter), traceable by torch.compile, and on NCCL and
    gloo alike."""
    from torch.distributed._functional_collectives import all_gather_single_autograd

    gathered = all_gather_single_autograd(local_map, 0, plan.group)
    return gathered.view(plan.world_size, *local_map.shape)


def entry_state(maps_A: torch.Tensor, maps_C: torch.Tensor, rank: int, pre_num_ranks: Any) -> torch.Tensor:
    """The entry state of this rank's first local sequence: the fold S <- A_j S + C_j over the
    ranks j = rank - pre_num_ranks .. rank - 1 (that sequence's pieces there), from S = 0.
    maps_A [W, HV, K, K], maps_C [W, HV, K, V]; returns [HV, K, V].

    Every rank goes through all W maps, with the unused ones masked out rather than skipped, so
    that every rank's output depends on the gathered maps: the backward's reduce-scatter then runs
    on every rank (a collective that one rank skips hangs or fails the others)."""
    W = maps_A.shape[0]
    state = torch.zeros_like(maps_C[0])
    # built on the device (no host-to-device copy), from an int or a device tensor alike
    ranks = torch.arange(W, device=state.device)
    live = (ranks >= rank - pre_num_ranks) & (ranks < rank)
    for j in range(W):
        state = torch.where(live[j], maps_A[j] @ state + maps_C[j], state)
    return state


def chunk_kda_cp(q, k, v, g, beta, *, scale: float, A_log, dt_bias, plan: _Plan, flags: dict,
                 state_v_first: bool, chunk_size: int, disable_recompute: bool) -> torch.Tensor:
    """o of this rank's tokens ([1, T_local, HV, V]); the arguments are validated by chunk_kda."""
    from . import ops
    from .segments import sequence_state_maps

    cu = plan.cu_seqlens
    N = cu.shape[0] - 1
    HV = v.shape[2]

    def run(q_, k_, v_, g_, beta_, initial_state, output_final_state):
        # States in the [K, V] layout here; state_v_first is applied to the local call only.
        return ops.chunk_kda_fwd(
            q_, k_, v_, g_, beta_, scale, initial_state, A_log, dt_bias, cu,
            flags["use_qk_l2norm"], flags["use_gate_in_kernel"], flags["use_beta_sigmoid"],
            flags["allow_neg_eigval"], flags["safe_gate"], flags["lower_bound"], False, chunk_size,
            output_final_state, disable_recompute, False)

    if plan.world_size == 1:
        return run(q, k, v, g, beta, None, False).o
    # 1. (A, C) of every local sequence, from the same cut (cu_seqlens, so that the shapes do not
    #    depend on where the last sequence starts); this rank sends those of its last one.
    A, C = sequence_state_maps(lambda *a: run(*a, True).final_state, q, k, v, g, beta, N)
    gathered = _gather_maps(torch.cat([A[-1], C[-1]], dim=-1).contiguous(), plan)
    K = A.shape[-1]
    # 2. the first local sequence's entry state, zeros for the others
    entry = entry_state(gathered[..., :K], gathered[..., K:], plan.rank, plan.pre_num_ranks)
    h0 = torch.cat([entry.unsqueeze(0), entry.new_zeros(N - 1, HV, K, entry.shape[-1])], dim=0)
    if state_v_first:
        h0 = h0.transpose(-1, -2).contiguous()
    # 3. the local forward from the true entry states
    return ops.chunk_kda_fwd(
        q, k, v, g, beta, scale, h0, A_log, dt_bias, cu,
        flags["use_qk_l2norm"], flags["use_gate_in_kernel"], flags["use_beta_sigmoid"],
        flags["allow_neg_eigval"], flags["safe_gate"], flags["lower_bound"], state_v_first, chunk_size,
        False, disable_recompute, False).o

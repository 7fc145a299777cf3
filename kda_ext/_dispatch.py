"""Which CUDA kernels a chunk_kda forward will run, from the shapes, flags and build alone.

The launch layer (csrc/cuda/launch_fwd.cu) makes the choice; this is its mirror for reporting: the
debug log line of every call (logger "kda_ext", level DEBUG) and `python -m kda_ext`. The GPU
tests check the mirror against the kernels the profiler sees (tests/test_state_output_sm90.py).
Alignment is not modelled: a tensor whose storage offset is not a multiple of 16 bytes takes the
portable kernels whatever this says.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import torch

logger = logging.getLogger("kda_ext")


def _switch(name: str) -> str:
    return os.environ.get(name, "").strip() or "auto"


def forward_kernels(*, device_type: str, dtype: torch.dtype, K: int, V: int, chunk_size: int,
                    safe_gate: bool, with_sm90: bool) -> Dict[str, str]:
    """{"intra_chunk": kernel, "state_output": kernel} of one forward call."""
    if device_type != "cuda":
        return {"intra_chunk": "cpu", "state_output": "cpu"}
    kimi_shape = chunk_size == 64 and K == 128 and V == 128
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    prep = _switch("KDA_EXT_PREP_KERNEL")
    # auto: the lean kernel under safe_gate (its element-wise diagonal path, which the unbounded
    # gate takes nearly everywhere, is slower than chunk_prepare); lean: for every gate.
    lean = kimi_shape and dtype == torch.bfloat16 and (prep == "lean" or (prep == "auto" and safe_gate))
    state = _switch("KDA_EXT_STATE_KERNEL")
    if sixteen_bit and kimi_shape and with_sm90 and state in ("auto", "sm90"):
        state_kernel = "state_output_sm90 (wgmma, TMA)"
    elif sixteen_bit and chunk_size == 64 and K == 128 and state != "wmma":
        state_kernel = "chunk_state_output_mma"
    else:
        state_kernel = "chunk_state_output (wmma)"
    return {"intra_chunk": "chunk_prepare_lean" if lean else "chunk_prepare",
            "state_output": state_kernel}


# KDA_EXT_FUSED_FWD=auto takes the fused forward where it was measured faster than the two-kernel
# forward (H100, session 16, docs/perf-notes.md): the bounded gate (the Kimi setting), sequences
# x heads at least a quarter of the SMs and sequences of _FUSED_MIN_TOKENS tokens on average. It
# was slower with 16 (sequence, head) pairs (1 x 32768 and 1 x 1024 tokens, 16 heads: the
# two-kernel path spreads the chunks of few heads over the GPU) and for the range-checked variant
# (the exact path of out-of-range chunks).
_FUSED_MIN_TOKENS = 2048


def fused_forward_applies(*, device: torch.device, dtype: torch.dtype, K: int, V: int,
                          needs_grad: bool, with_sm90: bool, gate_variant: str = "range-checked",
                          num_seqs: int = 1, HV: int = 1, total_tokens: int = 0, num_sms: int = 132) -> bool:
    """Whether a chunk_kda forward runs the fused Hopper kernel (kda_ext::chunk_kda_fwd_fused):
    an sm_90 GPU with the sm_90a build, bf16, K = V = 128, and no gradient wanted (it saves
    nothing for a backward). It serves every gate mode (the kernel checks each 16-row chunk's gate
    range and computes the chunks it cannot take on its fast path exactly; fused_forward_gate_variant
    says which variant runs). KDA_EXT_FUSED_FWD: auto (default: where it is the faster forward, see
    above), on, off."""
    switch = _switch("KDA_EXT_FUSED_FWD")
    if switch not in ("auto", "on", "off"):
        raise ValueError(f"kda_ext: KDA_EXT_FUSED_FWD must be auto, on or off, got {switch!r}")
    if switch == "off":
        return False
    if switch == "auto" and not (gate_variant == "bounded" and 4 * num_seqs * HV >= num_sms
                                 and total_tokens >= _FUSED_MIN_TOKENS * num_seqs):
        return False
    if needs_grad or not with_sm90 or device.type != "cuda" or dtype != torch.bfloat16:
        return False
    if K != 128 or V != 128:
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


def fused_forward_gate_variant(*, use_gate_in_kernel: bool, lower_bound) -> str:
    """The fused kernel's variant for a gate mode (mirrors launch_fused_sm90.cu): "bounded" for the
    in-kernel lower-bound gate with lower_bound in [-5, 0) (every chunk's cumulative gate lies in
    [-80, 0]: the median-row products always apply), "range-checked" otherwise (each chunk checks
    its gate range; out-of-range chunks take the exact path)."""
    bounded = use_gate_in_kernel and lower_bound is not None and -5.0 <= float(lower_bound) < 0.0
    return "bounded" if bounded else "range-checked"


def fused_forward_cluster(*, num_seqs: int, HV: int, num_sms: int, gate_variant: str) -> bool:
    """Whether the fused kernel runs as 2-CTA clusters (mirrors launch_fused_sm90.cu): each
    (sequence, value head) on two SMs, one value half each, the cluster's four producer
    warpgroups taking the chunks in turn. auto (the default) takes it for the bounded gate when
    the clusters fit the GPU at once (2 num_seqs HV <= num_sms); with more (sequence, head)
    pairs the one-CTA kernel fills every SM already. KDA_EXT_FUSED_CLUSTER: auto, on, off
    (on and off apply to the bounded variant; the range-checked one always runs one CTA)."""
    switch = _switch("KDA_EXT_FUSED_CLUSTER")
    if switch not in ("auto", "on", "off"):
        raise ValueError(f"kda_ext: KDA_EXT_FUSED_CLUSTER must be auto, on or off, got {switch!r}")
    if gate_variant != "bounded" or switch == "off":
        return False
    return switch == "on" or 2 * num_seqs * HV <= num_sms


# Mean tokens per sequence below which the split's fixed costs (the plan, the scan's launches) are
# not worth it: a 1024-token sequence runs in ~0.06 ms whole.
_MIN_SPLIT_TOKENS = 4096


def fused_segment_length(*, num_seqs: int, total_tokens: int, HV: int, num_sms: int) -> Optional[int]:
    """Tokens per segment when the fused forward should split sequences (segments.forward_by_segments),
    else None; from shapes alone (no host sync). The split costs three passes (the maps A and C,
    then the outputs) for (num_sms // HV)-fold parallelism, so it is taken when sequences x heads
    fill at most half the SMs, a segment is under a third of a mean sequence and the mean
    sequence has _MIN_SPLIT_TOKENS tokens.
    KDA_EXT_FUSED_SEGMENTS: auto (default), on (split whenever there are two cells), off."""
    switch = _switch("KDA_EXT_FUSED_SEGMENTS")
    if switch not in ("auto", "on", "off"):
        raise ValueError(f"kda_ext: KDA_EXT_FUSED_SEGMENTS must be auto, on or off, got {switch!r}")
    cells = num_sms // max(HV, 1)
    if switch == "off" or cells < 2 or total_tokens < 2 * 16:
        return None
    per_cell = -(-total_tokens // cells)
    seg_len = max(16, -(-per_cell // 16) * 16)  # a whole number of 16-row chunks
    if switch == "auto" and (2 * num_seqs * HV > num_sms or 3 * seg_len * num_seqs > total_tokens
                             or total_tokens < _MIN_SPLIT_TOKENS * num_seqs):
        return None
    return seg_len


def log_forward(q: torch.Tensor, v: torch.Tensor, chunk_size: int, safe_gate: bool,
                fused_gate_variant: Optional[str] = None, num_seqs: int = 1) -> None:
    """The debug log line of one forward call (free when DEBUG is off)."""
    if not logger.isEnabledFor(logging.DEBUG):
        return
    from ._build_info import load_build_config

    if fused_gate_variant is not None:
        fused_cluster = fused_forward_cluster(
            num_seqs=num_seqs, HV=v.shape[2], gate_variant=fused_gate_variant,
            num_sms=torch.cuda.get_device_properties(q.device).multi_processor_count)
        logger.debug("chunk_kda forward on %s %s K=%d V=%d: fused_fwd_sm90 (one kernel, chunk 16, %s gate, %s)",
                     q.device, str(q.dtype).replace("torch.", ""), q.shape[-1], v.shape[-1], fused_gate_variant,
                     "2-CTA clusters" if fused_cluster else "one CTA per sequence and head")
        return
    config = load_build_config() or {}
    plan = forward_kernels(device_type=q.device.type, dtype=q.dtype, K=q.shape[-1], V=v.shape[-1],
                           chunk_size=chunk_size, safe_gate=safe_gate,
                           with_sm90=bool(config.get("WITH_SM90")))
    logger.debug("chunk_kda forward on %s %s K=%d V=%d chunk=%d: intra-chunk %s, state/output %s",
                 q.device, str(q.dtype).replace("torch.", ""), q.shape[-1], v.shape[-1], chunk_size,
                 plan["intra_chunk"], plan["state_output"])

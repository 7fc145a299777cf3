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
from typing import Dict

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


def log_forward(q: torch.Tensor, v: torch.Tensor, chunk_size: int, safe_gate: bool) -> None:
    """The debug log line of one forward call (free when DEBUG is off)."""
    if not logger.isEnabledFor(logging.DEBUG):
        return
    from ._build_info import load_build_config

    config = load_build_config() or {}
    plan = forward_kernels(device_type=q.device.type, dtype=q.dtype, K=q.shape[-1], V=v.shape[-1],
                           chunk_size=chunk_size, safe_gate=safe_gate,
                           with_sm90=bool(config.get("WITH_SM90")))
    logger.debug("chunk_kda forward on %s %s K=%d V=%d chunk=%d: intra-chunk %s, state/output %s",
                 q.device, str(q.dtype).replace("torch.", ""), q.shape[-1], v.shape[-1], chunk_size,
                 plan["intra_chunk"], plan["state_output"])

"""kda_ext: Kimi Delta Attention's chunk_kda as PyTorch custom ops (CUDA for Hopper, and a CPU backend)."""

import torch  # noqa: F401  (must come first: _C links against libtorch/libc10, which torch loads)

from . import _C  # noqa: F401  (loads the shared object: registers the op schemas and kernels)
from . import ops  # noqa: F401  (fakes and autograd; must come after _C)
from .chunk import chunk_kda
from .reference import (
    l2norm,
    naive_chunk_kda,
    naive_kda_gate,
    naive_kda_lowerbound_gate,
    naive_recurrent_kda,
)

__all__ = [
    "chunk_kda",
    "naive_recurrent_kda",
    "naive_chunk_kda",
    "naive_kda_gate",
    "naive_kda_lowerbound_gate",
    "l2norm",
]

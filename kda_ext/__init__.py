"""kda_ext: Kimi Delta Attention's chunk_kda as PyTorch custom ops (CUDA for Hopper, and a CPU backend)."""

import torch  # noqa: F401  (must come first: _C links against libtorch/libc10, which torch loads)

from ._build_info import build_info, load_build_config, print_build_info
from ._version import __version__


def _explain_load_failure(error: ImportError) -> str:
    config = load_build_config()
    if config is None:
        return (f"kda_ext's compiled part (kda_ext._C) is missing: {error}. Install it with `pip install .`, "
                "or in a checkout build it in place with `python setup.py build_ext --inplace`")
    built = config.get("TORCH_VERSION")
    if built != torch.__version__:
        return (f"kda_ext._C was built against torch {built} but this is torch {torch.__version__}, whose "
                f"C++ ABI differs ({error}). Rebuild against this torch: `pip install --no-build-isolation .` "
                "(or `python setup.py build_ext --inplace` in a checkout)")
    return f"kda_ext._C failed to load: {error}"


try:
    from . import _C  # noqa: F401  (loads the shared object: registers the op schemas and kernels)
except ImportError as _error:
    raise ImportError(_explain_load_failure(_error)) from _error
from . import ops  # noqa: F401  (fakes and autograd; must come after _C)
from .chunk import chunk_kda
from .cp import CPContext, build_cp_context
from .recurrent import fused_recurrent_kda
from . import fla, nn  # noqa: E402  (kda_ext.fla.register() is explicit: importing does nothing)
from .reference import (
    l2norm,
    naive_chunk_kda,
    naive_kda_gate,
    naive_kda_lowerbound_gate,
    naive_recurrent_kda,
)

__all__ = [
    "__version__",
    "build_info",
    "print_build_info",
    "chunk_kda",
    "build_cp_context",
    "CPContext",
    "fused_recurrent_kda",
    "naive_recurrent_kda",
    "naive_chunk_kda",
    "naive_kda_gate",
    "naive_kda_lowerbound_gate",
    "l2norm",
]

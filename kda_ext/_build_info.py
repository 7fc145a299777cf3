"""What this install of kda_ext was built with, what it finds at run time, and which kernels it uses.

Reads kda_ext/_build_config.py (written by setup.py's build_ext next to the compiled _C) and never
imports _C itself, so it also explains an install whose _C does not load.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Optional, Tuple

import torch

from ._version import __version__


def load_build_config() -> Optional[dict]:
    """The build's record as a dict (WITH_CUDA, CUDA_REASON, ...), or None when kda_ext is not built."""
    try:
        from . import _build_config
    except ImportError:
        return None
    return {key: getattr(_build_config, key) for key in dir(_build_config) if key.isupper()}


def arch_runs_on(arch: str, capability: Tuple[int, int]) -> bool:
    """Whether SASS compiled for `arch` ("90a", "80", ...) runs on a device of `capability`.

    Architecture-specific targets ("90a") run only on that exact architecture; plain ones run on
    the same major version with an equal or higher minor (setup.py embeds no PTX to JIT from).
    """
    found = re.fullmatch(r"(\d+)(\d)([a-z]?)", arch)
    if found is None:
        return False
    major, minor, suffix = int(found.group(1)), int(found.group(2)), found.group(3)
    if suffix:
        return capability == (major, minor)
    return capability[0] == major and capability[1] >= minor


def _device() -> Optional[dict]:
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    return {
        "index": index,
        "name": torch.cuda.get_device_name(index),
        "capability": tuple(torch.cuda.get_device_capability(index)),
        "count": torch.cuda.device_count(),
    }


def _kernel_paths(config: Optional[dict], device: Optional[dict]) -> dict:
    """{path: (used, why)} for the CPU backend, the portable CUDA kernels and the sm90 (Hopper) path."""
    if config is None:
        missing = (False, "kda_ext is not built (no kda_ext/_build_config.py)")
        return {"cpu": missing, "cuda": missing, "sm90": missing}
    paths = {"cpu": (True, f"C++/OpenMP kernels for CPU tensors ({torch.get_num_threads()} threads)")}
    archs = [a for a in config.get("CUDA_ARCHS", "").split(";") if a]
    cap = device["capability"] if device else None
    sm = f"sm_{cap[0]}{cap[1]}" if cap else None

    if not config.get("WITH_CUDA"):
        paths["cuda"] = (False, f"not built: {config.get('CUDA_REASON', 'unknown reason')}")
    elif device is None:
        paths["cuda"] = (False, f"built for {', '.join('sm_' + a for a in archs)}, but torch sees no CUDA device")
    elif not any(arch_runs_on(a, cap) for a in archs):
        paths["cuda"] = (False, f"built for {', '.join('sm_' + a for a in archs)}, which does not run on "
                                f"{device['name']} ({sm}): rebuild with KDA_EXT_CUDA_ARCHS including it")
    else:
        paths["cuda"] = (True, f"portable CUDA kernels on {device['name']} ({sm})")

    if not config.get("WITH_SM90"):
        if not config.get("WITH_CUDA"):
            why = "no CUDA build"
        elif "90a" not in archs:
            why = "90a is not in KDA_EXT_CUDA_ARCHS"
        else:
            why = "this version has no sm90 sources (csrc/cuda/sm90)"
        paths["sm90"] = (False, f"not compiled: {why}")
    elif device is None or not arch_runs_on("90a", cap):
        paths["sm90"] = (False, "compiled, but the device is not sm_90" + (f" ({device['name']}, {sm})" if device else " (no CUDA device)"))
    else:
        paths["sm90"] = (True, f"Hopper (sm_90a) kernels compiled in, on {device['name']}")
    return paths


def build_info() -> dict:
    """Version, build configuration, run-time torch and device, and the kernel paths kda_ext uses.

    Keys: version, package_dir, build (the build's record, None when not built), torch,
    torch_cuda, device (None without a CUDA device) and kernels ({"cpu"|"cuda"|"sm90": (used, why)}).
    """
    config = load_build_config()
    device = _device()
    return {
        "version": __version__,
        "package_dir": os.path.dirname(os.path.abspath(__file__)),
        "build": config,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": device,
        "kernels": _kernel_paths(config, device),
    }


def print_build_info(file=None) -> None:
    """Print build_info() for a person (what `python -m kda_ext` shows)."""
    out = file or sys.stdout
    info = build_info()
    config = info["build"]
    lines = [f"kda_ext {info['version']} ({info['package_dir']})"]
    if config is None:
        lines.append("build:   not built (run `pip install .`, or `python setup.py build_ext --inplace` in a checkout)")
    else:
        lines.append(f"build:   {'CUDA' if config.get('WITH_CUDA') else 'CPU-only'} ({config.get('CUDA_REASON')})")
        lines.append(f"         built against torch {config.get('TORCH_VERSION')} (CUDA {config.get('TORCH_CUDA_VERSION')})"
                     f"; CUDA archs: {config.get('CUDA_ARCHS') or '-'}; nvcc: {config.get('NVCC_VERSION') or '-'}"
                     f"; CUTLASS: {config.get('CUTLASS_VERSION') or '-'}; WITH_SM90: {config.get('WITH_SM90')}"
                     f"{'; debug' if config.get('DEBUG') else ''}"
                     f"{'; PROFILE_SECTIONS (kernels print section timings: a development build)' if config.get('PROFILE_SECTIONS') else ''}")
        if config.get("TORCH_VERSION") != info["torch"]:
            lines.append(f"         WARNING: running torch {info['torch']}, not the torch it was built against: rebuild")
    lines.append(f"runtime: torch {info['torch']} (CUDA {info['torch_cuda']})")
    device = info["device"]
    if device is None:
        lines.append("device:  no CUDA device (torch.cuda.is_available() is False): CPU only")
    else:
        cap = device["capability"]
        lines.append(f"device:  cuda:{device['index']} {device['name']} (sm_{cap[0]}{cap[1]}), {device['count']} visible")
    lines.append("kernels:")
    labels = {"cpu": "cpu", "cuda": "cuda portable", "sm90": "cuda sm90"}
    for key, label in labels.items():
        used, why = info["kernels"][key]
        lines.append(f"  {label:<14} {'yes' if used else 'no ':<4} {why}")
    print("\n".join(lines), file=out)

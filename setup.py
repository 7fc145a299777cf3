# kda_ext build: one extension, kda_ext._C, built with torch.utils.cpp_extension.
#
# Switches (environment variables):
#   KDA_EXT_CUDA=auto|0|1     auto (default): build the CUDA kernels only when torch is a CUDA build
#                             and the CUDA toolkit is complete and matches it (nvcc, libcudart to
#                             link, nvcc's major version == torch.version.cuda's); otherwise build
#                             CPU-only and print one line saying why.
#                             1: require the CUDA kernels (fails before compiling, with the reason).
#                             0: CPU-only build (every op still registered, CPU kernels only).
#   KDA_EXT_CUDA_ARCHS        semicolon list of SM targets, default "90a" (Hopper, wgmma-capable).
#   KDA_EXT_DEBUG=1           -O0 -g (and -G for device code).
#   KDA_EXT_PROFILE_SECTIONS=1  kernels print per-section cycle counts of one watched warp
#                             (csrc/cuda/section_clock.cuh; development builds only).
#   MAX_JOBS, NVCC_THREADS    parallel compile jobs / nvcc threads.
#
# What was built is recorded in kda_ext/_build_config.py, written by build_ext into the build
# directory (so a non-editable install never writes into the checkout) and, for in-place or
# editable builds only, beside the sources. `python -m kda_ext` prints it.
#
# The version lives in kda_ext/_version.py alone (pyproject.toml reads it from there).
import dataclasses
import glob
import importlib.util
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))

# The CUTLASS release whose headers (CuTe, pipelines) the sm90 kernels are written against; also
# pinned in pyproject.toml's [build-system] requires.
CUTLASS_REQUIREMENT = "nvidia-cutlass==4.2.0.0"


def _sources(pattern):
    # Relative to setup.py: setuptools rejects absolute source paths (pip install -e . fails).
    found = glob.glob(os.path.join(ROOT, pattern), recursive=True)
    return sorted(os.path.relpath(path, ROOT) for path in found)


def parse_archs(text):
    return [a.strip() for a in text.replace(",", ";").split(";") if a.strip()]


@dataclasses.dataclass
class CudaProbe:
    """What the build machine offers for a CUDA build (gathered by probe_cuda, judged by decide_cuda)."""

    torch_version: str
    torch_cuda: "str | None"          # torch.version.cuda: None for a CPU (or ROCm) build of torch
    cuda_home: "str | None"           # torch.utils.cpp_extension.CUDA_HOME
    cuda_home_from_env: bool          # CUDA_HOME/CUDA_PATH set, rather than guessed from nvcc on PATH
    nvcc_path: "str | None"           # CUDA_HOME/bin/nvcc when it exists
    nvcc_version: "str | None"        # "13.0" from `nvcc --version`
    cudart_dir: "str | None"          # the folder torch links CUDA libraries from
    has_cudart: bool                  # libcudart.so in cudart_dir (what -lcudart needs)
    has_runtime_header: bool          # CUDA_HOME/include/cuda_runtime.h
    nvcc_toolkit_root: "str | None" = None  # where nvcc really runs from (a hint when CUDA_HOME is off)


def _nvcc_version(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def _nvcc_toolkit_root(nvcc):
    # nvcc on PATH may be a wrapper script (here /usr/local/bin/nvcc execs the real one), so
    # torch's guess of CUDA_HOME (two folders above it) can miss the toolkit. `nvcc --dryrun`
    # names the folder nvcc really runs from.
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
    return os.path.dirname(found.group(1)) if found else None


def probe_cuda():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc is not None and not os.path.exists(nvcc):
        nvcc = None
    cudart_dir = None
    if CUDA_HOME:
        # The folder torch's CUDAExtension links from (-L): lib64, or lib where only that exists.
        cudart_dir = os.path.join(CUDA_HOME, "lib64")
        if not os.path.exists(cudart_dir) and os.path.exists(os.path.join(CUDA_HOME, "lib")):
            cudart_dir = os.path.join(CUDA_HOME, "lib")
    return CudaProbe(
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_home=CUDA_HOME,
        cuda_home_from_env=bool(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")),
        nvcc_path=nvcc,
        nvcc_version=_nvcc_version(nvcc) if nvcc else None,
        cudart_dir=cudart_dir,
        has_cudart=bool(cudart_dir) and os.path.exists(os.path.join(cudart_dir, "libcudart.so")),
        has_runtime_header=bool(CUDA_HOME) and os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")),
        nvcc_toolkit_root=_nvcc_toolkit_root(nvcc) if nvcc else None,
    )


def cuda_blocker(probe):
    """Why no CUDA build is possible with what `probe` found, and how to get one; None if it is."""
    if probe.torch_cuda is None:
        return (f"torch {probe.torch_version} is not a CUDA build",
                "install a CUDA build of torch and a CUDA toolkit of the same major version")
    where = "CUDA_HOME" if probe.cuda_home_from_env else "CUDA_HOME (guessed from nvcc on PATH)"
    if probe.cuda_home is None:
        return ("no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset)",
                f"install the CUDA {probe.torch_cuda.split('.')[0]}.x toolkit and set CUDA_HOME")
    if probe.nvcc_path is None:
        return (f"{where}={probe.cuda_home} has no bin/nvcc",
                "set CUDA_HOME to a complete CUDA toolkit")
    if probe.nvcc_version is None:
        return (f"`{probe.nvcc_path} --version` did not report a CUDA release",
                "set CUDA_HOME to a working CUDA toolkit")
    if probe.nvcc_version.split(".")[0] != probe.torch_cuda.split(".")[0]:
        return (f"nvcc is CUDA {probe.nvcc_version} but torch {probe.torch_version} was built with CUDA "
                f"{probe.torch_cuda} (the major versions must match)",
                f"use a CUDA {probe.torch_cuda.split('.')[0]}.x toolkit (CUDA_HOME), or a torch built for "
                f"CUDA {probe.nvcc_version.split('.')[0]}")
    if not probe.has_cudart or not probe.has_runtime_header:
        missing = "libcudart.so in " + str(probe.cudart_dir) if not probe.has_cudart else "include/cuda_runtime.h"
        hint = "set CUDA_HOME to the complete toolkit"
        if (probe.nvcc_toolkit_root and os.path.realpath(probe.nvcc_toolkit_root) != os.path.realpath(probe.cuda_home)):
            hint += f" (nvcc runs from {probe.nvcc_toolkit_root}: CUDA_HOME={probe.nvcc_toolkit_root})"
        return f"the CUDA toolkit at {where}={probe.cuda_home} is incomplete: no {missing}", hint
    return None


def decide_cuda(mode, probe):
    """(with_cuda, reason) for KDA_EXT_CUDA=`mode`; raises SystemExit for mode "1" when impossible.

    The reason is one line: why CUDA is on or off, and for "off", how to get it.
    """
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"error: KDA_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "KDA_EXT_CUDA=0 (CPU-only build requested)"
    blocker = cuda_blocker(probe)
    if blocker is None:
        return True, (f"{'KDA_EXT_CUDA=1' if mode == '1' else 'auto'}: torch {probe.torch_version} "
                      f"(CUDA {probe.torch_cuda}) with nvcc {probe.nvcc_version} at {probe.cuda_home}")
    why, how = blocker
    if mode == "1":
        raise SystemExit(f"error: KDA_EXT_CUDA=1 but the CUDA kernels cannot be built: {why}. "
                         f"To fix: {how}; or build CPU-only with KDA_EXT_CUDA=0.")
    return False, f"{why}; for the CUDA kernels {how}, then rebuild with KDA_EXT_CUDA=1"


def find_cutlass_include():
    """The include folder (holding cute/ and cutlass/) of the installed nvidia-cutlass, or None.

    Found with importlib, without importing the package (its __init__ pulls cuda-python and
    more, which a --no-deps or --target install such as scripts/device_check.sh's may lack).
    """
    try:
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        return None
    for base in (spec.submodule_search_locations or []) if spec else []:
        include = os.path.join(base, "source", "include")
        if os.path.isdir(os.path.join(include, "cute")) and os.path.isdir(os.path.join(include, "cutlass")):
            return include
    return None


def cutlass_version(include):
    try:
        with open(os.path.join(include, "cutlass", "version.h")) as f:
            text = f.read()
    except OSError:
        return None
    parts = [re.search(rf"#define CUTLASS_{p} (\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else None


def require_cutlass():
    include = find_cutlass_include()
    if include is None:
        raise SystemExit(
            "error: the CUDA build needs the CUTLASS headers (CuTe) from the nvidia-cutlass package, "
            f"which is not installed: `pip install {CUTLASS_REQUIREMENT}` (pip install . with build "
            "isolation installs it itself), or build CPU-only with KDA_EXT_CUDA=0")
    return include


def build_config_text(config):
    lines = ["# Written by kda_ext's setup.py (build_ext): what this build of kda_ext contains."]
    lines += [f"{key} = {value!r}" for key, value in config.items()]
    return "\n".join(lines) + "\n"


def _extensions_and_config():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    mode = os.environ.get("KDA_EXT_CUDA", "auto").strip().lower()
    archs = parse_archs(os.environ.get("KDA_EXT_CUDA_ARCHS", "90a"))
    probe = probe_cuda() if mode != "0" else None
    with_cuda, reason = decide_cuda(mode, probe)
    if with_cuda and not archs:
        raise SystemExit("error: KDA_EXT_CUDA_ARCHS is empty: name at least one SM target, e.g. 90a")
    cutlass_include = require_cutlass() if with_cuda else None
    print(f"kda_ext: {'building with CUDA' if with_cuda else 'building CPU-only'}: {reason}", flush=True)

    debug = os.environ.get("KDA_EXT_DEBUG", "0") == "1"
    profile_sections = os.environ.get("KDA_EXT_PROFILE_SECTIONS", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++20", "-fopenmp"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    # The Hopper (wgmma/TMA) sources compile only for sm_90a, so they come in only when it is a target.
    sm90_sources = _sources("csrc/cuda/sm90/*.cu")
    with_sm90 = with_cuda and "90a" in archs and bool(sm90_sources)
    if with_cuda:
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo", "-DNDEBUG"]
        nvcc += [
            "-std=c++20",
            "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "--ptxas-options=--warn-on-spills",
            f"--threads={os.environ.get('NVCC_THREADS', '4')}",
        ] + [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
        defines = ["-DKDA_EXT_WITH_CUDA"] + (["-DKDA_EXT_WITH_SM90"] if with_sm90 else [])
        defines += ["-DKDA_EXT_PROFILE_SECTIONS"] if profile_sections else []
        sources += _sources("csrc/cuda/*.cu") + (sm90_sources if with_sm90 else [])
        ext = CUDAExtension(
            "kda_ext._C",
            sources,
            include_dirs=include_dirs + [cutlass_include],
            extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "kda_ext._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    config = {
        "WITH_CUDA": with_cuda,
        "CUDA_REASON": reason,
        "CUDA_ARCHS": ";".join(archs) if with_cuda else "",
        "WITH_SM90": with_sm90,
        "TORCH_VERSION": torch.__version__,
        "TORCH_CUDA_VERSION": torch.version.cuda,
        "NVCC_VERSION": probe.nvcc_version if with_cuda else None,
        "CUTLASS_VERSION": cutlass_version(cutlass_include) if cutlass_include else None,
        "DEBUG": debug,
        "PROFILE_SECTIONS": bool(with_cuda and profile_sections),
    }
    return [ext], config


def _torch_requirement():
    # The extension links against this torch's C++ ABI, which changes between releases: the wheel
    # asks for the torch it was built against, so pip cannot pair it with another one.
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


def _cmdclass(config):
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=True)

    class BuildExtensionWithConfig(base):
        """torch's BuildExtension, plus kda_ext/_build_config.py written next to the built _C."""

        def run(self):
            super().run()
            text = build_config_text(config)
            targets = [os.path.join(self.build_lib, "kda_ext", "_build_config.py")]
            if self.inplace or getattr(self, "editable_mode", False):
                targets.append(os.path.join(ROOT, "kda_ext", "_build_config.py"))
            for path in targets:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)

    return {"build_ext": BuildExtensionWithConfig}


if __name__ == "__main__":
    # setuptools' PEP 517 backend runs this file as __main__ too; tests import it under another
    # name to check the CUDA decision without building.
    from setuptools import setup

    extensions, build_config = _extensions_and_config()
    setup(
        ext_modules=extensions,
        cmdclass=_cmdclass(build_config),
        install_requires=[_torch_requirement()],
        zip_safe=False,
    )

# kda_ext build: one extension, kda_ext._C, built with torch.utils.cpp_extension.
#
# Switches (environment variables, documented in README.md):
#   KDA_EXT_CUDA=auto|0|1     auto (default): build the CUDA kernels when nvcc (CUDA_HOME) is found
#                             and torch is a CUDA build; 1: require them (fail loudly otherwise);
#                             0: CPU-only build (every op still registered, CPU kernels only).
#   KDA_EXT_CUDA_ARCHS        semicolon list of SM targets, default "90a" (Hopper, wgmma-capable).
#   KDA_EXT_DEBUG=1           -O0 -g (and -G for device code).
#   MAX_JOBS, NVCC_THREADS    parallel compile jobs / nvcc threads.
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    # Relative to setup.py: setuptools rejects absolute source paths (pip install -e . fails).
    found = glob.glob(os.path.join(ROOT, pattern), recursive=True)
    return sorted(os.path.relpath(path, ROOT) for path in found)


def _want_cuda():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    mode = os.environ.get("KDA_EXT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"KDA_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    have = CUDA_HOME is not None and torch.version.cuda is not None
    if mode == "1" and not have:
        raise RuntimeError(
            "KDA_EXT_CUDA=1 but no CUDA build is possible: "
            f"CUDA_HOME={CUDA_HOME!r}, torch.version.cuda={torch.version.cuda!r} "
            "(install a CUDA build of torch and the CUDA toolkit, or set KDA_EXT_CUDA=0)"
        )
    return have if mode == "auto" else mode == "1"


def _gencode_flags():
    archs = os.environ.get("KDA_EXT_CUDA_ARCHS", "90a")
    flags = []
    for arch in [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _write_build_config(with_cuda, archs):
    path = os.path.join(ROOT, "kda_ext", "_build_config.py")
    text = (
        "# Written by setup.py: what this build of kda_ext contains.\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCHS = {archs!r}\n"
    )
    with open(path, "w") as f:
        f.write(text)


def _cutlass_include():
    """The CUTLASS/CuTe headers of the installed `nvidia-cutlass` package (cutlass_library's
    source/include), found without importing it; None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    for base in (spec.submodule_search_locations or []) if spec else []:
        inc = os.path.join(base, "source", "include")
        if os.path.isdir(os.path.join(inc, "cute")):
            return inc
    return None


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = _want_cuda()
    debug = os.environ.get("KDA_EXT_DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++20", "-fopenmp"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    archs = []
    if with_cuda:
        archs = os.environ.get("KDA_EXT_CUDA_ARCHS", "90a")
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
        ] + _gencode_flags()
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/sm90/*.cu")
        cutlass_inc = _cutlass_include()
        if cutlass_inc is None:
            raise RuntimeError(
                "kda_ext: the CUDA build needs the CUTLASS/CuTe headers of the nvidia-cutlass "
                "package: pip install nvidia-cutlass==4.2.0.0 (or build CPU-only: KDA_EXT_CUDA=0)")
        include_dirs = include_dirs + [cutlass_inc]
        ext = CUDAExtension(
            "kda_ext._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DKDA_EXT_WITH_CUDA"], "nvcc": nvcc},
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
    _write_build_config(with_cuda, archs)
    return [ext]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="kda_ext",
    version="0.1.0",
    packages=find_packages(include=["kda_ext", "kda_ext.*"]),
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    zip_safe=False,
)

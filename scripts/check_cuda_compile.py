"""kda_ext: compile every CUDA source with nvcc, without linking, to prove it builds for sm_90a.

CI machines have nvcc but a CPU build of torch, so setup.py builds the CPU-only extension there.
This check compiles csrc/cuda/*.cu and csrc/cuda/sm90/*.cu against the same torch headers (the CPU
wheel ships the ATen/c10 CUDA headers) and the CUTLASS headers of the installed nvidia-cutlass, with
the flags setup.py uses, so a CUDA compile error fails CI; a generated source including CuTe and
CUTLASS's pipelines checks those headers compile too. It then looks for strong symbols defined in
more than one object (nm): a non-template __global__ function in a header included by two sources
compiles everywhere but fails the GPU build's link. Each compile's time is printed.
Usage: python scripts/check_cuda_compile.py [--jobs N] [--arch 90a]
"""
import argparse
import concurrent.futures
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiled beside the project's sources: the headers the sm90 kernels build on must compile for
# sm_90a with the pinned CUTLASS, whether or not a source includes them yet.
CUTLASS_PROBE = """#include <cute/tensor.hpp>
#include <cutlass/pipeline/pipeline.hpp>
__global__ void kda_cutlass_probe(float* out) {
  auto layout = cute::make_layout(cute::make_shape(cute::Int<4>{}, cute::Int<8>{}));
  out[threadIdx.x] = static_cast<float>(cute::size(layout));
}
"""


def load_setup():
    """setup.py as a module (it builds only when run as __main__): one place for the build's rules."""
    spec = importlib.util.spec_from_file_location("kda_ext_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = os.path.join(cuda_home, "bin", "nvcc")
    return cand if os.path.exists(cand) else shutil.which("nvcc")


def stub_include_dir(out_dir):
    """Headers a CPU build of torch leaves out but its c10/cuda headers include.

    The CUDA wheels generate c10/cuda/impl/cuda_cmake_macros.h at build time; the CPU wheel ships the
    c10/cuda headers without it. An empty stand-in (the real one only sets C10_CUDA_BUILD_SHARED_LIBS,
    which matters for linking, not for compiling) lets the translation units compile as they would
    against a CUDA torch. Placed after torch's own include paths, so a real header always wins.
    """
    stub = os.path.join(out_dir, "stub_include")
    path = os.path.join(stub, "c10", "cuda", "impl", "cuda_cmake_macros.h")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return stub


def nvcc_command(nvcc, src, obj, arch, stub_dir, cutlass_include=None):
    from torch.utils.cpp_extension import include_paths

    import torch

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [
        nvcc, "-std=c++20", "-O3", "--expt-relaxed-constexpr",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "--ptxas-options=--warn-on-spills",
        "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-I" + os.path.join(ROOT, "csrc"), "-I" + sysconfig.get_paths()["include"],
    ]
    cmd += ["-I" + p for p in include_paths()]
    cmd += ["-I" + stub_dir] + (["-I" + cutlass_include] if cutlass_include else [])
    cmd += ["-c", src, "-o", obj]
    return cmd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--arch", default="90a")
    args = ap.parse_args()
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found", file=sys.stderr)
        return 2
    setup_module = load_setup()
    cutlass_include = setup_module.find_cutlass_include()
    if cutlass_include is None:
        print(f"FAIL the CUTLASS headers are missing: pip install {setup_module.CUTLASS_REQUIREMENT}", file=sys.stderr)
        return 1
    print(f"nvcc {nvcc}; CUTLASS {setup_module.cutlass_version(cutlass_include)} at {cutlass_include}")
    sources = cuda_sources()
    if not sources:
        print("no CUDA sources found under csrc/cuda", file=sys.stderr)
        return 1
    out_dir = tempfile.mkdtemp(prefix="kda_cuda_check_")
    stub_dir = stub_include_dir(out_dir)
    probe = os.path.join(out_dir, "cutlass_headers_probe.cu")
    with open(probe, "w") as f:
        f.write(CUTLASS_PROBE)

    def object_path(src):
        # sm90/x.cu and x.cu may share a base name: keep the folder in the object's name.
        return os.path.join(out_dir, os.path.relpath(src, ROOT).replace(os.sep, "_") + ".o")

    def compile_one(src):
        start = time.monotonic()
        cmd = nvcc_command(nvcc, src, object_path(src), args.arch, stub_dir, cutlass_include)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return src, proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start

    failed = 0
    objects = []
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for src, rc, log, seconds in pool.map(compile_one, sources + [probe]):
            name = os.path.relpath(src, ROOT) if src != probe else "(generated) cute/tensor.hpp + cutlass/pipeline/pipeline.hpp"
            print(f"{'ok  ' if rc == 0 else 'FAIL'} {seconds:6.1f} s  {name}", flush=True)
            if rc != 0 or "warning" in log.lower():
                print(log)
            failed += rc != 0
            if rc == 0 and src != probe:
                objects.append(object_path(src))
    print(f"{len(sources) + 1} compiles for sm_{args.arch} in {time.monotonic() - started:.1f} s "
          f"({args.jobs} at a time), {failed} failed")
    duplicates = duplicate_definitions(objects)
    for symbol, where in sorted(duplicates.items()):
        print(f"FAIL multiple definition of {symbol} in {', '.join(where)}")
    shutil.rmtree(out_dir, ignore_errors=True)
    return 1 if failed or duplicates else 0


def cuda_sources():
    """csrc/cuda/*.cu, and csrc/cuda/sm90/*.cu (the Hopper kernels) where that folder exists."""
    found = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    found += glob.glob(os.path.join(ROOT, "csrc", "cuda", "sm90", "*.cu"))
    return sorted(found)


def duplicate_definitions(objects):
    """{symbol: [objects]} for strong (non-weak) global symbols defined in more than one object."""
    nm = shutil.which("nm")
    if nm is None or len(objects) < 2:
        return {}
    seen = {}
    for obj in objects:
        out = subprocess.run([nm, "--defined-only", "--extern-only", obj], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in "TDBR":  # W/V (weak), u (unique) may repeat
                seen.setdefault(parts[2], []).append(os.path.basename(obj))
    return {s: w for s, w in seen.items() if len(w) > 1}


if __name__ == "__main__":
    sys.exit(main())

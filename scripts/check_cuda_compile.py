"""kda_ext: compile every CUDA source with nvcc, without linking, to prove it builds for sm_90a.

CI machines have nvcc but a CPU build of torch, so setup.py builds the CPU-only extension there.
This check compiles csrc/cuda/*.cu against the same torch headers (the CPU wheel ships the ATen/c10
CUDA headers) with the flags setup.py uses, so a CUDA compile error fails CI. It then looks for
strong symbols defined in more than one object (nm): a non-template __global__ function in a header
included by two sources compiles everywhere but fails the GPU build's link.
Usage: python scripts/check_cuda_compile.py [--jobs N] [--arch 90a]
"""
import argparse
import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def nvcc_command(nvcc, src, obj, arch, stub_dir):
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
    cmd += ["-I" + stub_dir]
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
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not sources:
        print("no CUDA sources found under csrc/cuda", file=sys.stderr)
        return 1
    out_dir = tempfile.mkdtemp(prefix="kda_cuda_check_")
    stub_dir = stub_include_dir(out_dir)

    def compile_one(src):
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        proc = subprocess.run(nvcc_command(nvcc, src, obj, args.arch, stub_dir), capture_output=True, text=True)
        return src, proc.returncode, proc.stdout + proc.stderr

    failed = 0
    objects = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for src, rc, log in pool.map(compile_one, sources):
            name = os.path.relpath(src, ROOT)
            print(f"{'ok  ' if rc == 0 else 'FAIL'} {name}")
            if rc != 0 or "warning" in log.lower():
                print(log)
            failed += rc != 0
            if rc == 0:
                objects.append(os.path.join(out_dir, os.path.basename(src) + ".o"))
    duplicates = duplicate_definitions(objects)
    for symbol, where in sorted(duplicates.items()):
        print(f"FAIL multiple definition of {symbol} in {', '.join(where)}")
    shutil.rmtree(out_dir, ignore_errors=True)
    return 1 if failed or duplicates else 0


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

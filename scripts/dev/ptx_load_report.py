"""kda_ext: find global loads that wait for memory one at a time, from the PTX (no GPU needed).

  python scripts/dev/ptx_load_report.py [KERNEL_SUBSTRING ...] [--arch 90a]

Compiles csrc/cuda/launch_fwd.cu and launch_bwd.cu to PTX with the flags of
scripts/check_cuda_compile.py and prints, per kernel, how many ld.global instructions there are
and how many sit alone (or in a pair) in a basic block that also uses the loaded value. Such a
load is the pattern `if (row < len) x = convert(load(...))`: the use waits for the load before the
branch ends, so N of them cost N memory round trips instead of one. It was the first stall of
chunk_prepare (commit 4d13350 cut that kernel by 27% by clamping the offsets and loading without
branches). A static count: a load in a loop counts once; use it to find the places, then measure.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

# check_cuda_compile.py (the flags) stays in scripts/, the CI's CUDA compile step.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import check_cuda_compile as ccc  # noqa: E402

LOAD = re.compile(r"\s*ld\.global\S*\s+(\{[^}]*\}|%\w+),")


LOC = re.compile(r"\s*\.loc\s+(\d+)\s+(\d+)")


def kernel_report(ptx_text, patterns, where=None):
    """(kernel name, global loads, serialising loads) for every .entry matching a pattern. With
    `where` (a dict), also counts the serialising loads per (file index, line) of the PTX's
    .loc directives (present when compiled with -lineinfo) into where[name]."""
    rows = []
    for entry in re.finditer(r"\.entry\s+(\S+)\((.*?)\n\}\n", ptx_text, re.S):
        name = entry.group(1)
        if patterns and not any(p in name for p in patterns):
            continue
        total = lonely = 0
        loc = None
        for block in re.split(r"\n\$L__BB\d+_\d+:", entry.group(0)):
            lines = block.split("\n")
            locs = []  # the .loc in force at each line
            for line in lines:
                m = LOC.match(line)
                if m:
                    loc = (int(m.group(1)), int(m.group(2)))
                locs.append(loc)
            loads = [i for i, line in enumerate(lines) if LOAD.match(line)]
            total += len(loads)
            if len(loads) > 2:
                continue
            for i in loads:
                regs = re.findall(r"%\w+", LOAD.match(lines[i]).group(1))
                rest = "\n".join(lines[i + 1:])
                if any(re.search(re.escape(r) + r"\b", rest) for r in regs):
                    lonely += 1
                    if where is not None and locs[i] is not None:
                        counts = where.setdefault(name, {})
                        counts[locs[i]] = counts.get(locs[i], 0) + 1
        rows.append((name, total, lonely))
    return rows


def ptx_files(ptx_text):
    """File index -> path, from the PTX's .file directives."""
    return {int(m.group(1)): m.group(2) for m in re.finditer(r'\.file\s+(\d+)\s+"([^"]+)"', ptx_text)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("patterns", nargs="*", help="substrings of mangled kernel names (default: all)")
    ap.add_argument("--arch", default="90a")
    ap.add_argument("--where", action="store_true",
                    help="compile with -lineinfo and list the source lines of the one-at-a-time loads")
    args = ap.parse_args()
    nvcc = ccc.find_nvcc()
    if nvcc is None:
        print("nvcc not found", file=sys.stderr)
        return 2
    out_dir = tempfile.mkdtemp(prefix="kda_ptx_")
    stub = ccc.stub_include_dir(out_dir)
    print(f"{'kernel':<90} {'ld.global':>9} {'one at a time':>13}")
    for src in ("launch_fwd.cu", "launch_bwd.cu"):
        ptx = os.path.join(out_dir, src + ".ptx")
        cmd = [x for x in ccc.nvcc_command(nvcc, os.path.join(ccc.ROOT, "csrc", "cuda", src), ptx,
                                           args.arch, stub) if x != "-c"] + ["-ptx"]
        if args.where:
            cmd.append("-lineinfo")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        with open(ptx) as f:
            text = f.read()
        where = {} if args.where else None
        for name, total, lonely in kernel_report(text, args.patterns, where):
            print(f"{name[:90]:<90} {total:>9} {lonely:>13}")
            for (fi, line), n in sorted((where or {}).get(name, {}).items()):
                path = os.path.relpath(ptx_files(text).get(fi, "?"), ccc.ROOT)
                print(f"    {path}:{line}  x{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

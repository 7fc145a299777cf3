"""Where the fused forward's warps spend their time (issue 17), from a KDA_EXT_PROFILE_SECTIONS=1 build.

The kernel's watched producer thread (CTA (0, 0), producer warpgroup 0, thread 0) and consumer
thread (consumer warpgroup 0, thread 0) add clock64() differences per section over the whole run
and print them when the CTA ends (csrc/cuda/section_clock.cuh). This script runs one fused forward
of the benchmark's inputs in a subprocess, collects those lines and prints a table: cycles per chunk
by section, the share of the warp's time, and us per chunk at the card's clock.

  KDA_EXT_PROFILE_SECTIONS=1 KDA_EXT_CUDA=1 python setup.py build_ext --inplace   (or
  scripts/dev/prebuild_for_device.sh with that variable set), then on the device:
  python scripts/dev/fused_sections.py [--shape 2x8192x32x128] [--mode kimi] [--producers 1]
  python scripts/dev/fused_sections.py --parse FILE   (a saved output, here)
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_RUN = """
import os, sys, torch
sys.path.insert(0, os.path.join({root!r}, "benchmarks"))
import kda_ext
from bench_chunk_kda import make_inputs
x, kw = make_inputs({shape!r}, {mode!r})
for n in ("cu_seqlens_cpu", "disable_recompute"):
    kw.pop(n)
args = [x[n] for n in ("q", "k", "v", "g", "beta")]
with torch.no_grad():
    kda_ext.chunk_kda(*args, A_log=x["A_log"], dt_bias=x["dt_bias"], initial_state=x["initial_state"], **kw)
torch.cuda.synchronize()
try:
    mhz = torch.cuda.clock_rate()  # the SM clock now, through NVML
except Exception:
    mhz = 0
print("clock_khz", mhz * 1000)
"""


def parse(text):
    """{role: [(section, cycles, per_chunk)]} and the clock (kHz, 0 if unknown) from the output."""
    rows, clock_khz = {}, 0
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("kda_ext sections ") and len(parts) == 6:
            rows.setdefault(parts[2], []).append((parts[3], int(parts[4]), int(parts[5])))
        elif line.startswith("clock_khz "):
            clock_khz = float(parts[1])
    return rows, clock_khz


def table(rows, clock_khz):
    out = []
    for role, sections in rows.items():
        total = sum(per for _, _, per in sections) or 1
        out.append(f"{role}: {total} cycles a chunk" + (f" = {total / clock_khz * 1e3:.2f} us at {clock_khz / 1e6:.2f} GHz"
                                                        if clock_khz else ""))
        out.append("| section | cycles / chunk | share |")
        out.append("|---|---|---|")
        out += [f"| {name} | {per} | {per / total:.0%} |" for name, _, per in sections]
        out.append("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="2x8192x32x128")
    ap.add_argument("--mode", default="kimi")
    ap.add_argument("--producers", default="1")
    ap.add_argument("--parse", default=None, help="summarise a saved output instead of running")
    a = ap.parse_args()
    if a.parse:
        with open(a.parse) as f:
            text = f.read()
    else:
        env = dict(os.environ, KDA_EXT_FUSED_FWD="on", KDA_EXT_FUSED_SEGMENTS="off",
                   KDA_EXT_FUSED_PRODUCERS=a.producers, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-c", _RUN.format(root=ROOT, shape=a.shape, mode=a.mode)],
                              capture_output=True, text=True, env=env, timeout=300)
        text = proc.stdout
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-3000:])
            sys.exit(proc.returncode)
    rows, clock_khz = parse(text)
    if not rows:
        print("no section lines: is this a KDA_EXT_PROFILE_SECTIONS=1 build (python -m kda_ext says)?")
        sys.exit(1)
    print(table(rows, clock_khz))


if __name__ == "__main__":
    main()

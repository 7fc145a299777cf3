"""Why each kda_ext kernel waits: Nsight Compute's stall counters, one line per kernel launch.

  python scripts/dev/ncu_stalls.py [--kernels REGEX] [--count N] [--out DIR] [profile_kernels args]
  python scripts/dev/ncu_stalls.py --csv FILE          (summarise a saved report instead)

Runs `ncu` on one `benchmarks/profile_kernels.py --once` step (a forward and a backward), collecting
only hardware counters: time, instructions per warp, issue activity and the average stall cycles
per issued instruction by reason. These work on the leased H100s, where ncu's PC-sampling source
view (per-line stalls) came back empty. The table in docs/perf-notes.md (session 3) is
this script's output; it is what found the serialised global loads of chunk_prepare.
"""
import argparse
import csv
import io
import os
import subprocess
import sys

STALL_PREFIX = "smsp__average_warps_issue_stalled_"
STALL_SUFFIX = "_per_issue_active.ratio"
METRICS = [
    f"regex:{STALL_PREFIX}.*{STALL_SUFFIX.replace('.', chr(92) + '.')}",
    "smsp__inst_executed.sum",
    "gpu__time_duration.sum",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread",
    "launch__grid_size",
    "launch__block_size",
]
# With --mix: executed warp instructions by pipeline and the shared/global load/store counts,
# to tell index arithmetic (alu/fma integer work), shared-memory traffic (lsu) and tensor work apart.
PIPE_PREFIX = "smsp__inst_executed_pipe_"
OP_PREFIX = "smsp__sass_inst_executed_op_"
MIX_METRICS = [
    f"regex:{PIPE_PREFIX}[a-z0-9_]+\\.sum$",
    f"regex:{OP_PREFIX}(shared|global)_(ld|st)\\.sum$",
]


def _num(text):
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return float("nan")


def _launches(csv_text):
    """{(launch id, kernel name): {metric: value}} from ncu's --csv output, or None without any."""
    lines = csv_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return None
    launches = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        key = (int(row["ID"]), row["Kernel Name"])
        launches.setdefault(key, {})[row["Metric Name"]] = _num(row["Metric Value"])
    return launches


def summarize(csv_text, top=4):
    """Lines of a markdown table from ncu's --csv output of the metrics above."""
    launches = _launches(csv_text)
    if launches is None:
        return ["no ncu metrics in this output"]
    out = ["| launch | kernel | ms | instr./warp | regs | issue active % | stall cycles / instr. | top stalls |",
           "|---|---|---|---|---|---|---|---|"]
    for (launch_id, name), m in sorted(launches.items()):
        stalls = {k[len(STALL_PREFIX):-len(STALL_SUFFIX)]: v for k, v in m.items()
                  if k.startswith(STALL_PREFIX) and k.endswith(STALL_SUFFIX)}
        warps = m.get("launch__grid_size", float("nan")) * m.get("launch__block_size", float("nan")) / 32
        ranked = sorted(stalls.items(), key=lambda kv: -kv[1])[:top]
        short = name.split("(")[0].replace("void ", "")
        out.append(
            f"| {launch_id} | {short} | {m.get('gpu__time_duration.sum', float('nan')) / 1e6:.3f} | "
            f"{m.get('smsp__inst_executed.sum', float('nan')) / warps:.0f} | "
            f"{m.get('launch__registers_per_thread', float('nan')):.0f} | "
            f"{m.get('smsp__issue_active.avg.pct_of_peak_sustained_active', float('nan')):.1f} | "
            f"{sum(stalls.values()):.1f} | " + ", ".join(f"{k} {v:.2f}" for k, v in ranked) + " |")
    return out


def summarize_mix(csv_text, top=7):
    """Lines of a markdown table: instructions per warp by pipeline, and memory instructions."""
    launches = _launches(csv_text)
    if launches is None:
        return []
    out = ["| launch | kernel | instr./warp | by pipeline (per warp) | shared ld/st, global ld/st (per warp) |",
           "|---|---|---|---|---|"]
    for (launch_id, name), m in sorted(launches.items()):
        warps = m.get("launch__grid_size", float("nan")) * m.get("launch__block_size", float("nan")) / 32
        pipes = {k[len(PIPE_PREFIX):-len(".sum")]: v / warps for k, v in m.items()
                 if k.startswith(PIPE_PREFIX) and k.endswith(".sum")}
        ops = {k[len(OP_PREFIX):-len(".sum")]: v / warps for k, v in m.items()
               if k.startswith(OP_PREFIX) and k.endswith(".sum")}
        if not pipes:
            continue
        ranked = sorted(pipes.items(), key=lambda kv: -kv[1])[:top]
        short = name.split("(")[0].replace("void ", "")
        out.append(
            f"| {launch_id} | {short} | {m.get('smsp__inst_executed.sum', float('nan')) / warps:.0f} | "
            + ", ".join(f"{k} {v:.0f}" for k, v in ranked) + " | "
            + ", ".join(f"{ops.get(k, float('nan')):.0f}" for k in ("shared_ld", "shared_st", "global_ld", "global_st"))
            + " |")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", help="summarise this saved ncu --csv output instead of profiling")
    ap.add_argument("--kernels", default="chunk_prepare|chunk_state|bwd_chunk|bwd_state|bwd_dqk")
    ap.add_argument("--count", type=int, default=8, help="kernel launches to profile")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--mix", action="store_true",
                    help="also count instructions by pipeline and shared/global loads and stores")
    a, rest = ap.parse_known_args()  # the rest goes to profile_kernels.py
    if a.csv:
        with open(a.csv) as f:
            text = f.read()
        print("\n".join(summarize(text) + [""] + summarize_mix(text)))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    prof = [sys.executable, os.path.join(root, "benchmarks", "profile_kernels.py"), "--once"] + rest
    cmd = ["ncu", "--clock-control", "none", "-k", f"regex:{a.kernels}", "--launch-count", str(a.count),
           "--metrics", ",".join(METRICS + (MIX_METRICS if a.mix else [])), "--csv"] + prof
    proc = subprocess.run(cmd, capture_output=True, text=True)
    raw = os.path.join(a.out, "ncu_stalls.csv")
    with open(raw, "w") as f:
        f.write(proc.stdout)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    print("\n".join(summarize(proc.stdout) + [""] + summarize_mix(proc.stdout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

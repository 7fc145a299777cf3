"""Where one kernel's warps stall, by source line (Nsight Compute's warp-state sampling).

  python scripts/ncu_hotspots.py KERNEL_REGEX [--out DIR] [--top 30] [profile_kernels args, e.g. --mode softplus]

Profiles the first launch of the matching kernel in one `benchmarks/profile_kernels.py --once`
run (the build carries -lineinfo), exports the source page as CSV and prints the source lines
with the most stall samples, with the share of all samples. Needs ncu on a machine whose runtime
exposes the hardware counters and PC sampling. On the device of 2026-11-27 the counters worked
(H100) but the source page came back without stall samples (H200; the H100's ncu also reported
the sampling metric missing); the script then says so.
"""
import argparse
import csv
import io
import os
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--top", type=int, default=30)
    a, rest = ap.parse_known_args()  # the rest goes to profile_kernels.py
    tag = "".join(ch if ch.isalnum() else "_" for ch in a.kernel)[:40]
    rep = os.path.join(a.out, f"hot_{tag}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prof = [sys.executable, os.path.join(root, "benchmarks", "profile_kernels.py"), "--once"]
    prof += [x for x in rest if x != "--"]
    subprocess.run(["ncu", "--clock-control", "none", "-k", f"regex:{a.kernel}", "--launch-count", "1",
                    "--section", "SourceCounters", "--section", "WarpStateStats", "--import-source", "yes",
                    "-f", "-o", rep] + prof, check=True, stdout=subprocess.DEVNULL)
    text = subprocess.run(["ncu", "-i", rep + ".ncu-rep", "--page", "source", "--csv", "--print-source", "cuda"],
                          check=True, capture_output=True, text=True).stdout
    with open(rep + "_source.csv", "w") as f:
        f.write(text)
    rows = list(csv.reader(io.StringIO(text)))
    head_i = next(i for i, r in enumerate(rows) if any("Source" == c or "Source" in c for c in r))
    head = rows[head_i]
    col = next((i for i, c in enumerate(head) if "Warp Stall Sampling (All" in c), None)
    src = next(i for i, c in enumerate(head) if c.strip() == "Source" or c.startswith("Source"))
    line_col = next((i for i, c in enumerate(head) if c.strip() in ("#", "Line", "# Line")), 0)
    if col is None:
        # Seen on the H200 device of 2026-11-27: the source page carried no metric columns (PC
        # sampling unavailable), so there is nothing to rank.
        print(f"{a.kernel}: no per-line stall samples in this report (columns: {head}); "
              f"PC sampling is unavailable here, see {rep}_source.csv")
        return
    body = [r for r in rows[head_i + 1:] if len(r) > col]

    def num(x):
        try:
            return float(x.replace(",", ""))
        except ValueError:
            return 0.0

    total = sum(num(r[col]) for r in body) or 1.0
    print(f"{a.kernel}: {int(total)} stall samples; top lines")
    for r in sorted(body, key=lambda r: -num(r[col]))[: a.top]:
        print(f"{100 * num(r[col]) / total:5.1f}%  L{r[line_col]:>5}  {r[src].strip()[:110]}")


if __name__ == "__main__":
    main()

"""kda_ext: per-kernel CUDA time of one chunk_kda forward+backward (torch.profiler), for perf notes.

  python benchmarks/profile_kernels.py [--shape 2x8192x32x128] [--mode kimi|softplus]
Prints the kernels sorted by total CUDA time, with calls and the share of the step.
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_chunk_kda as bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="2x8192x32x128")
    ap.add_argument("--mode", default="kimi")
    args = ap.parse_args()
    fn = bench.get_impl("ours")
    x, kw = bench.make_inputs(args.shape, args.mode)
    for n in bench.DIFF:
        x[n].requires_grad_(True)

    def step():
        o, ht = bench.run(fn, x, kw)
        (o.float().sum() + ht.sum()).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()} {args.shape} {args.mode}: one forward+backward")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70))


if __name__ == "__main__":
    main()

"""kda_ext CPU backend timing: forward and forward+backward of chunk_kda on the CPU.

Usage: python benchmarks/bench_cpu.py [--B 1 --T 4096 --H 4 --D 128 --dtype float32 --reps 5]
Prints the median wall time of each over --reps runs after one warm-up, and the thread count.
"""
import argparse
import os
import statistics
import sys
import time

import torch

# Run from a checkout: the in-place build of kda_ext lives in the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kda_ext


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk-size", type=int, default=64)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    B, T, H, D = args.B, args.T, args.H, args.D
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D, dtype=dtype)
    k = torch.randn(B, T, H, D, dtype=dtype)
    v = torch.randn(B, T, H, D, dtype=dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, dtype=dtype))
    beta = torch.rand(B, T, H, dtype=dtype)
    h0 = torch.randn(B, H, D, D, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    leaves = [q, k, v, g, beta, h0]

    def call():
        return kda_ext.chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                 use_qk_l2norm_in_kernel=True, chunk_size=args.chunk_size)

    def fwd():
        with torch.no_grad():
            call()

    def fwd_bwd():
        for t in leaves:
            t.requires_grad_(True)
            t.grad = None
        o, ht = call()
        (o.sum() + ht.sum()).backward()

    def median_ms(fn):
        fn()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    t_f = median_ms(fwd)
    t_fb = median_ms(fwd_bwd)
    print(f"kda_ext CPU, {torch.get_num_threads()} threads, B={B} T={T} H={H} K=V={D} {args.dtype} "
          f"chunk={args.chunk_size}: forward {t_f:.1f} ms, forward+backward {t_fb:.1f} ms")


if __name__ == "__main__":
    main()

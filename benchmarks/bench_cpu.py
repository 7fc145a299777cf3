"""kda_ext CPU backend timing: forward and forward+backward of chunk_kda on the CPU, mild vs strong gates.

Usage: python benchmarks/bench_cpu.py [--B 1 --T 4096 --H 4 --D 128 --dtype float32 --reps 5]
                                      [--gates mild,strong]
Prints the median wall time of each over --reps runs after one warm-up, the thread count, and for
both gate kinds the strong / mild ratio.

Gate kinds (log-decays g, passed as computed gates):
  mild:   logsigmoid(randn), mean about -0.8 per step.
  strong: -5 * sigmoid(randn), the values of the lower-bound gate at lower_bound = -5 (in (-5, 0),
          mean -2.5). Within a 64-row chunk the decay factors e^{G_i - G_j} then fall below
          FLT_MIN, and computing with those denormals costs x86 cores a microcode assist per
          operation; the CPU kernels flush them to zero (csrc/cpu/parallel.h), so the two kinds
          should take about the same time (docs/perf-notes.md, "CPU backend: denormals").
The runs of the gate kinds are interleaved rep by rep, so a change of machine load hits both alike.
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

GATE_KINDS = ("mild", "strong")


def make_gate(kind, shape, dtype):
    if kind == "mild":
        return torch.nn.functional.logsigmoid(torch.randn(shape, dtype=dtype))
    if kind == "strong":
        return -5.0 * torch.sigmoid(torch.randn(shape, dtype=dtype))
    raise ValueError(f"--gates: expected a comma-separated subset of {GATE_KINDS}, got {kind!r}")


def parse_gates(text):
    kinds = [s for s in text.split(",") if s]
    for kind in kinds:
        if kind not in GATE_KINDS:
            raise SystemExit(f"--gates: expected a comma-separated subset of {GATE_KINDS}, got {kind!r}")
    return kinds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--gates", default="mild,strong", help="comma-separated subset of mild,strong")
    args = ap.parse_args()
    kinds = parse_gates(args.gates)
    dtype = getattr(torch, args.dtype)
    B, T, H, D = args.B, args.T, args.H, args.D
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D, dtype=dtype)
    k = torch.randn(B, T, H, D, dtype=dtype)
    v = torch.randn(B, T, H, D, dtype=dtype)
    beta = torch.rand(B, T, H, dtype=dtype)
    h0 = torch.randn(B, H, D, D, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    gates = {kind: make_gate(kind, (B, T, H, D), dtype) for kind in kinds}

    def call(g):
        return kda_ext.chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                 use_qk_l2norm_in_kernel=True, chunk_size=args.chunk_size)

    def fwd(g):
        with torch.no_grad():
            call(g)

    def fwd_bwd(g):
        leaves = [q, k, v, g, beta, h0]
        for t in leaves:
            t.requires_grad_(True)
            t.grad = None
        o, ht = call(g)
        (o.sum() + ht.sum()).backward()
        for t in leaves:
            t.requires_grad_(False)

    def median_ms(fn):
        """Median ms per gate kind of fn(gate), the kinds' runs interleaved."""
        times = {kind: [] for kind in kinds}
        for kind in kinds:
            fn(gates[kind])  # warm-up
        for _ in range(args.reps):
            for kind in kinds:
                t0 = time.perf_counter()
                fn(gates[kind])
                times[kind].append((time.perf_counter() - t0) * 1e3)
        return {kind: statistics.median(t) for kind, t in times.items()}

    t_f = median_ms(fwd)
    t_fb = median_ms(fwd_bwd)
    print(f"kda_ext CPU, {torch.get_num_threads()} threads, B={B} T={T} H={H} K=V={D} {args.dtype} "
          f"chunk={args.chunk_size}, median of {args.reps}:")
    for kind in kinds:
        print(f"  {kind:6s} gates: forward {t_f[kind]:.1f} ms, forward+backward {t_fb[kind]:.1f} ms")
    if len(kinds) == 2:
        print(f"  strong / mild: forward {t_f['strong'] / t_f['mild']:.2f}x, "
              f"forward+backward {t_fb['strong'] / t_fb['mild']:.2f}x")


if __name__ == "__main__":
    main()

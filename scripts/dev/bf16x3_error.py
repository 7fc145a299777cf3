"""CPU estimate of kernel C's product error: bf16x3 vs 3xTF32 vs one tf32 pass (float64 emulation).

Operands shaped like kernel C's off-diagonal products (bwd_chunk.cuh): A = 16 x kd blocks of
sAqk' / dL (kd = 16, 32, 48), B = kd x 64 reference-row operands k_j e^{G_i0 - G_j} (factors <= 1,
some tiny: decayed rows). Each MMA's products are exact (fp64 here) and the accumulator is rounded
to fp32 after every k16 step (k8 for tf32), small terms in their own accumulator added at the end,
as the kernels do. Reported: max and median over outputs of |error| / sum_k |a||b|, as powers of 2.

usage: python scripts/dev/bf16x3_error.py [--trials N] [--seed S]

Result (seed 0, 100 trials per kd), log2 of worst / median: bf16x3 -15.4 / -19.0,
3xTF32 -21.0 / -24.7, one tf32 pass -10.2 / -12.7 (about the same for kd = 16, 32, 48).
"""
import argparse
import math

import torch


def bf16(x):
    return x.to(torch.float32).to(torch.bfloat16).to(torch.float64)


def tf32(x):
    # cvt.rna.tf32.f32: round to nearest, ties away from zero, on the 13 dropped mantissa bits.
    b = x.to(torch.float32).view(torch.int32)
    b = (b + 0x1000) & ~0x1FFF
    return b.view(torch.float32).to(torch.float64)


def f32(x):
    return x.to(torch.float32).to(torch.float64)


def split(x, rnd):
    hi = rnd(x)
    lo = rnd(f32(x - hi))  # the kernels subtract in fp32
    return hi, lo


def product(a, b, mode):
    """a: [16, kd], b: [kd, 64] fp32 values (as float64). Emulated kernel result."""
    kd = a.shape[1]
    if mode == "bf16x3":
        rnd, step, three = bf16, 16, True
    elif mode == "3xtf32":
        rnd, step, three = tf32, 8, True
    else:
        rnd, step, three = tf32, 8, False
    ah, al = split(a, rnd)
    bh, bl = split(b, rnd)
    big = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    small = torch.zeros_like(big)
    for k in range(0, kd, step):
        s = slice(k, k + step)
        big = f32(big + ah[:, s] @ bh[s])
        if three:
            small = f32(small + al[:, s] @ bh[s])
            small = f32(small + ah[:, s] @ bl[s])
    return f32(big + small)


def operands(kd, gen):
    a = torch.randn(16, kd, generator=gen, dtype=torch.float64)
    # Magnitudes over several decades (gradients of decayed rows), fp32 values.
    a = a * torch.exp(torch.empty(16, kd, dtype=torch.float64).uniform_(-6, 2, generator=gen))
    k = torch.randn(kd, 64, generator=gen, dtype=torch.float64) / 8
    decay = torch.exp(-torch.empty(kd, 64, dtype=torch.float64).uniform_(0, 12, generator=gen))
    return f32(a), f32(f32(k) * decay)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    print(f"{'kd':>4} {'mode':>8} {'worst':>8} {'median':>8}   (log2 of |err| / sum|a||b|)")
    for kd in (16, 32, 48):
        errs = {m: [] for m in ("bf16x3", "3xtf32", "tf32")}
        for _ in range(args.trials):
            a, b = operands(kd, gen)
            exact = a @ b
            scale = a.abs() @ b.abs()
            for m in errs:
                errs[m].append(((product(a, b, m) - exact).abs() / scale).flatten())
        for m, e in errs.items():
            e = torch.cat(e)
            print(f"{kd:>4} {m:>8} {math.log2(e.max().item()):8.2f} "
                  f"{math.log2(e.median().item() + 1e-300):8.2f}")


if __name__ == "__main__":
    main()

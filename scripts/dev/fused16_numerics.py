"""Numerics of the fused Hopper forward's chunk-16 scheme (issue 17), emulated on the CPU.

The planned kernel (docs/perf-notes.md, "Fused forward, chunk 16") computes each 16-token chunk's
intra-chunk matrices as one diagonal block with the median-row reference of safe_gate, inverts
(I + L) by forward substitution in fp32, and runs the state update on tensor cores with the state
in fp32 and its operands rounded to 16 bits. This script applies exactly those rounding points in
plain torch (fp32 arithmetic, explicit bf16 roundings) for chunk sizes 16 and 64 (64: the
landed kernels' scheme, 16 x 16 blocks with the median row on the diagonal and the first row of the
later block off it) and prints the error ratio RMS(out - ref) / RMS(ref) against the fp64 recurrent
reference, next to the test suite's bars (o 5e-3, ht 5e-3).

  python scripts/dev/fused16_numerics.py [--T 1000] [--H 4] [--lower-bound -5] [--inverse ...]

--inverse: how (I + L)^-1 of a 16-row chunk is formed: `substitution` (fp32, the kernel's today),
or the product (I - L)(I + L^2)(I + L^4)(I + L^8) on tensor cores with fp32 accumulation and the
factors rounded to bf16 (`neumann-bf16`) or tf32 (`neumann-tf32`) before each product (L is
strictly lower triangular, so L^16 = 0 and the product is exact in exact arithmetic).
"""
import argparse

import torch

from kda_ext.reference import l2norm, naive_kda_lowerbound_gate, naive_recurrent_kda


def bf(x):
    return x.to(torch.bfloat16).to(torch.float32)


def tf32(x):
    """fp32 rounded to tf32 (10 mantissa bits, round to nearest even), as an mma's operand."""
    i = x.float().contiguous().view(torch.int32)
    lsb = (i >> 13) & 1
    return ((i + 0x0FFF + lsb) & ~0x1FFF).view(torch.float32)


def inverse_unit_lower(Lkk, how):
    """(I + L)^-1 for strictly lower triangular L [..., n, n] (fp32)."""
    n = Lkk.shape[-1]
    eye = torch.eye(n).expand_as(Lkk)
    if how == "substitution":
        return torch.linalg.solve_triangular(eye + Lkk, eye, upper=False)
    rnd = bf if how == "neumann-bf16" else tf32
    # (I + L)^-1 = sum_k (-L)^k = (I - L)(I + L^2)(I + L^4)(I + L^8) for n <= 16
    power = -Lkk
    acc = eye + power
    for _ in range(3):
        power = rnd(power) @ rnd(power)
        acc = rnd(acc) @ rnd(eye + power)
    return acc


def fused_chunked(q, k, v, graw, braw, A_log, dt_bias, lower_bound, scale, h0, BT, inverse="substitution"):
    """One sequence batch [B, T, H, *] (bf16 inputs), the in-kernel gate, l2norm and sigmoid beta."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    g = naive_kda_lowerbound_gate(graw, A_log, dt_bias, lower_bound).float()   # fp32 [B,T,H,K]
    qh = bf(l2norm(q.float())).permute(0, 2, 1, 3)                             # [B,H,T,K]
    kh = bf(l2norm(k.float())).permute(0, 2, 1, 3)
    vv = v.float().permute(0, 2, 1, 3)
    beta = torch.sigmoid(braw.float()).permute(0, 2, 1)                        # [B,H,T]
    g = g.permute(0, 2, 1, 3)
    S = h0.float().clone() if h0 is not None else q.new_zeros(B, H, K, V, dtype=torch.float32)
    o = torch.empty(B, H, T, V)
    for c0 in range(0, T, BT):
        L = min(BT, T - c0)
        sl = slice(c0, c0 + L)
        G = g[:, :, sl].cumsum(2)                                                # [B,H,L,K]
        # 16 x 16 blocks: diagonal ones around their median row, block (I, J < I) around the
        # first row of block I (every factor <= 1), as FLA's safe_gate path and the lean kernel.
        Aqk = torch.zeros(B, H, L, L)
        Lkk = torch.zeros(B, H, L, L)
        qs, ks, bs = qh[:, :, sl], kh[:, :, sl], beta[:, :, sl, None]
        for i0 in range(0, L, 16):
            ri = slice(i0, min(i0 + 16, L))
            ni = ri.stop - i0
            for j0 in range(0, i0 + 1, 16):
                rj = slice(j0, min(j0 + 16, L))
                r = i0 + min(8, ni - 1) if j0 == i0 else i0
                Gr = G[:, :, r:r + 1]
                qm = bf(qs[:, :, ri] * torch.exp(G[:, :, ri] - Gr))
                bkm = bf(bs[:, :, ri] * ks[:, :, ri] * torch.exp(G[:, :, ri] - Gr))
                km = bf(ks[:, :, rj] * torch.exp(Gr - G[:, :, rj]))
                Aqk[:, :, ri, rj] = qm @ km.transpose(-1, -2)
                Lkk[:, :, ri, rj] = bkm @ km.transpose(-1, -2)
        tri = torch.ones(L, L).tril()
        Aqk = bf(scale * Aqk * tri)
        Lkk = Lkk * tri.tril(-1)
        eye = torch.eye(L)
        Akk = bf(inverse_unit_lower(Lkk, inverse if BT == 16 else "substitution"))
        kb = bf(beta[:, :, sl, None] * kh[:, :, sl] * torch.exp(G))
        vb = bf(beta[:, :, sl, None] * vv[:, :, sl])
        w = bf(Akk @ kb)
        u = bf(Akk @ vb)
        qg = bf(qh[:, :, sl] * torch.exp(G))
        Gl = G[:, :, L - 1:L]
        kg = bf(kh[:, :, sl] * torch.exp(Gl - G))
        Sh = bf(S)
        v_new = bf(u - w @ Sh)
        o[:, :, sl] = scale * (qg @ Sh) + Aqk @ v_new
        S = torch.exp(Gl).transpose(-1, -2) * S + kg.transpose(-1, -2) @ v_new
    return o.permute(0, 2, 1, 3), S


def ratio(ref, out):
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--lower-bound", type=float, default=-5.0)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--h0-scale", type=float, default=1.0, help="h0 = randn * this (the tests: 1)")
    ap.add_argument("--key-correlation", type=float, default=0.0)
    ap.add_argument("--inverse", default="substitution", choices=["substitution", "neumann-bf16", "neumann-tf32"])
    a = ap.parse_args()
    K = V = 128
    for seed in range(a.seeds):
        torch.manual_seed(seed)
        B, T, H = a.B, a.T, a.H
        q = torch.randn(B, T, H, K).bfloat16()
        # --key-correlation c: every key leans on one shared direction (cosines ~ c^2 / (1 + c^2)),
        # which makes L's entries O(1) instead of O(1/sqrt(K)): the hard case for the inverse
        k = (torch.randn(B, T, H, K) + a.key_correlation * torch.randn(1, 1, H, K)).bfloat16()
        v = torch.randn(B, T, H, V).bfloat16()
        graw = torch.randn(B, T, H, K).bfloat16()
        braw = torch.randn(B, T, H).bfloat16()
        A_log = torch.log(torch.empty(H).uniform_(1, 16))
        dt_bias = torch.randn(H * K) * 0.5
        h0 = torch.randn(B, H, K, V) * a.h0_scale
        scale = K ** -0.5
        g = naive_kda_lowerbound_gate(graw.double(), A_log.double(), dt_bias.double(), a.lower_bound)
        ref_o, ref_s = naive_recurrent_kda(
            l2norm(q).double(), l2norm(k).double(), v.double(), g, torch.sigmoid(braw.double()), scale,
            h0.double(), True)
        for BT in (16, 64):
            o, S = fused_chunked(q, k, v, graw, braw, A_log, dt_bias, a.lower_bound, scale, h0, BT, a.inverse)
            print(f"seed {seed} T={T} lb={a.lower_bound} chunk {BT} ({a.inverse if BT == 16 else 'substitution'}): "
                  f"o {ratio(ref_o, o):.2e}  "
                  f"ht {ratio(ref_s, S):.2e}   (bars 5e-3)")


if __name__ == "__main__":
    main()

"""kda_ext: per-kernel CUDA time of one chunk_kda forward+backward, against the hardware floors.

  python benchmarks/profile_kernels.py [--shape 2x8192x32x128] [--mode kimi|softplus]
                                      [--impl ours|fla] [--what fwdbwd|fwd]

--impl fla profiles FLA's Triton chunk_kda the same way (its kernels' times and shares; the traffic
and FLOP models are kda_ext's, so those columns stay empty), to compare the two pipelines kernel
by kernel. --what fwd profiles one forward without autograd.

Measures on the spot the card's device-to-device copy bandwidth (bytes read + written) and its bf16
matmul rate, profiles one forward+backward with torch.profiler, and prints per kernel: time, share,
and, for the kda_ext kernels, the bytes they move and the matmul FLOPs they do (models below) with
the achieved bandwidth and FLOP rate against the measured ones. Then the floors of the whole
step: every input read once and every output written once at the copy bandwidth, and the
forward's matmul FLOPs at the measured rate.
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_chunk_kda as bench  # noqa: E402


def measure_copy_bandwidth():
    from triton.testing import do_bench

    src = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)  # bytes/s, read + write


def measure_matmul_rate(n=8192):
    from triton.testing import do_bench

    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: a @ b, warmup=10, rep=50, return_mode="median")
    return 2 * n**3 / (ms * 1e-3)  # FLOP/s


def traffic_model(B, T, H, D, N, BT=64, elt=2):
    """Bytes each kernel moves per call as the kernels are written now (bench inputs: bf16
    q/k/v/g/beta, fp32 state, HV = H, K = V = D; `elt` bytes per input element, fp32 workspaces),
    counting what each reads and writes from HBM, re-reads included. A kernel that re-reads a
    tensor per slice pays for it here: the model measures the design, not the floor (see
    floors()). The two forward kernels are counted as the backward's recompute calls them (h and
    v_new written); the plain forward writes neither, so for it they are an upper bound."""
    tok = B * T * H
    tk, tv, ta = tok * D * elt, tok * D * elt, tok * BT * elt
    fk, fv, fa = tok * D * 4, tok * D * 4, tok * BT * 4   # fp32 [tok, K], [tok, V], [tok, BT]
    slots = B * T // BT
    state = N * H * D * D * 4
    h_elt = slots * H * D * D * elt     # h per chunk, input dtype
    dh = slots * H * D * D * 4          # dh per chunk, fp32
    nks = -(-D // 64)                   # K slices of the per-chunk backward kernels
    nvs = -(-D // 32)                   # V slices of the state passes
    prepare = (2 * tk + tk + tok * elt + tv          # reads q, k, g, beta, v
               + 2 * ta + fk + 3 * tk + tv)          # writes Aqk, Akk, g_cum, w/qg/kg, u
    state_output = (nvs * (3 * tk + ta) + tv + state  # reads w/qg/kg and Aqk per V slice, u, h0
                    + tv + state + h_elt + tv)        # writes o, final state, h, v_new
    bwd_state = (nvs * (3 * tk + ta) + tv             # reads kg/qg/w and Aqk per V slice, do
                 + dh + fv)                           # writes dh, dv_new
    chunk_a = (h_elt + dh + nks * (tv + fv + tv + ta)  # reads h, dh; do, dv_new, v_new, Akk per K slice
               + 2 * tk + fk + tok * elt               # reads q, k, g_cum, beta
               + nks * fa + 3 * fk + nks * tok * 4)    # writes dAkk partials, dq/dk/dG, dbeta partials
    chunk_b = (nks * fa + ta + fv + 3 * tv             # reads dAkk partials, Akk, dv_new, v/do/v_new
               + tv + 2 * fa + tok * 4)                # writes dv, dAqk, dL, dbeta partial
    chunk_c = (nks * 2 * fa + 2 * tk + fk + tk          # reads dAqk, dL per K slice, q, k, g_cum, g
               + 3 * fk + 3 * fk + tk)                  # reads + writes dq/dk/dG partials, writes dg
    dqk = 2 * fk + 2 * tk + 2 * tk                      # reads dq/dk partials, q, k; writes dq, dk
    return {"chunk_prepare": prepare, "chunk_state_output": state_output,
            "bwd_state": bwd_state, "bwd_chunk_a": chunk_a, "bwd_chunk_b": chunk_b,
            "bwd_chunk_c": chunk_c, "bwd_dqk": dqk}


def flop_model(B, T, H, D, BT=64):
    """Matmul FLOPs per call of each kernel (2 per multiply-add; K = V = D), from the products
    the kernels perform; element-wise work is not counted."""
    chunks = B * T * H // BT  # (chunk, head) pairs
    K = V = D
    per = {
        "chunk_prepare": 2 * 2 * BT * BT * K + 2 * BT * BT * (K + V),           # Aqk, L; w, u
        "chunk_state_output": 3 * 2 * BT * K * V + 2 * BT * BT * V,             # w S, q S, k^T v; A v
        "bwd_state": 2 * BT * BT * V + 3 * 2 * BT * K * V,                      # A^T do; kg dS, qg^T do, w^T dv
        "bwd_chunk_a": 3 * 2 * BT * K * V + 2 * 2 * BT * BT * K,                # do S^T, v dS^T, dv S^T; Akk^T dw, dw kb^T
        "bwd_chunk_b": 3 * 2 * BT * BT * V + 2 * 2 * BT * BT * BT,              # dAkk, dAqk, Akk^T dv; the two inverse products
        "bwd_chunk_c": 4 * BT * BT * K,                                          # off-diagonal intra terms (half of 4 BT^2 K each way)
    }
    return {k: chunks * f for k, f in per.items()}


def floors(B, T, H, D, N, BT=64, elt=2):
    tok = B * T * H
    x = tok * D * elt                  # one [B, T, H, D] tensor in bf16
    state = N * H * D * D * 4
    a = tok * BT * elt
    fwd_bytes = 4 * x + tok * elt + state + (x + state + 2 * a)  # q,k,v,g,beta,h0 -> o,ht,Aqk,Akk
    bwd_bytes = (4 * x + tok * elt + state + 2 * a + x + state   # inputs, Aqk/Akk, do, dht
                 + 4 * x + tok * elt + state)                    # dq,dk,dv,dg,dbeta,dh0
    chunks = tok // BT  # (chunk, head) pairs
    K = V = D
    per_chunk = (2 * 2 * BT * BT * K       # Aqk and L
                 + 2 * BT * BT * K + 2 * BT * BT * V  # w, u
                 + 3 * 2 * BT * K * V      # v_new = w S, o's inter part, state update
                 + 2 * BT * BT * V)        # o's intra part
    return fwd_bytes, bwd_bytes, chunks * per_chunk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="2x8192x32x128")
    ap.add_argument("--mode", default="kimi")
    ap.add_argument("--once", action="store_true",
                    help="run one warm-up and one forward+backward, nothing else (for ncu)")
    ap.add_argument("--impl", default="ours", choices=("ours", "fla"))
    ap.add_argument("--what", default="fwdbwd", choices=("fwdbwd", "fwd"))
    args = ap.parse_args()
    B, T, H, D = bench.SHAPES[args.shape]
    fn = bench.get_impl(args.impl)
    x, kw = bench.make_inputs(args.shape, args.mode)
    N = x["initial_state"].shape[0]
    backward = args.what == "fwdbwd"
    for n in bench.DIFF:
        x[n].requires_grad_(backward)

    do = torch.randn(x["v"].shape, device="cuda", dtype=x["v"].dtype)
    dht = torch.randn_like(x["initial_state"])

    def step():
        # Gradients are dropped first and the loss gradients made up front, so that the profile
        # holds the forward and backward only (no .grad accumulation, no loss reduction).
        if not backward:
            with torch.no_grad():
                bench.run(fn, x, kw)
            return
        for n in bench.DIFF:
            x[n].grad = None
        o, ht = bench.run(fn, x, kw)
        torch.autograd.backward((o, ht), (do, dht.reshape(ht.shape)))

    if args.once:
        step()
        step()
        torch.cuda.synchronize()
        return
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    copy_bw, mm_rate = measure_copy_bandwidth(), measure_matmul_rate()
    model = traffic_model(B, T, H, D, N)
    flops = flop_model(B, T, H, D)

    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total_us = sum(e.device_time_total for e in events)
    what = "forward+backward" if backward else "forward"
    print(f"{torch.cuda.get_device_name()}, {args.impl}, {args.shape} {args.mode}: one {what}, "
          f"{total_us / 1e3:.2f} ms of kernel time")
    if args.impl == "ours":
        # Which build ran: bench_chunk_kda puts this checkout first on sys.path, whatever
        # PYTHONPATH says (session 13 timed one build twice that way).
        import kda_ext
        print(f"kda_ext from {os.path.dirname(kda_ext.__file__)}")
    print(f"measured: copy {copy_bw / 1e12:.2f} TB/s (read + write), bf16 matmul "
          f"{mm_rate / 1e12:.0f} TFLOP/s\n")
    print("| kernel | calls | ms | share | modelled MB / call | GB/s | of copy bw | GFLOP / call | TFLOP/s | of bf16 matmul |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:20]:
        name = e.key.split("(")[0].replace("void ", "").strip()[:60]
        ms = e.device_time_total / 1e3
        cells = [name, str(e.count), f"{ms:.3f}", f"{100 * e.device_time_total / total_us:.1f}%"]
        key = next((k for k in model if k in e.key), None)
        if key is not None and e.count:
            per_call_s = ms * 1e-3 / e.count
            bw = model[key] / per_call_s
            cells += [f"{model[key] / 1e6:.0f}", f"{bw / 1e9:.0f}", f"{100 * bw / copy_bw:.0f}%"]
            if key in flops:
                rate = flops[key] / per_call_s
                cells += [f"{flops[key] / 1e9:.1f}", f"{rate / 1e12:.1f}", f"{100 * rate / mm_rate:.1f}%"]
            else:
                cells += ["-", "-", "-"]
        else:
            cells += ["-"] * 6
        print("| " + " | ".join(cells) + " |")
    fwd_b, bwd_b, fwd_flops = floors(B, T, H, D, N)
    print(f"\nfloors: forward {fwd_b / copy_bw * 1e3:.3f} ms of memory traffic ({fwd_b / 1e6:.0f} MB), "
          f"{fwd_flops / mm_rate * 1e3:.3f} ms of matmul ({fwd_flops / 1e9:.0f} GFLOP); backward "
          f"{bwd_b / copy_bw * 1e3:.3f} ms of memory traffic ({bwd_b / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()

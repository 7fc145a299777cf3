"""One decode step (T = 1) of kda_ext.fused_recurrent_kda beside FLA's, against the HBM floor.

At T = 1 the recurrence only moves states: each (sequence, value head) reads its K x V fp32 state
once and writes it once, next to a few hundred bytes of q/k/v/g/beta/o. The floor is those bytes
over the card's peak HBM rate (--hbm-gbps, default 3350 GB/s: H100 SXM); the measured
device-to-device copy rate (--copy-rate) is printed beside it as the practical ceiling.

  python benchmarks/bench_decode.py                                  # 256 x 32 x 128x128, bf16
  python benchmarks/bench_decode.py --batch 64 --heads 16 --K 128 --V 128 --layouts vk
  python benchmarks/bench_decode.py --paths inplace --copy-rate

Rows: paths x layouts. "functional": initial_state [N, HV, ...] in, a new final state out (FLA's
public fused_recurrent_kda, output_final_state=True); "inplace": a state pool of 2N slots updated in
place at N shuffled slots through ssm_state_indices (FLA's fused_recurrent_kda_fwd with
inplace_final_state=True, what vLLM calls). Layouts: kv = [K, V] states, vk = [V, K]
(state_v_first, the Kimi layer's). Gate mode "kimi" = the Kimi layer's decode call (in-kernel
lower-bound gate, q/k l2norm, beta sigmoid); "plain" = pre-gated g and beta. Times: median of
triton.testing.do_bench_cudagraph (the step replayed from a CUDA graph, as serving engines run
decoding: the kernels' device time, which the floor is about) and, as "eager ms", of do_bench on
the Python call (host validation and launch included: ~30 us more on the leased H100s). FLA is optional: without it one line says it is skipped. Each row also
prints the relative RMS of FLA's o and final state against ours on the same inputs.
"""
import argparse
import os
import sys

import torch

# Run from a checkout: the in-place build of kda_ext lives in the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PATHS = ("functional", "inplace")
LAYOUTS = ("vk", "kv")
MODES = ("kimi", "plain")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _csv(allowed, name):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{name} must be a comma list of {', '.join(allowed)}, got {text!r}")
        return items
    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256, help="sequences N (one token each)")
    ap.add_argument("--heads", type=int, default=32, help="value heads HV")
    ap.add_argument("--qk-heads", type=int, default=None, help="q/k heads H (default: HV; GVA if fewer)")
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--T", type=int, default=1, help="tokens per sequence (decode: 1)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="q/k/v dtype (states are fp32)")
    ap.add_argument("--mode", choices=MODES, default="kimi")
    ap.add_argument("--paths", type=_csv(PATHS, "--paths"), default=list(PATHS))
    ap.add_argument("--layouts", type=_csv(LAYOUTS, "--layouts"), default=list(LAYOUTS))
    ap.add_argument("--hbm-gbps", type=float, default=3350.0, help="peak HBM rate of the floor (GB/s)")
    ap.add_argument("--copy-rate", action="store_true", help="also time a device copy of the states")
    ap.add_argument("--no-fla", action="store_true", help="time kda_ext only")
    args = ap.parse_args(argv)
    if args.qk_heads is None:
        args.qk_heads = args.heads
    if args.heads % args.qk_heads:
        ap.error(f"--heads {args.heads} must be a multiple of --qk-heads {args.qk_heads}")
    return args


def traffic_bytes(N, T, H, HV, K, V, qkv_bytes, g_bytes):
    """Bytes one call must move: the fp32 states read and written once, plus q/k (H heads), v, o
    and beta in the q/k/v dtype and g in its own (the q dtype for kimi's raw logits, fp32 when
    pre-gated)."""
    state = N * HV * K * V * 4 * 2
    tokens = N * T * (((2 * H * K) + (2 * HV * V) + HV) * qkv_bytes + HV * K * g_bytes)
    return state + tokens


def make_inputs(args, layout, path, device="cuda", seed=0):
    """Inputs and keyword arguments of one call in our (FLA's) signature."""
    torch.manual_seed(seed)
    N, T, H, HV, K, V = args.batch, args.T, args.qk_heads, args.heads, args.K, args.V
    dt = DTYPES[args.dtype]
    x = dict(
        q=torch.randn(N, T, H, K, device=device, dtype=dt),
        k=torch.randn(N, T, H, K, device=device, dtype=dt),
        v=torch.randn(N, T, HV, V, device=device, dtype=dt),
    )
    kw = dict(state_v_first=layout == "vk")
    if args.mode == "kimi":
        x["g"] = torch.randn(N, T, HV, K, device=device, dtype=dt)
        x["beta"] = torch.randn(N, T, HV, device=device, dtype=dt)
        kw.update(A_log=torch.log(torch.empty(HV, device=device).uniform_(1, 16)),
                  dt_bias=0.1 * torch.randn(HV * K, device=device),
                  use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                  use_beta_sigmoid_in_kernel=True, lower_bound=-5.0)
    else:
        x["q"] = torch.nn.functional.normalize(x["q"].float(), dim=-1).to(dt)
        x["k"] = torch.nn.functional.normalize(x["k"].float(), dim=-1).to(dt)
        x["g"] = torch.nn.functional.logsigmoid(torch.randn(N, T, HV, K, device=device))
        x["beta"] = torch.rand(N, T, HV, device=device, dtype=dt)
    shape = (V, K) if layout == "vk" else (K, V)
    if path == "functional":
        kw.update(initial_state=torch.randn(N, HV, *shape, device=device), output_final_state=True)
    else:
        # A pool twice the batch, the batch's slots shuffled: reads and writes without gathers.
        kw.update(initial_state=torch.randn(2 * N, HV, *shape, device=device),
                  ssm_state_indices=torch.randperm(2 * N, device=device)[:N],
                  inplace_final_state=True)
    return x, kw


def run_ours(x, kw):
    import kda_ext

    return kda_ext.fused_recurrent_kda(**x, **kw)


def fla_skip_line():
    """None when FLA's fused_recurrent_kda imports, else the one line saying why it is skipped."""
    try:
        from fla.ops.kda.fused_recurrent import fused_recurrent_kda, fused_recurrent_kda_fwd  # noqa: F401
    except Exception as e:  # noqa: BLE001 (any import failure means: no FLA column)
        return f"FLA skipped: import fla.ops.kda.fused_recurrent failed ({type(e).__name__}: {e})"
    return None


def run_fla(x, kw):
    from fla.ops.kda.fused_recurrent import fused_recurrent_kda, fused_recurrent_kda_fwd

    if kw.get("inplace_final_state"):
        # The public wrapper always passes inplace_final_state=False; serving calls the fwd.
        return fused_recurrent_kda_fwd(**x, **kw)
    return fused_recurrent_kda(**x, **kw)


def rel_rms(ref, out):
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / (ref.pow(2).mean().sqrt() + 1e-12)).item()


def agreement(x, kw):
    """Relative RMS of FLA's o and final state against ours, each run on its own copy."""
    def fresh():
        return {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    ko, kf = fresh(), fresh()
    o, ht = run_ours(x, ko)
    fo, fht = run_fla(x, kf)
    if kw.get("inplace_final_state"):
        idx = kw["ssm_state_indices"]
        ht, fht = ht[idx], fht[idx]
    return rel_rms(o, fo), rel_rms(ht, fht)


def time_ms(fn):
    """Eager: each call's host work (validation, launch) sits between the timing events."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fn):
    """The step replayed from a CUDA graph, as serving engines run decoding: device time only."""
    from triton.testing import do_bench_cudagraph

    fn()  # compiled, tuned and allocated before the capture
    torch.cuda.synchronize()
    try:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    except RuntimeError as error:  # a capture failure is a finding: say it, time eagerly instead
        print(f"# CUDA graph capture failed ({type(error).__name__}: {str(error)[:120]}); "
              "the next row's ms is the eager time", flush=True)
        torch.cuda.synchronize()
        return time_ms(fn)


def copy_ms(nbytes):
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return ms


def main(argv=None):
    args = parse_args(argv)
    N, T, H, HV, K, V = args.batch, args.T, args.qk_heads, args.heads, args.K, args.V
    qkv_bytes = DTYPES[args.dtype].itemsize
    nbytes = traffic_bytes(N, T, H, HV, K, V, qkv_bytes, qkv_bytes if args.mode == "kimi" else 4)
    floor = nbytes / (args.hbm_gbps * 1e9) * 1e3
    print(f"# decode step: N={N} T={T} H={H} HV={HV} K={K} V={V} {args.dtype} mode={args.mode} "
          f"on {torch.cuda.get_device_name()}")
    print(f"# bytes per call {nbytes / 2**30:.3f} GiB; HBM floor {floor:.4f} ms at {args.hbm_gbps:.0f} GB/s")
    if args.copy_rate:
        state_bytes = N * HV * K * V * 4
        cms = copy_ms(state_bytes)
        print(f"# device copy of the states ({state_bytes / 2**20:.0f} MiB read + written): {cms:.4f} ms, "
              f"{2 * state_bytes / cms / 1e6:.0f} GB/s")
    skip = None if not args.no_fla else "FLA skipped: --no-fla"
    if skip is None:
        skip = fla_skip_line()
    if skip:
        print(skip)
    print("# ms: the step replayed from a CUDA graph (device time); eager ms: called from Python")
    print("| path | layout | impl | ms | GB/s | floor / ms | FLA/ours | eager ms | o, ht rel. RMS vs ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.paths:
        for layout in args.layouts:
            x, kw = make_inputs(args, layout, path)
            ours = graph_ms(lambda: run_ours(x, kw))
            ours_eager = time_ms(lambda: run_ours(x, kw))
            print(f"| {path} | {layout} | kda_ext | {ours:.4f} | {nbytes / ours / 1e6:.0f} | "
                  f"{floor / ours:.2f} | - | {ours_eager:.4f} | - |", flush=True)
            if skip:
                continue
            try:
                o_err, ht_err = agreement(x, kw)
                fla = graph_ms(lambda: run_fla(x, kw))
                fla_eager = time_ms(lambda: run_fla(x, kw))
            except Exception as e:  # noqa: BLE001 (report FLA's failure in its row, keep going)
                print(f"| {path} | {layout} | FLA | error: {type(e).__name__}: {e} | | | | | |")
                continue
            print(f"| {path} | {layout} | FLA | {fla:.4f} | {nbytes / fla / 1e6:.0f} | {floor / fla:.2f} | "
                  f"{fla / ours:.2f}x | {fla_eager:.4f} | {o_err:.1e}, {ht_err:.1e} |", flush=True)
            del x, kw
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

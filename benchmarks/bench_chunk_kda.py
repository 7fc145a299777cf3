"""kda_ext vs FLA's Triton chunk_kda: side by side, same inputs, same process, same card.

Times forward, backward and forward+backward (median of triton.testing.do_bench), the peak extra
memory of forward+backward, and (with --first-call) the first call's latency in a fresh process.
Prints a markdown table of ratios (FLA time / ours, so > 1 means we are faster) with absolute times
and writes it to --out (and a PNG chart with --png).

  python benchmarks/bench_chunk_kda.py                       # the default shape set, Kimi mode
  python benchmarks/bench_chunk_kda.py --shapes 2x8192x32x128 --modes kimi,softplus --what fwd
  python benchmarks/bench_chunk_kda.py --first-call          # adds fresh-process first-call times
  python benchmarks/bench_chunk_kda.py --preset targets --copy-rate --first-call-impls ours --json t.json
                                                             # what benchmarks/targets.py reads

Modes: kimi = in-kernel lower-bound gate (lower_bound=-5) with safe_gate, q/k l2norm, beta sigmoid,
state_v_first, fp32 h0 and final state; softplus = in-kernel softplus gate (unbounded), safe_gate
off, same other flags. Suffix "-dr" sets disable_recompute=True. FLA is optional: without it only
our times are printed.

FlashKDA (MoonshotAI's CUTLASS forward, `flash_kda`, built by scripts/build_flashkda.sh) is a third
implementation, forward only, where it computes the same call: the lower-bound gate (kimi modes),
bf16, K = V = 128, no GVA. Its columns (time, FlashKDA time / ours, and the relative RMS of its o and
ht against ours on the same inputs) follow FLA's; without `flash_kda` one line says it is skipped.
FLA's own dispatch to FlashKDA is switched off (FLA_FLASH_KDA=0) so that FLA's columns stay FLA's
Triton kernels.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from chart import write_chart  # benchmarks/chart.py: this script's folder is on sys.path

# FLA 0.6.0 hands chunk_kda to FlashKDA by itself whenever flash_kda is importable and autograd is
# off (fla/ops/kda/backends/flash_kda.py), which is exactly the forward timing below: FLA's columns
# would silently become FlashKDA's. FlashKDA has its own columns, so FLA's dispatch to it stays off
# (the variable is read at every call; first_call's subprocesses inherit it).
os.environ["FLA_FLASH_KDA"] = "0"

# Run from a checkout: the in-place build of kda_ext lives in the repository root, which therefore
# comes first on sys.path, before PYTHONPATH: to time another build, run that build's checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "2x8192x32x128": (2, 8192, 32, 128),
    "1x8192x96x128": (1, 8192, 96, 128),
    "8x2048x16x128": (8, 2048, 16, 128),
    "1x32768x16x128": (1, 32768, 16, 128),
    "varlen16x32768x16x128": (1, 32768, 16, 128),
    "1x1024x16x128": (1, 1024, 16, 128),
    "4x4096x32x64": (4, 4096, 32, 64),
    "2x4096x16x256": (2, 4096, 16, 256),
}

# Named configuration lists that replace the --shapes x --modes product. "targets": exactly the
# (shape, mode) pairs that issue 5's performance targets are stated at (benchmarks/targets.py).
PRESETS = {
    "targets": [
        ("2x8192x32x128", "kimi"),
        ("2x8192x32x128", "softplus"),
        ("1x1024x16x128", "kimi"),
        ("1x32768x16x128", "kimi"),
        ("varlen16x32768x16x128", "kimi"),
    ],
}


def varlen_offsets(total, n, seed=0):
    """n sequence lengths of mixed size (1 .. ~4x mean) summing to total, as cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=gen) ** 2 + 0.05
    lens = (w / w.sum() * total).floor().long().clamp(min=1)
    lens[-1] += total - lens.sum()
    return torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])


def make_inputs(shape_name, mode, device="cuda", dtype=torch.bfloat16, seed=0):
    B, T, H, D = SHAPES[shape_name]
    torch.manual_seed(seed)
    cu = varlen_offsets(T, 16).to(device) if shape_name.startswith("varlen") else None
    N = 16 if cu is not None else B
    x = dict(
        q=torch.randn(B, T, H, D, device=device, dtype=dtype),
        k=torch.randn(B, T, H, D, device=device, dtype=dtype),
        v=torch.randn(B, T, H, D, device=device, dtype=dtype),
        g=torch.randn(B, T, H, D, device=device, dtype=dtype),
        beta=torch.randn(B, T, H, device=device, dtype=dtype),
        A_log=torch.log(torch.empty(H, device=device).uniform_(1, 16)),
        dt_bias=torch.randn(H * D, device=device) * 0.1,
        initial_state=torch.randn(N, H, D, D, device=device),
    )
    kw = dict(
        output_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
        use_beta_sigmoid_in_kernel=True, state_v_first=True, cu_seqlens=cu,
        cu_seqlens_cpu=cu.cpu() if cu is not None else None,
        disable_recompute=mode.endswith("-dr"),
    )
    if mode.startswith("kimi"):
        kw.update(safe_gate=True, lower_bound=-5.0)
    elif mode.startswith("softplus"):
        kw.update(safe_gate=False, lower_bound=None)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return x, kw


IMPLS = ("ours", "fla", "flashkda")


def get_impl(name):
    """kda_ext's or FLA's chunk_kda, or the flash_kda module (its fwd has another signature:
    flashkda_args / flashkda_forward adapt the benchmark's call to it)."""
    if name == "ours":
        import kda_ext

        return kda_ext.chunk_kda
    if name == "flashkda":
        import flash_kda

        return flash_kda
    from fla.ops.kda import chunk_kda

    return chunk_kda


def run(fn, x, kw):
    return fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"],
              A_log=x["A_log"], dt_bias=x["dt_bias"], **kw)


DIFF = ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "initial_state")


def measure(impl, shape_name, mode, what):
    from triton.testing import do_bench

    fn = get_impl(impl)
    x, kw = make_inputs(shape_name, mode)
    res = {}
    if "fwd" in what:
        def fwd():
            with torch.no_grad():
                run(fn, x, kw)
        fwd()
        res["fwd"] = do_bench(fwd, warmup=25, rep=100, return_mode="median")
    if "bwd" in what or "fwdbwd" in what:
        for n in DIFF:
            x[n].requires_grad_(True)
        o, ht = run(fn, x, kw)
        do, dht = torch.randn_like(o), torch.randn_like(ht)

        def fwdbwd():
            o, ht = run(fn, x, kw)
            torch.autograd.backward((o, ht), (do, dht))
        fwdbwd()  # warm-up (and autotune for FLA)
        for n in DIFF:
            x[n].grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwdbwd()
        torch.cuda.synchronize()
        res["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        res["fwdbwd"] = do_bench(fwdbwd, warmup=25, rep=100, return_mode="median",
                                 grad_to_none=[x[n] for n in DIFF])
        o, ht = run(fn, x, kw)

        def bwd():
            torch.autograd.backward((o, ht), (do, dht), retain_graph=True)
        res["bwd"] = do_bench(bwd, warmup=25, rep=100, return_mode="median",
                              grad_to_none=[x[n] for n in DIFF])
    return res


# ---- FlashKDA: forward only, where it computes the same call as kda_ext ----------------------

# Relative RMS of FlashKDA's o (or ht) against kda_ext's on the same inputs above which the two do
# not compute the same function (a wrong argument mapping gives O(1)); bf16 rounding of two
# different chunkings stays well below it.
FLASHKDA_AGREEMENT = 1e-2


def flashkda_unsupported(x, kw):
    """Why FlashKDA's forward cannot compute kda_ext's call chunk_kda(**x, **kw) (bench.run's
    inputs), or None when it can. FlashKDA has one fixed configuration: bf16 q/k/v/g/beta, K = V =
    128, one value head per q/k head, the lower-bound gate from A_log and dt_bias, q/k l2norm and
    beta sigmoid always in kernel, an fp32 or bf16 state, varlen only with B = 1."""
    q, v, h0 = x["q"], x["v"], x.get("initial_state")
    lower_bound = kw.get("lower_bound")
    checks = [
        (all(x[n].dtype == torch.bfloat16 for n in ("q", "k", "v", "g", "beta")),
         f"needs bf16 q, k, v, g, beta (q is {q.dtype})"),
        (q.shape[-1] == 128 and v.shape[-1] == 128,
         f"needs K = V = 128 (K = {q.shape[-1]}, V = {v.shape[-1]})"),
        (v.shape[2] == q.shape[2], f"needs HV == H (H = {q.shape[2]}, HV = {v.shape[2]})"),
        (bool(kw.get("use_gate_in_kernel")) and lower_bound is not None,
         "needs the in-kernel lower-bound gate (use_gate_in_kernel with lower_bound set)"),
        (lower_bound is None or -5.0 <= lower_bound <= 0.0,
         f"needs lower_bound in [-5, 0] (got {lower_bound})"),
        (x.get("A_log") is not None and x.get("dt_bias") is not None, "needs A_log and dt_bias"),
        (bool(kw.get("use_qk_l2norm_in_kernel")), "always l2-normalises q and k in kernel"),
        (bool(kw.get("use_beta_sigmoid_in_kernel")), "always applies sigmoid to beta in kernel"),
        (not kw.get("allow_neg_eigval", False), "has no allow_neg_eigval"),
        (not kw.get("return_intermediate_states", False), "has no return_intermediate_states"),
        (h0 is None or h0.dtype in (torch.float32, torch.bfloat16),
         f"needs an fp32 or bf16 initial_state (got {None if h0 is None else h0.dtype})"),
        (kw.get("cu_seqlens") is None or q.shape[0] == 1, "needs B == 1 with cu_seqlens"),
    ]
    for ok, reason in checks:
        if not ok:
            return reason
    return None


def flashkda_args(x, kw):
    """flash_kda.fwd's arguments (but out and final_state) for kda_ext's call chunk_kda(**x, **kw).

    The mapping: q, k, v, g and beta ([B, T, H] logits; FlashKDA transposes beta itself) as they
    are; scale defaults to K ** -0.5 as in chunk_kda; A_log fp32 [H]; dt_bias fp32 [H, K] (ours
    may be [H * K]); the state in FlashKDA's [N, H, V, K] layout, which is ours with state_v_first
    and our [N, H, K, V] transposed otherwise; cu_seqlens int64."""
    reason = flashkda_unsupported(x, kw)
    if reason is not None:
        raise ValueError(f"FlashKDA cannot compute this chunk_kda call: it {reason}")
    q = x["q"]
    H, K = q.shape[2], q.shape[3]
    h0 = x.get("initial_state")
    if h0 is not None and not kw.get("state_v_first", False):
        h0 = h0.transpose(-1, -2)
    cu = kw.get("cu_seqlens")
    scale = kw.get("scale")
    return dict(
        q=q.contiguous(), k=x["k"].contiguous(), v=x["v"].contiguous(), g=x["g"].contiguous(),
        beta=x["beta"].contiguous(),
        scale=float(K ** -0.5 if scale is None else scale),
        A_log=x["A_log"].float().reshape(H).contiguous(),
        dt_bias=x["dt_bias"].float().reshape(H, K).contiguous(),
        lower_bound=float(kw["lower_bound"]),
        initial_state=None if h0 is None else h0.contiguous(),
        cu_seqlens=None if cu is None else cu.to(torch.int64).contiguous(),
    )


def flashkda_forward(fk, args, output_final_state=True):
    """One FlashKDA forward as a user makes it: fresh o (and ht) buffers, as chunk_kda allocates
    its own, and flash_kda.fwd allocating its workspace. Returns (o, ht), ht in FlashKDA's
    [N, H, V, K] layout and the initial state's dtype (fp32 without one), or None."""
    v, h0, cu = args["v"], args["initial_state"], args["cu_seqlens"]
    out = torch.empty_like(v)
    ht = None
    if output_final_state:
        N = v.shape[0] if cu is None else cu.numel() - 1
        H, V, K = v.shape[2], v.shape[3], args["q"].shape[3]
        ht = torch.empty(N, H, V, K, device=v.device,
                         dtype=torch.float32 if h0 is None else h0.dtype)
    fk.fwd(args["q"], args["k"], v, args["g"], args["beta"], args["scale"], out,
           A_log=args["A_log"], dt_bias=args["dt_bias"], lower_bound=args["lower_bound"],
           initial_state=h0, final_state=ht, cu_seqlens=cu)
    return out, ht


def relative_rms(actual, expected):
    """rms(actual - expected) / rms(expected), in fp32 (nan when either holds a nan)."""
    a, e = actual.float(), expected.float()
    return ((a - e).square().mean().sqrt() / e.square().mean().sqrt().clamp_min(1e-30)).item()


def flashkda_agreement(x, kw, fk, ours):
    """Relative RMS of FlashKDA's o and ht against kda_ext's (ours) on the same inputs x, kw."""
    with torch.no_grad():
        o_ours, ht_ours = run(ours, x, kw)
        o_fk, ht_fk = flashkda_forward(fk, flashkda_args(x, kw), ht_ours is not None)
    res = {"o_rel_rms": relative_rms(o_fk, o_ours)}
    if ht_ours is not None:
        if not kw.get("state_v_first", False):
            ht_fk = ht_fk.transpose(-1, -2)  # back to our [N, H, K, V]
        res["ht_rel_rms"] = relative_rms(ht_fk, ht_ours)
    return res


def flashkda_disagrees(res):
    """The names of the outputs (o, ht) whose relative RMS is past FLASHKDA_AGREEMENT (or nan)."""
    return [n for n in ("o", "ht") if f"{n}_rel_rms" in res
            and not res[f"{n}_rel_rms"] <= FLASHKDA_AGREEMENT]


def measure_flashkda(shape_name, mode):
    """FlashKDA's forward time (median of do_bench) on the benchmark's inputs, and the relative
    RMS of its o and ht against kda_ext's on those same inputs; {"not_applicable": why} where
    FlashKDA cannot compute this call."""
    from triton.testing import do_bench

    fk = get_impl("flashkda")
    x, kw = make_inputs(shape_name, mode)
    reason = flashkda_unsupported(x, kw)
    if reason is not None:
        return {"not_applicable": reason}
    args = flashkda_args(x, kw)

    def fwd():
        flashkda_forward(fk, args, kw["output_final_state"])
    fwd()
    res = {"fwd": do_bench(fwd, warmup=25, rep=100, return_mode="median")}
    res.update(flashkda_agreement(x, kw, fk, get_impl("ours")))
    return res


def flashkda_skip_line(what):
    """The one line saying why FlashKDA is left out of this run, or None when it runs."""
    if "fwd" not in what:
        return "FlashKDA skipped: it has a forward only and --what has no fwd"
    try:
        get_impl("flashkda")
    except ImportError as e:
        return (f"FlashKDA skipped: import flash_kda failed ({type(e).__name__}: {e}); "
                "scripts/build_flashkda.sh builds it")
    return None


def warn_flashkda_mismatch(shape_name, mode, res):
    """Say loudly, on stdout and stderr, that FlashKDA and kda_ext disagree on one configuration:
    then the two calls do not compute the same function and the time ratio means nothing."""
    rms = ", ".join(f"{n} rel. RMS {res[f'{n}_rel_rms']:.3e}" for n in ("o", "ht") if f"{n}_rel_rms" in res)
    bar = "!" * 100
    msg = (f"{bar}\n!!! FlashKDA and kda_ext DISAGREE at {shape_name}/{mode}: {rms} (limit "
           f"{FLASHKDA_AGREEMENT:g}).\n!!! The two calls do not compute the same function: check "
           f"flashkda_args' mapping before reading the FlashKDA/ours ratio.\n{bar}")
    print(msg, flush=True)
    print(msg, file=sys.stderr, flush=True)


def flashkda_cells(res, ours_fwd):
    """The table's FlashKDA cells for one row: its fwd time, FlashKDA time / our time (> 1: we
    are faster, as FLA/ours), and the relative RMS of its o / ht against ours."""
    if res is None:
        return ["-", "-", "-"]
    if "not_applicable" in res:
        return ["n/a", "-", "n/a: " + res["not_applicable"]]
    if "error" in res:
        return [res["error"], "-", "-"]
    rms = " / ".join(f"{res[f'{n}_rel_rms']:.1e}" for n in ("o", "ht") if f"{n}_rel_rms" in res)
    if flashkda_disagrees(res):
        rms = "**MISMATCH** " + rms
    ratio = f"{res['fwd'] / ours_fwd:.2f}x" if ours_fwd else "-"
    return [f"{res['fwd']:.3f}", ratio, rms]


def first_call(impl, shape_name, mode, timeout):
    """Seconds of the first forward+backward in a fresh process (import excluded)."""
    code = (
        "import sys, time, torch; sys.path.insert(0, %r);"
        "import bench_chunk_kda as b; fn = b.get_impl(%r); x, kw = b.make_inputs(%r, %r);"
        "[x[n].requires_grad_(True) for n in b.DIFF]; torch.cuda.synchronize(); t0 = time.perf_counter();"
        "o, ht = b.run(fn, x, kw); (o.float().sum() + ht.sum()).backward(); torch.cuda.synchronize();"
        "print('FIRST_CALL_S', time.perf_counter() - t0)"
    ) % (os.path.dirname(os.path.abspath(__file__)), impl, shape_name, mode)
    # A cold start: an empty Triton cache, so FLA pays its JIT and autotune as a new user would
    # (FLA stores autotune results in the Triton cache; a warm cache would hide that cost).
    env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="kda_bench_cold_triton_"))
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return float("inf")
    for line in out.stdout.splitlines():
        if line.startswith("FIRST_CALL_S"):
            return float(line.split()[1])
    print(out.stdout[-2000:], out.stderr[-2000:], file=sys.stderr)
    return float("nan")


COPY_BYTES = 1 << 30  # the --copy-rate tensor: 1 GiB, far larger than any card's L2


def copy_gbps(nbytes, ms):
    """Rate in GB/s (1e9 bytes/s) of a device-to-device copy of nbytes taking ms milliseconds.
    Both the read and the write count, so it compares with a kernel's bytes moved."""
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_copy_gbps(nbytes=COPY_BYTES):
    """The card's device-to-device copy rate: median of triton do_bench over dst.copy_(src)."""
    from triton.testing import do_bench

    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return copy_gbps(nbytes, ms)


def results_json(dev, rows, copy_rate=None):
    """The --json payload: device name, rows, and copy_gbps only when it was measured."""
    out = {"device": dev, "rows": rows}
    if copy_rate is not None:
        out["copy_gbps"] = copy_rate
    return out


def build_parser():
    ap = argparse.ArgumentParser()
    # --shapes and --modes default to None so that --preset can tell whether they were given.
    ap.add_argument("--shapes", default=None, help="comma list of SHAPES keys (default: all of them)")
    ap.add_argument("--modes", default=None, help="comma list of modes (default: kimi)")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS),
                    help="run this preset's (shape, mode) list instead of the --shapes x --modes "
                         "product; 'targets' = the configurations of issue 5's targets")
    ap.add_argument("--what", default="fwd,bwd,fwdbwd")
    ap.add_argument("--impls", default="ours,fla,flashkda",
                    help="comma list of ours, fla, flashkda (FlashKDA: forward only, kimi modes)")
    ap.add_argument("--first-call", action="store_true")
    ap.add_argument("--first-call-impls", default=None,
                    help="comma list of the impls whose first call is timed (default: every timed "
                         "impl but flashkda, which has no backward; 'ours' skips FLA's multi-minute "
                         "cold autotune); implies --first-call")
    ap.add_argument("--first-call-timeout", type=float, default=900.0,
                    help="seconds before a cold first call counts as 'inf' (FLA's autotune takes minutes)")
    ap.add_argument("--copy-rate", action="store_true",
                    help="also measure the card's device-to-device copy rate (1 GiB copy_, read + "
                         "write bytes) and store it as copy_gbps in the JSON")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--json", default=None, help="write raw results here")
    ap.add_argument("--png", default=None, help="write a bar chart of the FLA/ours ratios here (needs matplotlib)")
    return ap


def parse_args(argv=None):
    """Parsed arguments, with args.configs (the (shape, mode) list to run) and
    args.first_call_impls (a list; empty without --first-call) resolved."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.preset is not None and (args.shapes is not None or args.modes is not None):
        ap.error("--preset replaces --shapes and --modes: give one or the other")
    args.configs = configurations(args.preset, args.shapes, args.modes)
    impls = args.impls.split(",")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        ap.error(f"--impls {','.join(unknown)}: not one of {','.join(IMPLS)}")
    if args.first_call_impls is not None:
        chosen = args.first_call_impls.split(",")
        unknown = [i for i in chosen if i not in impls]
        if unknown:
            ap.error(f"--first-call-impls {','.join(unknown)}: not in --impls {args.impls}")
        if "flashkda" in chosen:
            ap.error("--first-call-impls flashkda: the first call times forward+backward and "
                     "FlashKDA has no backward")
        args.first_call = True
        args.first_call_impls = chosen
    else:
        args.first_call_impls = [i for i in impls if i != "flashkda"] if args.first_call else []
    return args


def configurations(preset=None, shapes=None, modes=None):
    """The (shape, mode) pairs to run: a preset's list, or the --shapes x --modes product."""
    if preset is not None:
        return list(PRESETS[preset])
    shapes = (",".join(SHAPES) if shapes is None else shapes).split(",")
    modes = ("kimi" if modes is None else modes).split(",")
    return [(shape, mode) for shape in shapes for mode in modes]


def main(argv=None):
    args = parse_args(argv)
    impls = args.impls.split(",")
    if "fla" in impls:
        try:
            get_impl("fla")
        except ImportError:
            print("flash-linear-attention not installed: timing kda_ext alone", file=sys.stderr)
            impls = [i for i in impls if i != "fla"]
    what = args.what.split(",")
    flashkda_skipped = None
    if "flashkda" in impls:
        flashkda_skipped = flashkda_skip_line(what)
        if flashkda_skipped is not None:
            print(flashkda_skipped, file=sys.stderr)
            impls = [i for i in impls if i != "flashkda"]
    copy_rate = None
    if args.copy_rate:
        copy_rate = measure_copy_gbps()
        print(json.dumps({"copy_gbps": copy_rate}), flush=True)
    dev = torch.cuda.get_device_name()
    rows = []
    for shape_name, mode in args.configs:
        r = {"shape": shape_name, "mode": mode}
        for impl in impls:
            try:
                if impl == "flashkda":
                    r[impl] = measure_flashkda(shape_name, mode)
                else:
                    r[impl] = measure(impl, shape_name, mode, what)
                    if impl in args.first_call_impls:
                        r[impl]["first_call_s"] = first_call(impl, shape_name, mode, args.first_call_timeout)
            except Exception as e:  # a failing configuration is reported, not hidden
                r[impl] = {"error": f"{type(e).__name__}: {e}"[:200]}
            torch.cuda.empty_cache()
        if flashkda_disagrees(r.get("flashkda", {})):
            warn_flashkda_mismatch(shape_name, mode, r["flashkda"])
        rows.append(r)
        print(json.dumps(r), flush=True)
        if args.json:  # after every row: a run cut short by its time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results_json(dev, rows, copy_rate), f, indent=1)
    head = (f"Card: {dev}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
            f"date {time.strftime('%Y-%m-%d')}; command: `python benchmarks/bench_chunk_kda.py "
            + " ".join(sys.argv[1:] if argv is None else argv) + "`\n\n")
    if copy_rate is not None:
        head += (f"Device copy rate: {copy_rate:.0f} GB/s (read + write bytes of a "
                 f"{COPY_BYTES / 2**30:.0f} GiB copy_, median of do_bench)\n\n")
    cols = [w for w in ("fwd", "bwd", "fwdbwd", "peak_mib", "first_call_s")
            if any(w in r.get(i, {}) for r in rows for i in impls)]
    lines = ["| shape | mode | " + " | ".join(
        f"{c} ours | {c} FLA | {c} FLA/ours" if "fla" in impls else f"{c} ours" for c in cols) + " |"]
    lines.append("|" + "---|" * (2 + len(cols) * (3 if "fla" in impls else 1)))
    for r in rows:
        cells = [r["shape"], r["mode"]]
        for c in cols:
            a = r.get("ours", {}).get(c)
            b = r.get("fla", {}).get(c) if "fla" in impls else None
            fmt = (lambda z: "-" if z is None else f"{z:.3f}")
            cells.append(fmt(a) if "ours" in r and "error" not in r["ours"] else r.get("ours", {}).get("error", "-"))
            if "fla" in impls:
                cells.append(fmt(b) if "error" not in r.get("fla", {}) else r["fla"]["error"])
                cells.append(f"{b / a:.2f}x" if a and b else "-")
        if "flashkda" in impls:
            cells += flashkda_cells(r.get("flashkda"), r.get("ours", {}).get("fwd"))
        lines.append("| " + " | ".join(cells) + " |")
    if "flashkda" in impls:  # after FLA's columns, which keep their places
        lines[0] += " fwd FlashKDA | fwd FlashKDA/ours | FlashKDA vs ours rel. RMS (o / ht) |"
        lines[1] += "---|" * 3
    if flashkda_skipped is not None:
        head += flashkda_skipped + "\n\n"
    table = head + "Times in ms (median, triton do_bench), peak extra memory of forward+backward in MiB, first call in s.\n\n" + "\n".join(lines) + "\n"
    print(table)
    failed = [f"{r['shape']}/{r['mode']}/{i}" for r in rows for i in impls if "error" in r.get(i, {})]
    if failed:
        print("benchmark configurations that failed: " + ", ".join(failed), file=sys.stderr)
    disagree = [f"{r['shape']}/{r['mode']}" for r in rows if flashkda_disagrees(r.get("flashkda", {}))]
    if disagree:
        print(f"FlashKDA DISAGREES with kda_ext (relative RMS > {FLASHKDA_AGREEMENT:g}) at: "
              + ", ".join(disagree), file=sys.stderr)
        failed += disagree
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results_json(dev, rows, copy_rate), f, indent=1)
    if args.png:
        write_chart(rows, args.png, f"chunk_kda, {dev}, {time.strftime('%Y-%m-%d')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

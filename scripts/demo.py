"""kda_ext demo: chunk_kda forward+backward on the best device present, checked and timed.

Runs the Kimi setting (in-kernel lower-bound gate with safe_gate, q/k l2norm, beta sigmoid,
state_v_first, fp32 initial state), checks output and every gradient against the naive recurrent
reference on a small problem, then times forward and forward+backward on a larger one.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

# Run from a checkout: the in-place build of kda_ext lives in the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kda_ext  # noqa: E402
from kda_ext.reference import naive_kda_lowerbound_gate, naive_recurrent_kda  # noqa: E402


def make_inputs(B, T, H, K, V, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

    return dict(
        q=rnd(B, T, H, K), k=rnd(B, T, H, K), v=rnd(B, T, H, V), g=rnd(B, T, H, K),
        beta=rnd(B, T, H), A_log=rnd(H, dt=torch.float32), dt_bias=rnd(H * K, dt=torch.float32),
        h0=rnd(B, H, V, K, dt=torch.float32),
    )


def kimi_call(x, **over):
    return kda_ext.chunk_kda(
        x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"], output_final_state=True,
        use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
        safe_gate=True, lower_bound=-5.0, state_v_first=True, A_log=x["A_log"],
        dt_bias=x["dt_bias"], **over,
    )


def reference(x):
    H, K = x["q"].shape[2], x["q"].shape[3]
    q = F.normalize(x["q"].float(), p=2, dim=-1)
    k = F.normalize(x["k"].float(), p=2, dim=-1)
    g = naive_kda_lowerbound_gate(x["g"].float(), x["A_log"], x["dt_bias"], lower_bound=-5.0)
    beta = x["beta"].float().sigmoid()
    o, ht = naive_recurrent_kda(q, k, x["v"].float(), g, beta, scale=K ** -0.5,
                                initial_state=x["h0"].transpose(-1, -2), output_final_state=True)
    return o, ht.transpose(-1, -2)


def rel_err(ref, out):
    ref, out = ref.double(), out.double()
    return ((ref - out).norm() / (ref.norm() + 1e-12)).item()


def check(device, dtype):
    x = make_inputs(1, 300, 2, 64, 64, dtype, device)
    leaves = [x[n].requires_grad_() for n in ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "h0")]
    o, ht = kimi_call(x)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    grads = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), leaves)
    xr = {n: t.detach().cpu().requires_grad_() for n, t in x.items()}
    ro, rht = reference(xr)
    rleaves = [xr[n] for n in ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "h0")]
    rgrads = torch.autograd.grad((ro * do.cpu().float()).sum() + (rht * dht.cpu()).sum(), rleaves)
    names = ["o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias", "dh0"]
    errs = [rel_err(a, b.cpu()) for a, b in zip([ro, rht, *rgrads], [o, ht, *grads])]
    print("check vs naive_recurrent_kda (relative RMS error):")
    print("  " + "  ".join(f"{n}={e:.1e}" for n, e in zip(names, errs)))
    ok = all(e < 2e-2 for e in errs)
    print("  PASS" if ok else "  FAIL")
    return ok


def timeit(fn, device, iters):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"kda_ext demo on {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "") + f", {dtype}")
    ok = check(device, dtype)
    shape = (2, 8192, 32, 128) if device == "cuda" else (1, 4096, 4, 128)
    B, T, H, D = shape
    x = make_inputs(B, T, H, D, D, dtype, device, seed=1)
    for n in ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "h0"):
        x[n].requires_grad_()
    iters = 20 if device == "cuda" else 3

    def fwd():
        with torch.no_grad():
            kimi_call(x)

    def fwd_bwd():
        o, ht = kimi_call(x)
        (o.float().sum() + ht.sum()).backward()

    t_f, t_fb = timeit(fwd, device, iters), timeit(fwd_bwd, device, iters)
    print(f"timing B={B} T={T} H={H} K=V={D}: forward {t_f:.2f} ms, forward+backward {t_fb:.2f} ms")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""The fused forward's small calls for compute-sanitizer (issue 17): a varlen batch with length-1
and chunk-straddling sequences, GVA, h0 and the final state, the bounded gate (one-CTA and 2-CTA
cluster variants, by KDA_EXT_FUSED_CLUSTER) and the range-checked one with -1000 gate entries.
Exits non-zero if a result is not finite.

  KDA_EXT_FUSED_FWD=on KDA_EXT_FUSED_CLUSTER=on compute-sanitizer --tool racecheck python scripts/dev/fused_sanitize.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import kda_ext  # noqa: E402


def run(cu, H, HV, bounded, mask):
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    T, K = cu[-1], 128
    q, k = (torch.randn(1, T, H, K, device=dev, dtype=bf) for _ in range(2))
    v = torch.randn(1, T, HV, K, device=dev, dtype=bf)
    g = torch.randn(1, T, HV, K, device=dev, dtype=bf)
    if mask:
        g = torch.where(torch.rand_like(g, dtype=torch.float32) < 0.1, torch.full_like(g, -1000.0), g)
    beta = torch.randn(1, T, HV, device=dev, dtype=bf)
    h0 = torch.randn(len(cu) - 1, HV, K, K, device=dev)
    with torch.no_grad():
        o, ht = kda_ext.chunk_kda(
            q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
            use_gate_in_kernel=not mask, use_beta_sigmoid_in_kernel=True, safe_gate=bounded,
            lower_bound=-5.0 if bounded else None, A_log=torch.randn(HV, device=dev),
            dt_bias=torch.randn(HV * K, device=dev), cu_seqlens=torch.tensor(cu, device=dev, dtype=torch.int32))
    torch.cuda.synchronize()
    return bool(torch.isfinite(o).all() and torch.isfinite(ht).all())


ok = run([0, 1, 17, 18, 70, 200], 1, 2, bounded=True, mask=False)
ok &= run([0, 1, 17, 18, 70, 200], 1, 2, bounded=False, mask=True)
print("fused_sanitize:", "finite" if ok else "NOT FINITE")
sys.exit(0 if ok else 1)

"""Save (or compare) chunk_kda outputs and gradients for a few fixed-seed cases.
usage: python scripts/dev/bitwise_compare.py save FILE  (from the checkout whose build to use)
       python scripts/dev/bitwise_compare.py cmp FILE_A FILE_B
Why: a change meant to keep every bit (load order, instruction cuts) is checked across two builds
on the same fixed-seed inputs: four bf16 K = V = 128 cases (Kimi with GVA, varlen with a
length-1 sequence, softplus gate with the [V, K] state, saved intermediates)."""
import os, sys
import torch
sys.path.insert(0, os.getcwd())


def cases():
    import kda_ext
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    specs = [  # (B, T, H, HV, cu, kimi, l2norm, disable_recompute, state_v_first)
        (2, 300, 2, 4, None, True, True, False, False),
        (1, 500, 2, 2, [0, 1, 64, 65, 129, 500], True, True, False, False),
        (1, 200, 1, 2, None, False, False, False, True),
        (1, 300, 2, 2, [0, 15, 16, 300], True, True, True, False),
    ]
    out = {}
    for i, (B, T, H, HV, cu, kimi, l2, dr, vf) in enumerate(specs):
        torch.manual_seed(100 + i)
        K = V = 128
        sc = 1.0 if l2 else K ** -0.5  # without l2norm, keys of norm ~1 keep the delta rule stable
        q = (torch.randn(B, T, H, K, device=dev) * sc).to(torch.bfloat16).requires_grad_()
        k = (torch.randn(B, T, H, K, device=dev) * sc).to(torch.bfloat16).requires_grad_()
        v = torch.randn(B, T, HV, V, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(B, T, HV, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
        beta = torch.randn(B, T, HV, device=dev, dtype=torch.bfloat16, requires_grad=True)
        N = len(cu) - 1 if cu else B
        h0 = torch.randn(N, HV, K, V, device=dev, requires_grad=True)
        A_log = torch.randn(HV, device=dev, requires_grad=True)
        dt_bias = torch.randn(HV * K, device=dev, requires_grad=True)
        cu_t = torch.tensor(cu, device=dev, dtype=torch.int32) if cu else None
        if vf:
            h0 = torch.randn(N, HV, V, K, device=dev, requires_grad=True)
        o, ht = kda_ext.chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                  use_qk_l2norm_in_kernel=l2, use_gate_in_kernel=True,
                                  use_beta_sigmoid_in_kernel=True, safe_gate=kimi,
                                  lower_bound=-5.0 if kimi else None, A_log=A_log, dt_bias=dt_bias,
                                  cu_seqlens=cu_t, disable_recompute=dr, state_v_first=vf)
        do = torch.randn_like(o)
        dht = torch.randn_like(ht)
        leaves = [q, k, v, g, beta, h0, A_log, dt_bias]
        grads = torch.autograd.grad([o, ht], leaves, [do, dht])
        names = ["o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0", "dA_log", "ddt_bias"]
        for n, t in zip(names, [o, ht, *grads]):
            out[f"case{i}.{n}"] = t.detach().cpu()
    return out


if __name__ == "__main__":
    if sys.argv[1] == "save":
        torch.save(cases(), sys.argv[2])
    else:
        a, b = torch.load(sys.argv[2]), torch.load(sys.argv[3])
        diff = [n for n in a if not torch.equal(a[n], b[n])]
        print(f"{sys.argv[2]} vs {sys.argv[3]}: {len(a) - len(diff)} of {len(a)} tensors bitwise equal")
        for n in diff:  # how far apart: largest difference relative to the largest element
            x, y = a[n].double(), b[n].double()
            print(f"  {n}: max |diff| / max |a| = {((x - y).abs().max() / x.abs().max().clamp_min(1e-30)).item():.2e}")

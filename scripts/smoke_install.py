"""kda_ext smoke test of an installed (non-editable) kda_ext: forward+backward on CPU, checked.

Run it with the interpreter of the environment kda_ext was installed into, from outside the
checkout (.ci/run does), so `import kda_ext` finds the installed package:

    python scripts/smoke_install.py --checkout PATH_OF_THE_CHECKOUT

Fails (exit 1) when kda_ext is imported from the checkout instead of the install, when the install
wrote its build products (_C*.so, _build_config.py) into the checkout's kda_ext/, or when the
output or any gradient of chunk_kda strays from the naive recurrent reference.
"""
import argparse
import glob
import os
import sys

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkout", required=True, help="the source tree that was installed")
    args = ap.parse_args()
    checkout = os.path.realpath(args.checkout)

    import kda_ext
    from kda_ext.reference import naive_kda_gate, naive_recurrent_kda

    where = os.path.realpath(os.path.dirname(kda_ext.__file__))
    print(f"kda_ext {kda_ext.__version__} from {where}; torch {torch.__version__}")
    failures = []
    if where.startswith(checkout + os.sep):
        failures.append(f"kda_ext was imported from the checkout ({where}), not from the install")
    left = glob.glob(os.path.join(checkout, "kda_ext", "_C*.so")) + glob.glob(
        os.path.join(checkout, "kda_ext", "_build_config.py"))
    if left:
        failures.append(f"the install wrote into the checkout: {', '.join(left)}")

    torch.manual_seed(0)
    B, T, H, K, V = 2, 100, 2, 32, 32
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v, g, beta = torch.randn(B, T, H, V), torch.randn(B, T, H, K), torch.randn(B, T, H)
    A_log, dt_bias = torch.randn(H), torch.randn(H * K)
    h0 = torch.randn(B, H, K, V)
    leaves = [q, k, v, g, beta, A_log, dt_bias, h0]
    for t in leaves:
        t.requires_grad_()
    o, ht = kda_ext.chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                              use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                              use_beta_sigmoid_in_kernel=True, A_log=A_log, dt_bias=dt_bias)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    grads = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), leaves)

    ro, rht = naive_recurrent_kda(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
                                  naive_kda_gate(g, A_log, dt_bias), beta.sigmoid(), scale=K ** -0.5,
                                  initial_state=h0, output_final_state=True)
    rgrads = torch.autograd.grad((ro * do).sum() + (rht * dht).sum(), leaves)
    names = ["o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias", "dh0"]
    for name, ref, out in zip(names, [ro, rht, *rgrads], [o, ht, *grads]):
        err = ((ref - out).norm() / (ref.norm() + 1e-12)).item()
        print(f"  {name:<9} relative error {err:.1e}")
        # fp32 on both sides: only the chunked vs. recurrent summation order differs.
        if not err < 1e-4:
            failures.append(f"{name}: relative error {err:.1e} against naive_recurrent_kda (limit 1e-4)")
    for failure in failures:
        print("FAIL " + failure)
    print("smoke_install: " + ("FAIL" if failures else "PASS"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""kda_ext: how close every output and gradient sits to its tolerance, on every device present.

For FLA's chunk and varlen test matrices (the cases of tests/test_backward.py and tests/test_varlen.py)
prints the error ratio (RMS error / RMS reference, the tests' measure) of each tensor against the
naive recurrent reference, and its tolerance. A test only says pass/fail; this shows the margin.
  python scripts/dev/error_margins.py [--device cuda] [--only varlen|chunk] [-k substring]
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from conftest import FLA_TOL, FLA_VARLEN_TOL, make_inputs, run_kernel, run_reference  # noqa: E402
from test_backward import FLA_CASES  # noqa: E402
from test_varlen import FLA_VARLEN_CASES, _fla_varlen  # noqa: E402


def ratio(ref, out):
    r, o = ref.detach().double().cpu(), out.detach().double().cpu()
    return ((r - o).pow(2).mean().sqrt() / (r.pow(2).mean().sqrt() + 1e-8)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", choices=["chunk", "varlen"], default=None)
    ap.add_argument("-k", default="", help="only cases whose id contains this")
    args = ap.parse_args()
    suites = []
    if args.only in (None, "chunk"):
        suites += [(c, FLA_TOL) for c in FLA_CASES]
    if args.only in (None, "varlen"):
        suites += [(_fla_varlen(*c), FLA_VARLEN_TOL) for c in FLA_VARLEN_CASES]
    worst = 0.0
    for case, tol in suites:
        if args.k not in case.id():
            continue
        torch.manual_seed(42)
        x = make_inputs(case, args.device)
        ref, out = run_reference(case, x), run_kernel(case, x)
        cells = []
        for n in ref:
            if ref[n] is None or out.get(n) is None:
                continue
            e = ratio(ref[n], out[n])
            worst = max(worst, e / tol[n])
            cells.append(f"{n} {e:.1e}/{tol[n]:g}{' FAIL' if e >= tol[n] else ''}")
        print(f"{args.device} {case.id()}: " + ", ".join(cells), flush=True)
    print(f"worst error/tolerance: {worst:.2f}")


if __name__ == "__main__":
    main()

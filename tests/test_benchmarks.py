# tests/test_benchmarks.py: the benchmark harness's inputs and its call into kda_ext, checked on the
# CPU so that a broken benchmark is found here rather than in a GPU lease.
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_chunk_kda as bench  # noqa: E402
import profile_kernels  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_varlen_offsets_cover_the_total_with_mixed_lengths():
    cu = bench.varlen_offsets(32768, 16)
    lens = cu[1:] - cu[:-1]
    assert cu[0] == 0 and cu[-1] == 32768 and len(cu) == 17
    assert (lens >= 1).all() and lens.max() > 2 * lens.min()  # mixed, none empty


@pytest.mark.parametrize("mode", ["kimi", "softplus", "kimi-dr", "softplus-dr"])
def test_modes_set_the_documented_flags(mode):
    x, kw = bench.make_inputs("1x1024x16x128", mode, device="cpu")
    assert kw["disable_recompute"] == mode.endswith("-dr")
    assert kw["safe_gate"] == mode.startswith("kimi")
    assert kw["lower_bound"] == (-5.0 if mode.startswith("kimi") else None)
    assert kw["use_gate_in_kernel"] and kw["use_qk_l2norm_in_kernel"] and kw["state_v_first"]


def test_benchmark_call_runs_forward_and_backward_on_cpu():
    x, kw = bench.make_inputs("1x1024x16x128", "kimi", device="cpu", dtype=torch.float32)
    for n in bench.DIFF:
        x[n].requires_grad_(True)
    o, ht = bench.run(bench.get_impl("ours"), x, kw)
    (o.sum() + ht.sum()).backward()
    assert o.shape == x["v"].shape and ht.shape == x["initial_state"].shape
    assert all(x[n].grad is not None and torch.isfinite(x[n].grad).all() for n in bench.DIFF)


def test_kernel_models_name_real_kernels_and_scale_with_the_shape():
    import glob
    import re

    names = set()
    for path in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh")):
        names |= set(re.findall(r"(\w+_kernel)\s*\(", open(path).read()))
    small = profile_kernels.traffic_model(1, 1024, 4, 128, 1)
    big = profile_kernels.traffic_model(2, 2048, 4, 128, 2)
    flops = profile_kernels.flop_model(1, 1024, 4, 128)
    for key, nbytes in small.items():
        # profile_kernels matches a model key as a substring of the profiled kernel's name
        assert any(key in n for n in names), f"model key {key!r} names no kernel in csrc/cuda"
        assert nbytes > 0 and big[key] == pytest.approx(4 * nbytes, rel=0.02), key
    assert set(flops) <= set(small) and all(f > 0 for f in flops.values())
    # At the main benchmark shape the forward kernels must move at least the forward's floor.
    fwd_floor, _, _ = profile_kernels.floors(2, 8192, 32, 128, 2)
    model = profile_kernels.traffic_model(2, 8192, 32, 128, 2)
    assert model["chunk_prepare"] + model["chunk_state_output"] >= fwd_floor * 0.9

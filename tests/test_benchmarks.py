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


def test_targets_preset_lists_exactly_the_target_configurations():
    # Issue 5's targets are stated at these (shape, mode) pairs and nowhere else.
    args = bench.parse_args(["--preset", "targets"])
    assert args.configs == [
        ("2x8192x32x128", "kimi"),
        ("2x8192x32x128", "softplus"),
        ("1x1024x16x128", "kimi"),
        ("1x32768x16x128", "kimi"),
        ("varlen16x32768x16x128", "kimi"),
    ]
    assert all(shape in bench.SHAPES for shape, _ in args.configs)
    for shape, mode in args.configs:  # every mode is one make_inputs knows
        bench.make_inputs("1x1024x16x128", mode, device="cpu")


def test_without_a_preset_the_configurations_are_the_shapes_times_modes_product():
    assert bench.parse_args([]).configs == [(s, "kimi") for s in bench.SHAPES]
    args = bench.parse_args(["--shapes", "2x8192x32x128,1x1024x16x128", "--modes", "kimi,softplus-dr"])
    assert args.configs == [("2x8192x32x128", "kimi"), ("2x8192x32x128", "softplus-dr"),
                            ("1x1024x16x128", "kimi"), ("1x1024x16x128", "softplus-dr")]


@pytest.mark.parametrize("extra", [["--shapes", "1x1024x16x128"], ["--modes", "softplus"]])
def test_preset_refuses_explicit_shapes_or_modes(extra, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "targets"] + extra)
    assert "--preset replaces --shapes and --modes" in capsys.readouterr().err


def test_first_call_impls_default_to_every_timed_impl_and_can_be_narrowed():
    assert bench.parse_args([]).first_call_impls == []  # no --first-call: none
    assert bench.parse_args(["--first-call"]).first_call_impls == ["ours", "fla"]
    assert bench.parse_args(["--first-call", "--impls", "ours"]).first_call_impls == ["ours"]
    args = bench.parse_args(["--first-call-impls", "ours"])
    assert args.first_call and args.first_call_impls == ["ours"]  # implies --first-call
    with pytest.raises(SystemExit):
        bench.parse_args(["--impls", "ours", "--first-call-impls", "fla"])


def test_copy_rate_counts_read_and_write_bytes():
    # 1 GiB copied in 0.7158 ms moves 2 GiB: ~3000 GB/s (an H100's measured copy rate).
    assert bench.copy_gbps(2**30, 0.7158) == pytest.approx(3000.0, rel=1e-3)
    assert bench.copy_gbps(10**9, 1.0) == pytest.approx(2000.0)
    assert bench.results_json("card", [], None) == {"device": "card", "rows": []}
    assert bench.results_json("card", [], 2950.5) == {"device": "card", "rows": [], "copy_gbps": 2950.5}

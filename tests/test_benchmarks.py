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


# ---- benchmarks/targets.py: issue 5's targets from the benchmark's JSON ----------------------

import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402

import targets  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"


def _run_file(tmp_path, name, rows, device=H100, copy_gbps=None):
    data = {"device": device, "rows": rows}
    if copy_gbps is not None:
        data["copy_gbps"] = copy_gbps
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def _table(text):
    """{target number: [cells after the target cell]} from targets.py's markdown table."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and line[2].isdigit():
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[int(cells[0].split(".")[0])] = cells[1:]
    return rows


def _report(tmp_path, *files):
    return _table(targets.report(targets.load_runs(files)))


FULL_ROWS = [
    {"shape": "2x8192x32x128", "mode": "kimi",
     "ours": {"fwd": 2.0, "bwd": 14.0, "fwdbwd": 16.0, "peak_mib": 2000.0, "first_call_s": 0.5},
     "fla": {"fwd": 8.0, "bwd": 24.0, "fwdbwd": 32.0, "peak_mib": 4000.0}},
    {"shape": "2x8192x32x128", "mode": "softplus",
     "ours": {"error": "RuntimeError: launch failed | code 700"},
     "fla": {"fwd": 8.5, "fwdbwd": 34.0, "peak_mib": 4000.0}},
    {"shape": "1x1024x16x128", "mode": "kimi",
     "ours": {"fwd": 0.1, "fwdbwd": 0.5, "peak_mib": 50.0, "first_call_s": 0.9},
     "fla": {"fwd": 0.4, "fwdbwd": 1.5, "peak_mib": 80.0}},
    {"shape": "varlen16x32768x16x128", "mode": "kimi",
     "ours": {"fwd": 4.0, "fwdbwd": 20.0, "peak_mib": 3000.0, "first_call_s": 0.7},
     "fla": {"error": "OutOfMemoryError: CUDA out of memory"}},
]


def test_forward_floor_bytes_at_the_main_shape():
    # q, k, v, g 512 MiB + beta 1 MiB + h0 and ht 2 x 4 MiB (fp32) + o 128 MiB + Aqk, Akk 2 x 64 MiB
    nbytes = targets.forward_floor_bytes(2, 8192, 32, 128)
    assert nbytes == 814_743_552 == (512 + 1 + 8 + 128 + 128) * 2**20
    assert nbytes == profile_kernels.floors(2, 8192, 32, 128, 2)[0]  # the profiler's same model
    assert targets.floor_ms(nbytes, 3000.0) == pytest.approx(0.2716, abs=1e-4)  # perf notes: ~0.27 ms
    assert bench.SHAPES[targets.MAIN_SHAPE] == targets.MAIN_DIMS


def test_every_target_configuration_is_in_the_targets_preset():
    needed = {(t.shape, t.mode) for t in targets.TARGETS if t.shape is not None}
    assert needed == set(bench.PRESETS["targets"])
    assert [t.number for t in targets.TARGETS] == list(range(1, 10))


def test_targets_table_met_not_met_error_and_missing(tmp_path):
    table = _report(tmp_path, _run_file(tmp_path, "a.json", FULL_ROWS, copy_gbps=3000.0))
    # cells: required | kda_ext | FLA | measure | still needed | met?
    assert table[1] == [">= 3x FLA/ours", "2.000 ms", "8.000 ms", "4.00x", "met", "yes"]
    assert table[2] == [">= 2.5x FLA/ours", "16.000 ms", "32.000 ms", "2.00x", "1.25x faster", "no"]
    assert table[3] == [">= 2x FLA/ours", "error: RuntimeError: launch failed \\| code 700", "34.000 ms",
                        "-", "kda_ext errored", "error"]
    assert table[4] == [">= 5x FLA/ours", "0.100 ms", "0.400 ms", "4.00x", "1.25x faster", "no"]
    assert table[5] == [">= 2.5x FLA/ours", "-", "-", "-",
                        "not measured in these runs (no 1x32768x16x128 kimi row)", "-"]
    assert table[6] == [">= 2.5x FLA/ours", "20.000 ms", "error: OutOfMemoryError: CUDA out of memory",
                        "-", "FLA errored", "error"]
    assert table[7] == ["< 1 s", "0.90 s (1x1024x16x128/kimi)", "-", "worst of 3 rows: 0.90 s", "met", "yes"]
    assert table[8] == ["<= 0.6x FLA's", "2000 MiB", "4000 MiB", "ours/FLA = 0.50x", "met", "yes"]
    # 2.0 ms over a floor of 814,743,552 B / 3000 GB/s = 0.2716 ms: 7.36x, so 3.68x to go.
    assert table[9] == ["<= 2x floor", "2.000 ms", "-",
                        "ours/floor = 7.36x (floor 0.272 ms: 777 MiB at 3000 GB/s)", "3.68x faster", "no"]


def test_targets_memory_and_first_call_misses(tmp_path):
    rows = [dict(FULL_ROWS[0], ours=dict(FULL_ROWS[0]["ours"], peak_mib=3000.0, first_call_s=1.5)),
            dict(FULL_ROWS[2], ours=dict(FULL_ROWS[2]["ours"], first_call_s=0.2))]
    table = _report(tmp_path, _run_file(tmp_path, "a.json", rows))
    assert table[8][3:] == ["ours/FLA = 0.75x", "600 MiB less (1.25x smaller)", "no"]
    assert table[7] == ["< 1 s", "1.50 s (2x8192x32x128/kimi)", "-", "worst of 2 rows: 1.50 s",
                        "1.50x faster (0.50 s over)", "no"]
    # no copy_gbps in the run: the floor target is not measured, though our forward time is there
    assert table[9][1] == "2.000 ms"
    assert table[9][4:] == ["not measured in these runs (no copy rate: --copy-rate)", "-"]


@pytest.mark.parametrize("bad, measure, met", [(math.inf, "timed out at 2x8192x32x128/kimi", "no"),
                                               (math.nan, "failed at 2x8192x32x128/kimi", "no")])
def test_targets_first_call_timeout_or_failure_is_not_met(tmp_path, bad, measure, met):
    rows = [dict(FULL_ROWS[0], ours=dict(FULL_ROWS[0]["ours"], first_call_s=bad))]
    table = _report(tmp_path, _run_file(tmp_path, "a.json", rows))  # json writes Infinity / NaN
    assert table[7][3] == measure and table[7][5] == met


def test_targets_merge_files_of_one_device(tmp_path):
    first = _run_file(tmp_path, "a.json", FULL_ROWS[:1])
    # A later ours-only run of the same configuration (no FLA) must not displace the complete row
    # for the ratios, but its first-call time counts; the copy rate may come from any file.
    later = _run_file(tmp_path, "b.json", [
        {"shape": "2x8192x32x128", "mode": "kimi", "ours": {"fwd": 1.0, "first_call_s": 0.95}},
        {"shape": "1x32768x16x128", "mode": "kimi", "ours": {"fwdbwd": 10.0}, "fla": {"fwdbwd": 30.0}},
    ], copy_gbps=3000.0)
    table = _report(tmp_path, first, later)
    assert table[1][1:5] == ["2.000 ms", "8.000 ms", "4.00x", "met"]  # from a.json's row
    assert table[5][1:6] == ["10.000 ms", "30.000 ms", "3.00x", "met", "yes"]  # from b.json
    assert table[7][1] == "0.95 s (2x8192x32x128/kimi)"
    assert table[9][3].startswith("ours/floor = 3.68x")  # b.json's fwd 1.0 ms, its copy rate


def test_targets_refuse_files_from_different_devices(tmp_path):
    a = _run_file(tmp_path, "a.json", FULL_ROWS, device=H100)
    b = _run_file(tmp_path, "b.json", FULL_ROWS, device="NVIDIA H200")
    with pytest.raises(targets.DeviceMismatch, match="NVIDIA H100 80GB HBM3.*NVIDIA H200"):
        targets.report(targets.load_runs([a, b]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "targets.py"), a, b],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert H100 in proc.stderr and "NVIDIA H200" in proc.stderr and "a.json" in proc.stderr


def _run_targets_without_torch(*args):
    """targets.py as a script in a fresh interpreter where any `import torch` fails
    (sys.modules["torch"] = None): the script must not need it."""
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['targets.py'] + %r;"
            "runpy.run_path(%r, run_name='__main__')") % (list(args), os.path.join(ROOT, "benchmarks", "targets.py"))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_targets_script_runs_without_torch_and_writes_out(tmp_path):
    path = _run_file(tmp_path, "a.json", FULL_ROWS, copy_gbps=3000.0)
    out = tmp_path / "targets.md"
    proc = _run_targets_without_torch(path, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == proc.stdout
    assert proc.stdout.rstrip().endswith("from " + path)
    assert f"Card: {H100}; device copy rate 3000 GB/s (read + write)" in proc.stdout
    assert len(_table(proc.stdout)) == 9


def test_chart_rows_keep_the_last_row_per_configuration_in_first_seen_order(tmp_path):
    a = _run_file(tmp_path, "a.json", [{"shape": "s1", "mode": "kimi", "ours": {"fwd": 1.0}},
                                       {"shape": "s2", "mode": "kimi", "ours": {"fwd": 2.0}}])
    b = _run_file(tmp_path, "b.json", [{"shape": "s1", "mode": "kimi", "ours": {"fwd": 3.0}},
                                       {"shape": "s1", "mode": "softplus", "ours": {"fwd": 4.0}}])
    rows = targets.chart_rows(targets.load_runs([a, b]))
    assert [(r["shape"], r["mode"], r["ours"]["fwd"]) for r in rows] == [
        ("s1", "kimi", 3.0), ("s2", "kimi", 2.0), ("s1", "softplus", 4.0)]


def test_targets_png_without_torch(tmp_path):
    # --png draws the ratio chart with matplotlib only (torch blocked as above); without
    # matplotlib (the CI machine) it says so and still prints the table.
    path = _run_file(tmp_path, "a.json", FULL_ROWS, copy_gbps=3000.0)
    png = tmp_path / "t.png"
    proc = _run_targets_without_torch(path, "--png", str(png))
    assert proc.returncode == 0, proc.stderr
    assert len(_table(proc.stdout)) == 9
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "--png needs matplotlib" in proc.stderr and not png.exists()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preset_run_writes_json_that_targets_reads(tmp_path, monkeypatch):
    # bench.main end to end with the GPU parts stubbed: the preset's rows, first calls only for
    # --first-call-impls, copy_gbps at the top level, and targets.py reading the file back.
    calls = []
    monkeypatch.setattr(bench, "get_impl", lambda impl: None)
    monkeypatch.setattr(bench, "measure", lambda impl, s, m, what: {"fwd": 1.0 if impl == "ours" else 4.0,
                                                                    "fwdbwd": 5.0 if impl == "ours" else 15.0,
                                                                    "peak_mib": 100.0 if impl == "ours" else 200.0})
    monkeypatch.setattr(bench, "first_call", lambda impl, s, m, timeout: calls.append((impl, s, m)) or 0.25)
    monkeypatch.setattr(bench, "measure_copy_gbps", lambda: 3000.0)
    # FlashKDA (in the default --impls; get_impl above makes it importable): forward rows only,
    # which targets.py must read past.
    monkeypatch.setattr(bench, "measure_flashkda", lambda s, m: {"fwd": 1.5, "o_rel_rms": 1e-3})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: H100)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = tmp_path / "bench.json"
    rc = bench.main(["--preset", "targets", "--copy-rate", "--first-call-impls", "ours", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["device"] == H100 and data["copy_gbps"] == 3000.0
    assert [(r["shape"], r["mode"]) for r in data["rows"]] == bench.PRESETS["targets"]
    assert calls == [("ours", s, m) for s, m in bench.PRESETS["targets"]]
    assert all("first_call_s" not in r["fla"] for r in data["rows"])
    assert all(r["flashkda"] == {"fwd": 1.5, "o_rel_rms": 1e-3} for r in data["rows"])
    table = _table(targets.report(targets.load_runs([str(out)])))
    assert [table[n][-1] for n in range(1, 10)] == ["yes", "yes", "yes", "no", "yes", "yes", "yes", "yes", "no"]


# ---- FlashKDA beside FLA: argument mapping, agreement check, skip line, table -----------------

from kda_ext import reference as kref  # noqa: E402

# Small shapes for the CPU: (B, T, H, K = V); "varlen" names get 16 packed sequences.
TINY_SHAPES = {"tiny2x48x2x128": (2, 48, 2, 128), "varlentiny1x160x2x128": (1, 160, 2, 128),
               "tiny1x32x2x64": (1, 32, 2, 64)}


class FakeFlashKDA:
    """flash_kda as its documentation and C++ checks describe it (flash_kda/__init__.py,
    csrc/flash_kda.cpp), written from kda_ext.reference: its argument checks, and its math
    o, ht = KDA(l2norm(q), l2norm(k), v, lower_bound * sigmoid(exp(A_log) (g + dt_bias)),
    sigmoid(beta)) with the state [N, H, V, K]. state_k_first=True makes it read and write the
    state as [N, H, K, V] instead: a FlashKDA the benchmark's mapping does not match."""

    def __init__(self, state_k_first=False):
        self.state_k_first = state_k_first
        self.calls = []

    def fwd(self, q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound,
            initial_state=None, final_state=None, cu_seqlens=None):
        self.calls.append(dict(q=q, beta=beta, A_log=A_log, dt_bias=dt_bias, scale=scale,
                               lower_bound=lower_bound, initial_state=initial_state,
                               final_state=final_state, cu_seqlens=cu_seqlens))
        B, T, H, D = q.shape
        for name, t in dict(q=q, k=k, v=v, g=g, beta=beta, out=out).items():
            assert t.dtype == torch.bfloat16 and t.is_contiguous(), f"{name} must be contiguous bf16"
        assert k.shape == v.shape == g.shape == out.shape == q.shape and D == 128
        assert beta.shape == (B, T, H), f"beta must be [B, T, H], got {tuple(beta.shape)}"
        assert A_log.dtype == torch.float32 and A_log.shape == (H,), "A_log must be fp32 [H]"
        assert dt_bias.dtype == torch.float32 and dt_bias.shape == (H, D), "dt_bias must be fp32 [H, D]"
        assert isinstance(scale, float) and isinstance(lower_bound, float)
        N = B
        if cu_seqlens is not None:
            assert B == 1 and cu_seqlens.dtype == torch.int64 and cu_seqlens.dim() == 1
            N = cu_seqlens.numel() - 1
        for name, s in dict(initial_state=initial_state, final_state=final_state).items():
            if s is not None:
                assert s.dtype in (torch.float32, torch.bfloat16) and s.is_contiguous(), name
                assert s.shape == (N, H, D, D), f"{name} must be [N, H, D, D]"
        if initial_state is not None and final_state is not None:
            assert initial_state.dtype == final_state.dtype
        gate = kref.naive_kda_lowerbound_gate(g, A_log, dt_bias, lower_bound)
        h0 = None if initial_state is None else initial_state.float()
        o, ht = kref.naive_recurrent_kda(
            kref.l2norm(q.float()), kref.l2norm(k.float()), v.float(), gate,
            torch.sigmoid(beta.float()), scale, h0, output_final_state=final_state is not None,
            state_v_first=not self.state_k_first, cu_seqlens=cu_seqlens)
        out.copy_(o)
        if final_state is not None:
            final_state.copy_(ht)


@pytest.fixture
def tiny_shapes(monkeypatch):
    monkeypatch.setattr(bench, "SHAPES", dict(bench.SHAPES, **TINY_SHAPES))


def _tiny_inputs(shape, mode="kimi", dtype=torch.bfloat16):
    return bench.make_inputs(shape, mode, device="cpu", dtype=dtype)


def test_fla_dispatch_to_flashkda_is_switched_off():
    # FLA 0.6.0 would run FlashKDA inside its own chunk_kda under no_grad (the forward timing)
    # once flash_kda is importable: FLA's columns would silently be FlashKDA's.
    assert os.environ["FLA_FLASH_KDA"] == "0"
    text = open(os.path.join(ROOT, "scripts", "device_check.sh")).read()
    assert "export FLA_FLASH_KDA=0" in text


def test_flashkda_args_map_our_call(tiny_shapes):
    x, kw = _tiny_inputs("tiny2x48x2x128")
    args = bench.flashkda_args(x, kw)
    H, K = 2, 128
    assert args["beta"] is x["beta"] and args["beta"].shape == (2, 48, H)  # FlashKDA transposes beta itself
    assert args["dt_bias"].shape == (H, K) and args["dt_bias"].dtype == torch.float32
    assert torch.equal(args["dt_bias"][1], x["dt_bias"][K:])  # head 1's K biases, row-major
    assert args["A_log"].shape == (H,) and args["A_log"].dtype == torch.float32
    assert args["initial_state"] is x["initial_state"]  # state_v_first: already [N, H, V, K]
    assert args["scale"] == pytest.approx(K ** -0.5) and args["lower_bound"] == -5.0
    assert args["cu_seqlens"] is None
    # Our [N, H, K, V] state (state_v_first=False) goes over transposed.
    kw_kv = dict(kw, state_v_first=False)
    assert torch.equal(bench.flashkda_args(x, kw_kv)["initial_state"], x["initial_state"].transpose(-1, -2))
    # varlen: cu_seqlens as int64, one state per sequence
    xv, kwv = _tiny_inputs("varlentiny1x160x2x128")
    argsv = bench.flashkda_args(xv, kwv)
    assert argsv["cu_seqlens"].dtype == torch.int64 and argsv["cu_seqlens"].numel() == 17
    assert argsv["initial_state"].shape == (16, H, K, K)


@pytest.mark.parametrize("shape, mode, dtype, reason", [
    ("tiny2x48x2x128", "softplus", torch.bfloat16, "lower-bound gate"),
    ("tiny2x48x2x128", "kimi", torch.float32, "bf16"),
    ("tiny1x32x2x64", "kimi", torch.bfloat16, "K = V = 128"),
])
def test_flashkda_unsupported_calls_name_the_reason(tiny_shapes, shape, mode, dtype, reason):
    x, kw = _tiny_inputs(shape, mode, dtype)
    assert reason in bench.flashkda_unsupported(x, kw)
    with pytest.raises(ValueError, match="FlashKDA cannot compute this chunk_kda call"):
        bench.flashkda_args(x, kw)
    assert bench.flashkda_unsupported(*_tiny_inputs("tiny2x48x2x128")) is None
    assert bench.flashkda_unsupported(*_tiny_inputs("tiny2x48x2x128", "kimi-dr")) is None
    x, kw = _tiny_inputs("tiny2x48x2x128")
    assert "HV == H" in bench.flashkda_unsupported(dict(x, v=x["v"].repeat(1, 1, 2, 1)), kw)


@pytest.mark.parametrize("shape, state_v_first", [("tiny2x48x2x128", True), ("tiny2x48x2x128", False),
                                                  ("varlentiny1x160x2x128", True)])
def test_flashkda_agrees_with_ours_through_the_documented_interface(tiny_shapes, shape, state_v_first):
    x, kw = _tiny_inputs(shape)
    if not state_v_first:  # the same inputs in our other layout
        x["initial_state"] = x["initial_state"].transpose(-1, -2).contiguous()
        kw = dict(kw, state_v_first=False)
    fake = FakeFlashKDA()
    res = bench.flashkda_agreement(x, kw, fake, bench.get_impl("ours"))
    assert set(res) == {"o_rel_rms", "ht_rel_rms"}
    assert res["o_rel_rms"] < bench.FLASHKDA_AGREEMENT and res["ht_rel_rms"] < bench.FLASHKDA_AGREEMENT, res
    assert bench.flashkda_disagrees(res) == []
    assert len(fake.calls) == 1 and fake.calls[0]["final_state"].dtype == torch.float32


def test_flashkda_agreement_catches_a_mismatched_call(tiny_shapes):
    # A FlashKDA that reads the state transposed computes another function: both outputs are
    # far off (the random initial state dominates at 48 steps), and the table says MISMATCH.
    x, kw = _tiny_inputs("tiny2x48x2x128")
    res = bench.flashkda_agreement(x, kw, FakeFlashKDA(state_k_first=True), bench.get_impl("ours"))
    assert bench.flashkda_disagrees(res) == ["o", "ht"]
    assert bench.flashkda_cells(dict(res, fwd=2.0), 1.0)[2].startswith("**MISMATCH**")
    assert bench.flashkda_disagrees({"fwd": 1.0, "o_rel_rms": float("nan")}) == ["o"]


def test_flashkda_forward_allocates_outputs_in_flashkdas_layout(tiny_shapes):
    xv, kwv = _tiny_inputs("varlentiny1x160x2x128")
    fake = FakeFlashKDA()
    o, ht = bench.flashkda_forward(fake, bench.flashkda_args(xv, kwv))
    assert o.shape == xv["v"].shape and o.dtype == torch.bfloat16
    assert ht.shape == (16, 2, 128, 128) and ht.dtype == torch.float32
    o, ht = bench.flashkda_forward(fake, bench.flashkda_args(xv, kwv), output_final_state=False)
    assert ht is None and fake.calls[-1]["final_state"] is None


def test_flashkda_skip_line_when_flash_kda_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_kda", None)  # `import flash_kda` raises ImportError
    line = bench.flashkda_skip_line(["fwd"])
    assert line.startswith("FlashKDA skipped: import flash_kda failed (") and "\n" not in line
    assert "forward only" in bench.flashkda_skip_line(["bwd", "fwdbwd"])
    monkeypatch.setitem(sys.modules, "flash_kda", FakeFlashKDA())
    assert bench.flashkda_skip_line(["fwd"]) is None


def test_impls_default_and_first_call_leave_flashkda_out_of_backward():
    assert bench.parse_args([]).impls.split(",") == ["ours", "fla", "flashkda"]
    assert bench.parse_args(["--first-call"]).first_call_impls == ["ours", "fla"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--first-call-impls", "ours,flashkda"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--impls", "ours,flashkdaa"])


def _stub_gpu(monkeypatch, flashkda):
    """bench.main's GPU parts replaced: FLA available, ours 1 ms fwd, FLA 4 ms; flashkda is the
    module flash_kda imports as (None: not installed) and measure_flashkda returns its dict."""
    monkeypatch.setitem(sys.modules, "flash_kda", FakeFlashKDA() if flashkda is not None else None)
    real_get_impl = bench.get_impl
    monkeypatch.setattr(bench, "get_impl", lambda impl: real_get_impl(impl) if impl == "flashkda" else None)
    monkeypatch.setattr(bench, "measure", lambda impl, s, m, what: {"fwd": 1.0 if impl == "ours" else 4.0})
    monkeypatch.setattr(bench, "measure_flashkda", lambda s, m: dict(flashkda))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: H100)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


FLA_HEADER = "| shape | mode | fwd ours | fwd FLA | fwd FLA/ours |"


def test_main_without_flash_kda_prints_one_skip_line_and_keeps_flas_columns(monkeypatch, tmp_path, capsys):
    _stub_gpu(monkeypatch, None)
    out = tmp_path / "b.md"
    rc = bench.main(["--shapes", "2x8192x32x128", "--what", "fwd", "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert err.count("FlashKDA skipped: import flash_kda failed") == 1
    table = out.read_text()
    assert FLA_HEADER + "\n" in table and "FlashKDA/ours" not in table
    assert "| 2x8192x32x128 | kimi | 1.000 | 4.000 | 4.00x |" in table
    assert "FlashKDA skipped: import flash_kda failed" in table  # the saved table says so too


def test_main_with_flashkda_adds_its_columns_after_flas(monkeypatch, tmp_path, capsys):
    _stub_gpu(monkeypatch, {"fwd": 2.0, "o_rel_rms": 3e-3, "ht_rel_rms": 1e-3})
    out, js = tmp_path / "b.md", tmp_path / "b.json"
    rc = bench.main(["--shapes", "2x8192x32x128", "--what", "fwd", "--out", str(out), "--json", str(js)])
    assert rc == 0
    table = out.read_text()
    assert (FLA_HEADER + " fwd FlashKDA | fwd FlashKDA/ours | FlashKDA vs ours rel. RMS (o / ht) |") in table
    assert "| 2x8192x32x128 | kimi | 1.000 | 4.000 | 4.00x | 2.000 | 2.00x | 3.0e-03 / 1.0e-03 |" in table
    assert json.loads(js.read_text())["rows"][0]["flashkda"]["fwd"] == 2.0
    assert "DISAGREE" not in capsys.readouterr().out


def test_main_says_loudly_when_flashkda_disagrees(monkeypatch, tmp_path, capsys):
    _stub_gpu(monkeypatch, {"fwd": 2.0, "o_rel_rms": 0.3, "ht_rel_rms": 1e-3})
    out = tmp_path / "b.md"
    rc = bench.main(["--shapes", "2x8192x32x128", "--what", "fwd", "--out", str(out)])
    assert rc == 1
    cap = capsys.readouterr()
    assert "!!! FlashKDA and kda_ext DISAGREE at 2x8192x32x128/kimi: o rel. RMS 3.000e-01" in cap.out
    assert "FlashKDA DISAGREES with kda_ext (relative RMS > 0.01) at: 2x8192x32x128/kimi" in cap.err
    assert "| **MISMATCH** 3.0e-01 / 1.0e-03 |" in out.read_text()


def test_main_marks_flashkda_not_applicable_rows(monkeypatch, tmp_path):
    _stub_gpu(monkeypatch, {"not_applicable": "needs the in-kernel lower-bound gate"})
    out = tmp_path / "b.md"
    assert bench.main(["--shapes", "2x8192x32x128", "--modes", "softplus", "--what", "fwd",
                       "--out", str(out)]) == 0
    assert "| n/a | - | n/a: needs the in-kernel lower-bound gate |" in out.read_text()


def test_build_flashkda_script_refuses_missing_inputs(tmp_path):
    script = os.path.join(ROOT, "scripts", "build_flashkda.sh")
    env = dict(os.environ, FLASHKDA_SRC=str(tmp_path / "none"), PYTHON=sys.executable)
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "no FlashKDA source tree" in proc.stdout
    src = tmp_path / "src"
    (src / "flash_kda").mkdir(parents=True)
    (src / "setup.py").write_text("")
    (src / "flash_kda" / "__init__.py").write_text("")
    env = dict(env, FLASHKDA_SRC=str(src), CUTLASS_SOURCE=str(tmp_path / "nocutlass"))
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "no CUTLASS headers" in proc.stdout

# ---------------------------------------------------------------------------------------------
# benchmarks/bench_cpu.py: mild vs strong gates on the CPU backend
# ---------------------------------------------------------------------------------------------

import bench_cpu  # noqa: E402


def test_cpu_benchmark_strong_gates_reach_denormal_decays_and_mild_ones_do_not():
    # The comparison is only meaningful if "strong" produces within-chunk decays e^{G_i - G_j}
    # below FLT_MIN (denormals) and "mild" stays clear of them.
    log_flt_min = math.log(torch.finfo(torch.float32).tiny)
    torch.manual_seed(0)
    decay = {kind: bench_cpu.make_gate(kind, (1, 4096, 4, 128), torch.float32)
             .view(64, 64, 4, 128).sum(dim=1).min().item() for kind in bench_cpu.GATE_KINDS}
    assert decay["strong"] < log_flt_min < decay["mild"], decay
    with pytest.raises(SystemExit, match="--gates"):
        bench_cpu.parse_gates("mild,harsh")


def test_cpu_benchmark_prints_both_gate_kinds_and_their_ratio():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_cpu.py"), "--T", "128",
                           "--H", "1", "--D", "32", "--reps", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(line.strip().startswith("mild") for line in lines), proc.stdout
    assert any(line.strip().startswith("strong") for line in lines), proc.stdout
    assert any(line.strip().startswith("strong / mild: forward") for line in lines), proc.stdout

# ---------------------------------------------------------------------------------------------
# benchmarks/bench_decode.py: the decode step's inputs, floor and call, on the CPU
# ---------------------------------------------------------------------------------------------

import bench_decode  # noqa: E402


def test_decode_bench_defaults_are_the_issue_shape_and_its_floor():
    args = bench_decode.parse_args([])
    assert (args.batch, args.heads, args.qk_heads, args.K, args.V, args.T) == (256, 32, 32, 128, 128, 1)
    assert args.paths == ["functional", "inplace"] and args.layouts == ["vk", "kv"]
    # 256 x 32 states of 64 KiB, read and written: 1 GiB, plus 256 x 32 x (5 x 128 + 1) bf16 values.
    nbytes = bench_decode.traffic_bytes(256, 1, 32, 32, 128, 128, 2, 2)
    assert nbytes == 2**30 + 256 * 32 * (5 * 128 + 1) * 2
    assert nbytes / 3350e9 * 1e3 == pytest.approx(0.3237, abs=1e-3)  # perf-notes: ~0.32 ms
    assert bench_decode.parse_args(["--heads", "32", "--qk-heads", "8"]).qk_heads == 8
    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--heads", "32", "--qk-heads", "5"])
    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--paths", "inplace,gather"])


@pytest.mark.parametrize("path", bench_decode.PATHS)
@pytest.mark.parametrize("layout", bench_decode.LAYOUTS)
@pytest.mark.parametrize("mode", bench_decode.MODES)
def test_decode_bench_call_runs_on_cpu(path, layout, mode):
    args = bench_decode.parse_args(["--batch", "3", "--heads", "4", "--qk-heads", "2", "--K", "16",
                                    "--V", "8", "--mode", mode, "--dtype", "fp32"])
    x, kw = bench_decode.make_inputs(args, layout, path, device="cpu")
    pool = kw["initial_state"].clone()
    o, ht = bench_decode.run_ours(x, kw)
    assert o.shape == (3, 1, 4, 8) and torch.isfinite(o).all()
    assert ht.shape[-2:] == ((8, 16) if layout == "vk" else (16, 8))
    if path == "inplace":  # the named slots changed, the others did not
        assert ht is kw["initial_state"] and ht.shape[0] == 6
        idx = kw["ssm_state_indices"]
        rest = [s for s in range(6) if s not in idx.tolist()]
        assert not torch.equal(ht[idx], pool[idx]) and torch.equal(ht[rest], pool[rest])


def test_decode_bench_skips_fla_with_one_line(monkeypatch):
    # FLA may be installed and imported by other tests already: hide every module of it.
    for name in [m for m in sys.modules if m == "fla" or m.startswith("fla.")] + ["fla"]:
        monkeypatch.setitem(sys.modules, name, None)
    line = bench_decode.fla_skip_line()
    assert line.startswith("FLA skipped: import fla.ops.kda.fused_recurrent failed") and "\n" not in line

# tests/test_dispatch.py: the forward's kernel choice as reported (kda_ext/_dispatch.py).
"""The mirror of launch_fwd.cu's choice, on the CPU: which shapes, dtypes, flags and switches give
the lean intra-chunk kernel and the sm90 state/output kernel, and the debug log line that names
them. (On a GPU, tests/test_state_output_sm90.py checks the mirror against the kernels the
profiler sees.)"""
import logging

import pytest
import torch

import kda_ext
from kda_ext._dispatch import forward_kernels

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
KIMI = dict(device_type="cuda", dtype=BF16, K=128, V=128, chunk_size=64, safe_gate=True, with_sm90=True)


def plan(**over):
    return forward_kernels(**{**KIMI, **over})


def test_kimi_shape_takes_both_new_kernels(monkeypatch):
    monkeypatch.delenv("KDA_EXT_PREP_KERNEL", raising=False)
    monkeypatch.delenv("KDA_EXT_STATE_KERNEL", raising=False)
    assert plan() == {"intra_chunk": "chunk_prepare_lean", "state_output": "state_output_sm90 (wgmma, TMA)"}


@pytest.mark.parametrize("over, intra, state", [
    (dict(safe_gate=False), "chunk_prepare", "state_output_sm90 (wgmma, TMA)"),
    (dict(dtype=FP16), "chunk_prepare", "state_output_sm90 (wgmma, TMA)"),
    (dict(dtype=FP32), "chunk_prepare", "chunk_state_output (wmma)"),
    (dict(chunk_size=32), "chunk_prepare", "chunk_state_output (wmma)"),
    (dict(V=100), "chunk_prepare", "chunk_state_output_mma"),
    (dict(with_sm90=False), "chunk_prepare_lean", "chunk_state_output_mma"),
    (dict(device_type="cpu"), "cpu", "cpu"),
])
def test_other_configurations_fall_back(over, intra, state, monkeypatch):
    monkeypatch.delenv("KDA_EXT_PREP_KERNEL", raising=False)
    monkeypatch.delenv("KDA_EXT_STATE_KERNEL", raising=False)
    assert plan(**over) == {"intra_chunk": intra, "state_output": state}


def test_lean_switch_takes_every_gate(monkeypatch):
    monkeypatch.setenv("KDA_EXT_PREP_KERNEL", "lean")
    assert plan(safe_gate=False)["intra_chunk"] == "chunk_prepare_lean"
    assert plan(safe_gate=False, dtype=FP16)["intra_chunk"] == "chunk_prepare"


def test_switches_select_the_older_kernels(monkeypatch):
    monkeypatch.setenv("KDA_EXT_PREP_KERNEL", "classic")
    monkeypatch.setenv("KDA_EXT_STATE_KERNEL", "mma")
    assert plan() == {"intra_chunk": "chunk_prepare", "state_output": "chunk_state_output_mma"}
    monkeypatch.setenv("KDA_EXT_STATE_KERNEL", "wmma")
    assert plan()["state_output"] == "chunk_state_output (wmma)"


def test_debug_log_line_names_the_path(caplog):
    q = torch.randn(1, 8, 2, 16)
    k = torch.randn(1, 8, 2, 16)
    v = torch.randn(1, 8, 2, 16)
    g = -torch.rand(1, 8, 2, 16)
    beta = torch.rand(1, 8, 2)
    with caplog.at_level(logging.DEBUG, logger="kda_ext"):
        kda_ext.chunk_kda(q, k, v, g, beta)
    lines = [r.getMessage() for r in caplog.records if r.name == "kda_ext"]
    assert any("intra-chunk cpu, state/output cpu" in line for line in lines), lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kda_ext"):
        kda_ext.chunk_kda(q, k, v, g, beta)
    assert not [r for r in caplog.records if r.name == "kda_ext"], "logged above DEBUG"


GPU_CASES = [dict(dtype=BF16, safe_gate=True, chunk_size=64), dict(dtype=BF16, safe_gate=False, chunk_size=64),
             dict(dtype=FP16, safe_gate=True, chunk_size=64), dict(dtype=BF16, safe_gate=True, chunk_size=32)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("cfg", GPU_CASES, ids=lambda c: f"{c['dtype']}-safe{c['safe_gate']}-bt{c['chunk_size']}")
def test_cuda_mirror_matches_the_kernels_that_run(cfg, monkeypatch):
    from conftest import kernels_launched
    from kda_ext._build_info import load_build_config

    monkeypatch.delenv("KDA_EXT_PREP_KERNEL", raising=False)
    monkeypatch.delenv("KDA_EXT_STATE_KERNEL", raising=False)
    B, T, H, K = 1, 200, 2, 128
    dev = "cuda"
    q = torch.rand(B, T, H, K, device=dev, dtype=cfg["dtype"])
    k, v = torch.rand_like(q), torch.rand_like(q)
    g = (-5 * torch.rand(B, T, H, K, device=dev)).clamp(-5, 0)
    beta = torch.rand(B, T, H, device=dev, dtype=cfg["dtype"])
    kw = dict(safe_gate=cfg["safe_gate"], lower_bound=-5.0 if cfg["safe_gate"] else None,
              chunk_size=cfg["chunk_size"])
    names = " ".join(kernels_launched(lambda: kda_ext.chunk_kda(q, k, v, g, beta, **kw)))
    want = forward_kernels(device_type="cuda", dtype=cfg["dtype"], K=K, V=K, chunk_size=cfg["chunk_size"],
                           safe_gate=cfg["safe_gate"], with_sm90=bool((load_build_config() or {}).get("WITH_SM90")))
    lean_ran = "chunk_prepare_lean_kernel" in names
    assert lean_ran == (want["intra_chunk"] == "chunk_prepare_lean"), (want, names)
    assert ("state_output_sm90_kernel" in names) == want["state_output"].startswith("state_output_sm90"), (want, names)

# tests/test_segments.py: sequences cut into segments (kda_ext/segments.py).
"""The state update over a segment is affine in its entry state (S_end = A S_start + C): computing
each segment's (A, C) on its own, scanning them, and running each segment from its true entry state
must give chunk_kda's outputs, final state and gradients on the whole sequence, for every gate and
flag, on every device present. fp64 on the CPU holds it to rounding."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, assert_rel_close

from kda_ext import chunk_kda
from kda_ext import segments as seg
from kda_ext.segments import chunk_kda_segmented, scan_segment_states, segment_bounds, segment_state_maps


def test_segment_bounds_are_whole_chunks():
    assert segment_bounds(300, 3, 64) == [0, 128, 256, 300]
    assert segment_bounds(300, 1, 64) == [0, 300]
    assert segment_bounds(100, 8, 32) == [0, 32, 64, 96, 100]   # at most one segment per chunk
    assert segment_bounds(64, 2, 64) == [0, 64]
    with pytest.raises(ValueError, match="num_segments"):
        segment_bounds(64, 0)


def _inputs(B, T, H, K, dtype, device, gate_in_kernel=False):
    q = torch.randn(B, T, H, K, dtype=dtype, device=device)
    k = F.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1).to(dtype).to(device)
    v = torch.randn(B, T, H, K, dtype=dtype, device=device)
    # Mild decays (~-0.02 a step): the entry state must still matter at a segment's end, or a wrong
    # A (or a wrong scan) would pass unseen; test_state_maps_are_affine checks that it does.
    g = (torch.randn(B, T, H, K, dtype=dtype, device=device) if gate_in_kernel
         else F.logsigmoid(torch.randn(B, T, H, K, dtype=torch.float64) + 4).to(dtype).to(device))
    beta = torch.rand(B, T, H, dtype=dtype, device=device)
    return q, k, v, g, beta


CONFIGS = [
    dict(),
    dict(use_gate_in_kernel=True, safe_gate=True, lower_bound=-5.0, use_qk_l2norm_in_kernel=True,
         use_beta_sigmoid_in_kernel=True),
    dict(use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True),          # softplus gate
    dict(chunk_size=32, state_v_first=True),
]


@pytest.mark.parametrize("segments", [1, 3, 16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["pregated", "kimi", "softplus", "bt32-vfirst"])
def test_segmented_equals_whole(cfg, segments, device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    B, T, H, K = 2, 200, 2, 32
    gate = cfg.get("use_gate_in_kernel", False)
    q, k, v, g, beta = _inputs(B, T, H, K, dtype, device, gate)
    extra = {}
    if gate:
        extra["A_log"] = torch.randn(H, dtype=dtype, device=device)
        # a bias of ~-8 keeps both in-kernel gates mild (lower_bound * sigmoid(~-8), -softplus(~-8))
        extra["dt_bias"] = torch.randn(H * K, dtype=dtype, device=device) - 8
    h0 = torch.randn(B, H, K, K, dtype=dtype, device=device)
    leaves = [t.requires_grad_() for t in (q, k, v, g, beta, h0)]
    kw = dict(cfg, **extra)
    o_ref, ht_ref = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kw)
    o_seg, ht_seg = chunk_kda_segmented(q, k, v, g, beta, segments, initial_state=h0,
                                        output_final_state=True, **kw)
    ratio = 1e-10 if dtype == torch.float64 else 2e-3
    assert_rel_close("o", o_ref, o_seg, ratio)
    assert_rel_close("ht", ht_ref, ht_seg, ratio)
    do, dht = torch.randn_like(o_ref), torch.randn_like(ht_ref)
    grads_ref = torch.autograd.grad((o_ref, ht_ref), leaves, (do, dht))
    grads_seg = torch.autograd.grad((o_seg, ht_seg), leaves, (do, dht))
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), grads_ref, grads_seg):
        assert_rel_close(name, a, b, ratio if dtype == torch.float64 else 5e-3)


def test_state_maps_are_affine(device):
    # (A, C) of one segment reproduce the exit state from any entry state.
    dtype = torch.float64 if device == "cpu" else torch.float32
    # Short, with small steps: the delta rule erases the entry state along every k it sees, so over
    # a long segment A shrinks towards 0 and would be checked only loosely.
    B, T, H, K = 1, 40, 1, 16
    q, k, v, g, beta = _inputs(B, T, H, K, dtype, device)
    beta = 0.3 * beta
    A, C = segment_state_maps(q, k, v, g, beta, [0, T])
    for _ in range(2):
        h0 = torch.randn(B, H, K, K, dtype=dtype, device=device)
        _, ht = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        # the entry state's share of the exit state is not negligible (else A went unchecked)
        assert (A[:, 0] @ h0).norm() > 0.1 * C[:, 0].norm()
        assert_rel_close("exit state", ht, A[:, 0] @ h0 + C[:, 0], 1e-10 if dtype == torch.float64 else 2e-3)
    # and the scan threads entry states through segments in order
    entries, final = scan_segment_states(A.expand(B, 3, *A.shape[2:]), C.expand(B, 3, *C.shape[2:]))
    assert torch.equal(entries[:, 0], torch.zeros_like(entries[:, 0]))
    assert_rel_close("second entry", entries[:, 1], C[:, 0], 1e-12)


# ---- the device-side plan and scan (seg.forward_by_segments) ----------------------------------

def test_plan_segments_cuts_at_the_grid_and_the_sequence_starts():
    cu = torch.tensor([0, 5, 5, 12, 13])  # an empty sequence, a length-1 one
    plan = seg.plan_segments(cu, 13, 4)
    assert plan.offsets.tolist() == [0, 0, 4, 5, 5, 8, 12, 12, 13]
    # segment 0 is empty (grid point 0 on sequence 0's start); 3 is empty (sequence 1 is empty)
    assert plan.sequence.tolist() == [0, 0, 0, 2, 2, 2, 3, 3]
    assert plan.is_first.tolist() == [True, True, False, True, True, False, True, True]
    assert plan.last.tolist()[0] == 2 and plan.last.tolist()[2:] == [5, 7]
    assert plan.empty_sequence.tolist() == [False, True, False, False]
    assert plan.max_steps == 4


def test_plan_segments_clamps_grid_points_past_the_end():
    plan = seg.plan_segments(torch.tensor([0, 10]), 16, 4)  # tokens 10..15 belong to no sequence
    assert plan.offsets.tolist() == [0, 0, 4, 8, 10, 10]
    with pytest.raises(ValueError, match="seg_len"):
        seg.plan_segments(torch.tensor([0, 10]), 10, 0)


def _varlen_run(cfg):
    def run(q, k, v, g, beta, h0, cu):
        return chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu, **cfg)
    return run


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=["pregated", "kimi", "softplus"])
@pytest.mark.parametrize("layout", [
    dict(B=2, T=150, cu=None, seg_len=64),
    dict(B=1, T=300, cu=[0, 1, 2, 2, 130, 131, 300], seg_len=48),  # length 1, an empty sequence
    dict(B=1, T=200, cu=[0, 200], seg_len=16),
    dict(B=1, T=100, cu=[0, 100], seg_len=1000),  # one segment
], ids=["fixed", "varlen", "short-segments", "one-segment"])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize("state_v_first", [False, True], ids=["kv", "vk"])
def test_forward_by_segments_equals_whole(cfg, layout, with_h0, state_v_first):
    torch.manual_seed(3)
    B, T, H, K = layout["B"], layout["T"], 2, 16
    q, k, v, g, beta = _inputs(B, T, H, K, torch.float64, "cpu", cfg.get("use_gate_in_kernel", False))
    extra = {}
    if cfg.get("use_gate_in_kernel"):
        extra = dict(A_log=torch.randn(H, dtype=torch.float64), dt_bias=torch.randn(H * K, dtype=torch.float64))
    cu = None if layout["cu"] is None else torch.tensor(layout["cu"])
    N = B if cu is None else len(layout["cu"]) - 1
    h0 = torch.randn(N, H, K, K, dtype=torch.float64) if with_h0 else None
    o_ref, ht_ref = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                              state_v_first=state_v_first, **cfg, **extra)
    o, ht = seg.forward_by_segments(_varlen_run(dict(cfg, **extra)), q, k, v, g, beta, h0, cu,
                                         layout["seg_len"], state_v_first, True)
    torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ht, ht_ref, rtol=1e-9, atol=1e-9)
    o_only, none = seg.forward_by_segments(_varlen_run(dict(cfg, **extra)), q, k, v, g, beta, h0, cu,
                                                layout["seg_len"], state_v_first, False)
    assert none is None and torch.equal(o_only, o)

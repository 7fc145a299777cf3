# tests/cp_worker.py: one rank of a context-parallel test, started by tests/test_cp.py (not a test file).
"""Usage: python cp_worker.py RANK WORLD_SIZE STORE_FILE SCENARIO [gloo|nccl]

Joins a process group through a file store, runs every case of SCENARIO (see CASES) and exits 0,
or raises (exit 1, traceback on stderr). Every rank builds the same global inputs from the case's
seed, computes the single-process chunk_kda result on the whole stream (output and gradients),
runs chunk_kda with cp_context on its own share, and checks its share of the output and of every
gradient against the whole-stream result: gloo on the CPU in float64 to an RMS error ratio of
1e-10; nccl on GPU `rank` in float32 to tests/test_segments.py's CUDA ratios (2e-3, gradients 5e-3)."""
import os
import sys
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import assert_rel_close

import kda_ext

# float64 on the CPU: the CP result is the same maths, summed in another order. main() switches
# to float32 on the GPU with NCCL.
SETUP = dict(device=torch.device("cpu"), dtype=torch.float64, ratio=1e-10, grad_ratio=1e-10)

KIMI = dict(use_gate_in_kernel=True, safe_gate=True, lower_bound=-5.0, use_qk_l2norm_in_kernel=True,
            use_beta_sigmoid_in_kernel=True)
SOFTPLUS = dict(use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)   # A_log, -softplus gate

# (name, global offsets, tokens per rank or None for equal shares, chunk_kda flags, HV)
CASES = {
    "world2": [
        ("random-pregated", "random:2:3", None, dict(), 2),
        ("random-split-kimi-dr", "random:2:4", "random", dict(KIMI, disable_recompute=True), 2),
    ],
    "world3": [
        # one sequence over all three ranks (a middle rank whose one piece is neither first nor last)
        ("span3-softplus", [0, 10, 203, 210], None, dict(SOFTPLUS), 2),
        # a length-1 piece on each side of both boundaries: tokens 69 | 70 and 139 | 140
        # (run with an FLA-shaped context: FLACPContext's contiguous fields only)
        ("len1-bt32-vfirst-gva-flactx", [0, 69, 71, 139, 141, 210], None,
         dict(chunk_size=32, state_v_first=True, disable_recompute=True), 4),
    ],
    "world4": [
        # shares of 60: length-1 pieces at 59 | 60; rank 2 starts on a sequence boundary (120)
        # with a length-1 sequence; [121, 240) spans ranks 2 and 3
        ("boundaries-kimi", [0, 30, 59, 61, 120, 121, 240], None, dict(KIMI), 2),
        # ranks 0 holds whole sequences only; [55, 240) spans ranks 1, 2 and 3 (rank 2 in the middle)
        ("span3-uneven-pregated-dr", [0, 50, 55, 240], [50, 40, 30, 120], dict(disable_recompute=True), 2),
        ("random-bt32-kimi", "random:4:5", "random", dict(KIMI, chunk_size=32), 2),
    ],
}


def _resolve(offsets, split, world_size, gen):
    """Random offsets ('random:W:N': N sequences, total 64 * W) and split ('random': cuts at random
    token positions), both drawn from `gen`, the same on every rank."""
    if isinstance(offsets, str):
        _, w, n = offsets.split(":")
        total = 64 * int(w)
        cuts = torch.randperm(total - 1, generator=gen)[:int(n) - 1] + 1
        offsets = [0] + sorted(cuts.tolist()) + [total]
    if split == "random":
        cuts = sorted((torch.randperm(offsets[-1] - 1, generator=gen)[:world_size - 1] + 1).tolist())
        split = [b - a for a, b in zip([0] + cuts, cuts + [offsets[-1]])]
    return offsets, split


def _inputs(T, H, HV, K, V, cfg, gen):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    q = randn(1, T, H, K)
    k = F.normalize(randn(1, T, H, K), dim=-1)
    v = randn(1, T, HV, V)
    extra = {}
    if cfg.get("use_gate_in_kernel"):
        g = randn(1, T, HV, K)
        extra["A_log"] = randn(HV)
        # a bias of about -8 keeps both in-kernel gates mild (as in tests/test_segments.py)
        extra["dt_bias"] = randn(HV * K) - 8
    else:
        # mild decays (about -0.02 a step): the entry state still matters at a rank's end
        g = F.logsigmoid(randn(1, T, HV, K) + 4)
    beta = randn(1, T, HV) if cfg.get("use_beta_sigmoid_in_kernel") else torch.rand(1, T, HV, generator=gen,
                                                                                     dtype=torch.float64)
    return dict(q=q, k=k, v=v, g=g, beta=beta), extra


def _forward(q, k, v, g, beta, ctx, cfg, **params):
    return kda_ext.chunk_kda(q, k, v, g, beta, cp_context=ctx, **params, **cfg)[0]


def run_case(name, offsets, split, cfg, HV, compiled=None):
    rank, world_size = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(1234 + sum(map(ord, name)))
    offsets, split = _resolve(offsets, split, world_size, gen)
    H, K, V = 2, 16, 16
    T = offsets[-1]
    tensors, params = _inputs(T, H, HV, K, V, cfg, gen)
    do = torch.randn(1, T, HV, V, generator=gen, dtype=torch.float64)
    device, dtype = SETUP["device"], SETUP["dtype"]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tensors = {n: t.to(device, dtype if n in ("q", "k", "v") else param_dtype) for n, t in tensors.items()}
    params = {n: t.to(device, param_dtype) for n, t in params.items()}
    do = do.to(device, dtype)
    cu = torch.tensor(offsets, dtype=torch.int64, device=device)

    # the single-process result on the whole stream
    ref_leaves = {n: t.clone().requires_grad_() for n, t in {**tensors, **params}.items()}
    ref_kw = {n: ref_leaves[n] for n in params}
    o_ref, _ = kda_ext.chunk_kda(*(ref_leaves[n] for n in tensors), cu_seqlens=cu, **ref_kw, **cfg)
    grads_ref = dict(zip(ref_leaves, torch.autograd.grad(o_ref, list(ref_leaves.values()), do)))

    ctx = kda_ext.build_cp_context(cu, tokens_per_rank=split)
    shares = ctx.tokens_per_rank
    if name.endswith("flactx"):
        # what FLA's build_cp_context returns for a contiguous layout: no rank, world_size or
        # device copy of pre_num_ranks
        ctx = types.SimpleNamespace(
            group=ctx.group, cu_seqlens=ctx.cu_seqlens, cu_seqlens_cpu=ctx.cu_seqlens_cpu,
            is_last_rank=ctx.is_last_rank, pre_num_ranks=ctx.pre_num_ranks, is_first_rank=ctx.is_first_rank,
            post_num_ranks=ctx.post_num_ranks, conv1d_kernel_size=None, pre_num_conv_tokens=ctx.pre_num_conv_tokens,
            pre_num_ranks_dev=None, post_num_ranks_dev=None, layout="contiguous")
    s = sum(shares[:rank])
    e = s + shares[rank]
    where = f"case {name} rank {rank}/{world_size} tokens [{s}, {e}) of {offsets}"
    local = {n: t[:, s:e].clone().requires_grad_() for n, t in tensors.items()}
    local_params = {n: t.clone().requires_grad_() for n, t in params.items()}

    fn = compiled or _forward
    o = fn(*local.values(), ctx, cfg, **local_params)
    assert_rel_close(f"o ({where})", o_ref[:, s:e], o, SETUP["ratio"])
    grads = torch.autograd.grad(o, list(local.values()) + list(local_params.values()), do[:, s:e])
    for n, grad in zip(local, grads):
        assert_rel_close(f"d{n} ({where})", grads_ref[n][:, s:e], grad, SETUP["grad_ratio"])
    for n, grad in zip(local_params, grads[len(local):]):
        # a replicated parameter: each rank holds the gradient of its own tokens' outputs
        grad = grad.clone()
        dist.all_reduce(grad)
        assert_rel_close(f"d{n} ({where})", grads_ref[n], grad, SETUP["grad_ratio"])

    # This test has teeth: without the earlier ranks' state the first piece's output is wrong,
    # and without the later ranks' gradients the last piece's gradients are.
    plain = {n: t.detach().clone().requires_grad_() for n, t in local.items()}
    o_plain, _ = kda_ext.chunk_kda(*plain.values(), cu_seqlens=ctx.cu_seqlens, **params, **cfg)
    first = slice(0, int(ctx.cu_seqlens_cpu[1]))
    if ctx.pre_num_ranks > 0:
        err = (o_plain[:, first] - o_ref[:, s:e][:, first]).norm() / o_ref[:, s:e][:, first].norm()
        assert err > 1e-3, f"{where}: the entry state hardly matters here ({err:.2e}): the test is too weak"
    if ctx.post_num_ranks > 0:
        dk_plain, = torch.autograd.grad(o_plain, plain["k"], do[:, s:e])
        last = slice(int(ctx.cu_seqlens_cpu[-2]), None)
        ref = grads_ref["k"][:, s:e][:, last]
        err = (dk_plain[:, last] - ref).norm() / ref.norm()
        assert err > 1e-3, f"{where}: the exit-state gradient hardly matters here ({err:.2e})"
    return ctx


def main():
    rank, world_size, store_file, scenario = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    backend = sys.argv[5] if len(sys.argv) > 5 else "gloo"
    torch.set_num_threads(1)   # several ranks share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
        SETUP.update(device=torch.device("cuda", rank), dtype=torch.float32, ratio=2e-3, grad_ratio=5e-3)
    dist.init_process_group(backend, init_method=f"file://{store_file}", rank=rank, world_size=world_size)
    try:
        if scenario == "compile":
            fn = torch.compile(_forward, fullgraph=True)
            cfg = dict(KIMI, disable_recompute=True)
            run_case("compile-kimi", [0, 30, 100, 128], None, cfg, 2, compiled=fn)
            # Another split with the same local shapes (two pieces of 64 tokens on each rank) but
            # other boundary flags: the compiled graph is reused, not recompiled.
            with torch._dynamo.config.patch(error_on_recompile=True):
                run_case("compile-kimi-resplit", [0, 20, 64, 90, 128], None, cfg, 2, compiled=fn)
        else:
            for case in CASES[scenario]:
                run_case(*case)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown: once the group is destroyed and "ok" printed (every
    # check above raises, and exits non-zero, on a failure), gloo's background threads have aborted
    # that teardown now and then ("terminate called without an active exception", exit -6 on a
    # 2-core CI machine) after a run that passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

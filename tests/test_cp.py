# tests/test_cp.py: context parallelism (kda_ext.build_cp_context, chunk_kda(..., cp_context=...)).
"""The multi-process tests start 2, 3 and 4 gloo ranks on this machine (tests/cp_worker.py, joined
through a file store in the test's tmp_path, so that parallel runs never share a port or a store)
and fail after a time limit instead of hanging. Every rank checks its share of the output and
of every gradient against the single-process chunk_kda on the whole stream, in float64, to an RMS
error ratio of 1e-10; the cases are listed in cp_worker.CASES. The rest runs in this process:
build_cp_context's metadata against a token-by-token recount, and the errors."""
import os
import random
import subprocess
import sys
import time
import types

import pytest
import torch

import kda_ext
from kda_ext.cp import entry_state

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIME_LIMIT_S = 240   # a run takes 5 to 20 s; a hang (a collective one rank skipped) hits this


def _launch(world_size: int, scenario: str, tmp_path, backend: str = "gloo") -> None:
    store = tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in range(world_size)]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "cp_worker.py"), str(r), str(world_size),
                               str(store), scenario, backend], stdout=logs[r], stderr=subprocess.STDOUT, env=env, cwd=HERE)
             for r in range(world_size)]
    deadline = time.monotonic() + TIME_LIMIT_S
    timed_out = False
    try:
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    report = []
    for r, log in enumerate(logs):
        log.seek(0)
        report.append(f"--- rank {r} (exit {procs[r].returncode})\n{log.read()[-6000:]}")
        log.close()
    assert not timed_out, f"{scenario}: not done after {TIME_LIMIT_S} s (a hang?)\n" + "\n".join(report)
    assert all(p.returncode == 0 for p in procs), f"{scenario} failed\n" + "\n".join(report)


SCENARIOS = [(2, "world2"), (3, "world3"), (4, "world4"), (2, "compile")]


@pytest.mark.parametrize("world_size,scenario", SCENARIOS)
def test_cp_equals_single_process(world_size, scenario, tmp_path):
    """Output and every gradient (q, k, v, g, beta; A_log and dt_bias with the in-kernel gate) of
    each rank equal the whole-stream result; 'compile' does it under torch.compile(fullgraph=True)
    and then checks that another split with the same local shapes does not recompile."""
    _launch(world_size, scenario, tmp_path)


@pytest.mark.parametrize("world_size,scenario", SCENARIOS)
def test_cp_equals_single_process_nccl(world_size, scenario, tmp_path):
    """The same on GPUs with NCCL, in float32 (for a multi-GPU machine)."""
    if torch.cuda.device_count() < world_size or not kda_ext.chunk._HAS_CUDA_KERNELS:
        pytest.skip(f"needs {world_size} GPUs and a CUDA build of kda_ext (has {torch.cuda.device_count()} GPUs)")
    _launch(world_size, scenario, tmp_path, backend="nccl")


# --- build_cp_context's metadata, without processes ---------------------------------------------

def _recount(offsets, shares, rank):
    """This rank's local offsets, pre/post_num_ranks and pre_num_conv_tokens, token by token."""
    owner = [r for r, n in enumerate(shares) for _ in range(n)]          # rank of each token
    seq = [i for i in range(len(offsets) - 1) for _ in range(offsets[i], offsets[i + 1])]
    start = sum(shares[:rank])
    mine = range(start, start + shares[rank])
    local = [0] + [t - start + 1 for t in mine if t + 1 == len(seq) or seq[t + 1] != seq[t]]
    if local[-1] != len(mine):
        local.append(len(mine))
    first_seq, last_seq = seq[mine[0]], seq[mine[-1]]
    first_tok = min(t for t in range(len(seq)) if seq[t] == first_seq)
    last_tok = max(t for t in range(len(seq)) if seq[t] == last_seq)
    return local, rank - owner[first_tok], owner[last_tok] - rank, mine[0] - first_tok


def _check_against_recount(offsets, shares, split_arg):
    cu = torch.tensor(offsets, dtype=torch.int64)
    W = len(shares)
    for r in range(W):
        ctx = kda_ext.build_cp_context(cu, tokens_per_rank=split_arg, rank=r, world_size=W)
        local, pre, post, conv = _recount(offsets, shares, r)
        where = f"offsets {offsets}, shares {shares}, rank {r}"
        assert ctx.cu_seqlens_cpu.tolist() == local, where
        assert ctx.cu_seqlens.tolist() == local and ctx.cu_seqlens.dtype == torch.int32, where
        assert (ctx.pre_num_ranks, ctx.post_num_ranks, ctx.pre_num_conv_tokens) == (pre, post, conv), where
        assert ctx.is_first_rank == (pre == 0) and ctx.is_last_rank == (post == 0), where
        assert int(ctx.pre_num_ranks_dev) == pre and ctx.num_seqs == len(local) - 1, where
        assert (ctx.rank, ctx.world_size, ctx.tokens_per_rank) == (r, W, tuple(shares)), where


def test_metadata_of_chosen_splits():
    # shares of 60: pieces of length 1 on both sides of 60, a rank starting on a sequence
    # boundary (120) with a length-1 sequence, then one sequence over ranks 2 and 3
    _check_against_recount([0, 30, 59, 61, 120, 121, 240], [60] * 4, None)
    ctx = kda_ext.build_cp_context(torch.tensor([0, 30, 59, 61, 120, 121, 240]), rank=1, world_size=4)
    assert ctx.cu_seqlens_cpu.tolist() == [0, 1, 60] and (ctx.pre_num_ranks, ctx.post_num_ranks) == (1, 0)
    ctx = kda_ext.build_cp_context(torch.tensor([0, 30, 59, 61, 120, 121, 240]), rank=2, world_size=4)
    assert ctx.cu_seqlens_cpu.tolist() == [0, 1, 60] and (ctx.pre_num_ranks, ctx.post_num_ranks) == (0, 1)
    # one sequence over four ranks: the middle ranks hold one piece that is neither end
    ctx = kda_ext.build_cp_context(torch.tensor([0, 5, 200, 240]), rank=2, world_size=4)
    assert ctx.cu_seqlens_cpu.tolist() == [0, 60] and (ctx.pre_num_ranks, ctx.post_num_ranks) == (2, 1)
    assert ctx.pre_num_conv_tokens == 115
    # uneven shares; rank 0 holds whole sequences only; empty sequences leave no trace
    _check_against_recount([0, 50, 50, 55, 240, 240], [50, 40, 30, 120], [50, 40, 30, 120])
    ctx = kda_ext.build_cp_context(torch.tensor([0, 50, 50, 55, 240, 240]), tokens_per_rank=[50, 40, 30, 120],
                                   rank=0, world_size=4)
    assert ctx.cu_seqlens_cpu.tolist() == [0, 50] and (ctx.pre_num_ranks, ctx.post_num_ranks) == (0, 0)
    # one rank: the whole stream, nothing crosses
    _check_against_recount([0, 3, 10], [10], None)


def test_metadata_of_random_splits():
    rng = random.Random(5)
    for _ in range(200):
        W = rng.randint(1, 6)
        total = rng.randint(W, 40)
        offsets = [0] + sorted(rng.randint(0, total) for _ in range(rng.randint(0, 6))) + [total]
        if rng.random() < 0.5 and total % W == 0:
            shares, split_arg = [total // W] * W, None
        else:
            cuts = sorted(rng.sample(range(1, total), W - 1))
            shares = [b - a for a, b in zip([0] + cuts, cuts + [total])]
            split_arg = shares
        _check_against_recount(offsets, shares, split_arg)


def test_metadata_goes_to_the_offsets_device_and_reads_the_host_copy():
    cu = torch.tensor([0, 7, 12], dtype=torch.int32)
    ctx = kda_ext.build_cp_context(cu, cu_seqlens_cpu=cu.to(torch.int64), rank=1, world_size=2,
                                   conv1d_kernel_size=4)
    assert ctx.cu_seqlens.device == cu.device and ctx.cu_seqlens_cpu.device.type == "cpu"
    assert ctx.cu_seqlens_cpu.tolist() == [0, 1, 6] and ctx.conv1d_kernel_size == 4
    copy = ctx.copy_for_backward()
    assert copy.cu_seqlens is not ctx.cu_seqlens and torch.equal(copy.cu_seqlens, ctx.cu_seqlens)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(layout="zigzag"), ValueError, "`layout` must be 'contiguous', got 'zigzag'"),
    (dict(rank=0), ValueError, "both `rank` and `world_size`"),
    (dict(rank=2, world_size=2), ValueError, "0 <= rank < world_size"),
    (dict(rank=0, world_size=5), ValueError, r"multiple of the world size 5.*tokens_per_rank"),
    (dict(rank=0, world_size=2, tokens_per_rank=[5, 6]), ValueError, r"sum to the total number of tokens 12"),
    (dict(rank=0, world_size=2, tokens_per_rank=[12, 0]), ValueError, "2 \\(the world size\\) positive ints"),
    (dict(rank=0, world_size=2, tokens_per_rank=[4, 4, 4]), ValueError, "2 \\(the world size\\) positive ints"),
    (dict(rank=0, world_size=2, cu_seqlens=torch.tensor([1, 12])), ValueError, "`cu_seqlens` must start at 0"),
    (dict(rank=0, world_size=2, cu_seqlens=torch.tensor([0, 8, 5, 12])), ValueError, "non-decreasing"),
    (dict(rank=0, world_size=2, cu_seqlens=torch.tensor([0.0, 12.0])), TypeError, "int32 or int64"),
    (dict(rank=0, world_size=2, cu_seqlens=torch.tensor([[0, 12]])), ValueError, "1-D tensor"),
    (dict(rank=0, world_size=2, cu_seqlens=[0, 12]), TypeError, "`cu_seqlens` must be a torch.Tensor"),
    (dict(), RuntimeError, "torch.distributed is not initialised"),
])
def test_build_cp_context_errors(kwargs, exc, match):
    kwargs = dict(kwargs)
    cu = kwargs.pop("cu_seqlens", torch.tensor([0, 5, 12]))
    with pytest.raises(exc, match=match):
        kda_ext.build_cp_context(cu, **kwargs)


# --- chunk_kda with a cp_context, in this process ----------------------------------------------

def _local(T=12, H=2, K=8, V=8):
    return dict(q=torch.randn(1, T, H, K), k=torch.randn(1, T, H, K), v=torch.randn(1, T, H, V),
                g=-torch.rand(1, T, H, K), beta=torch.rand(1, T, H))


def test_one_rank_is_plain_varlen():
    # world size 1 needs no process group: the context is the local offsets, nothing crosses
    x = _local()
    cu = torch.tensor([0, 5, 12])
    ctx = kda_ext.build_cp_context(cu, rank=0, world_size=1)
    o_cp, ht = kda_ext.chunk_kda(**x, cp_context=ctx)
    o, _ = kda_ext.chunk_kda(**x, cu_seqlens=cu)
    assert ht is None and torch.equal(o_cp, o)


def _fla_like(**fields):
    base = dict(group=None, cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32),
                cu_seqlens_cpu=torch.tensor([0, 5, 12], dtype=torch.int32), pre_num_ranks=0, post_num_ranks=0,
                is_first_rank=True, is_last_rank=True, layout="contiguous")
    base.update(fields)
    return types.SimpleNamespace(**base)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(initial_state=torch.zeros(2, 2, 8, 8)), ValueError, "`initial_state` is not supported with `cp_context`"),
    (dict(output_final_state=True), ValueError, "`output_final_state=True` is not supported with `cp_context`"),
    (dict(cu_seqlens=torch.tensor([0, 6, 12])), ValueError, "`cu_seqlens` must be None .*with `cp_context`"),
    (dict(cp_context=_fla_like(layout="zigzag")), ValueError, "layout 'zigzag'"),
    (dict(cp_context=types.SimpleNamespace(layout="contiguous")), TypeError, "without the field `cu_seqlens`"),
    (dict(cp_context=_fla_like()), RuntimeError, "no process group and torch.distributed is not initialised"),
    (dict(world_size=2), RuntimeError, "no process group and torch.distributed is not initialised"),
    (dict(pre_num_ranks=1), ValueError, r"`cp_context.pre_num_ranks` must be an int in \[0, 0\]"),
    (dict(T=11), ValueError, r"`cp_context` holds 12 tokens on this rank .* T_local=11"),
    (dict(B=2), ValueError, r"with `cp_context`, q must be this rank's tokens \[1, T_local, H, K\]"),
])
def test_chunk_kda_cp_errors(kwargs, exc, match):
    kwargs = dict(kwargs)
    T, B = kwargs.pop("T", 12), kwargs.pop("B", 1)
    x = {n: t.expand(B, *t.shape[1:]).contiguous() for n, t in _local(T=T).items()}
    ctx = kda_ext.build_cp_context(torch.tensor([0, 5, 12]), rank=0, world_size=1)
    for field in ("world_size", "pre_num_ranks"):
        if field in kwargs:
            setattr(ctx, field, kwargs.pop(field))
    kwargs.setdefault("cp_context", ctx)
    with pytest.raises(exc, match=match):
        kda_ext.chunk_kda(**x, **kwargs)


def test_chunk_kda_cp_accepts_the_contexts_own_offsets():
    x = _local()
    ctx = kda_ext.build_cp_context(torch.tensor([0, 5, 12]), rank=0, world_size=1)
    o, _ = kda_ext.chunk_kda(**x, cp_context=ctx, cu_seqlens=torch.tensor([0, 5, 12]))
    assert torch.equal(o, kda_ext.chunk_kda(**x, cp_context=ctx)[0])


def test_entry_state_folds_the_earlier_ranks_maps():
    # rank 3 whose first sequence started on rank 1: S = A2 (A1 0 + C1) + C2; maps 0 and 3 unused
    torch.manual_seed(0)
    A, C = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 5, dtype=torch.float64)
    expected = A[2] @ C[1] + C[2]
    for pre in (2, torch.tensor(2)):
        assert torch.allclose(entry_state(A, C, 3, pre), expected, rtol=0, atol=1e-12)
    assert torch.equal(entry_state(A, C, 3, 0), torch.zeros(2, 3, 5, dtype=torch.float64))
    assert torch.allclose(entry_state(A, C, 1, 1), C[0], rtol=0, atol=0)


def test_readme_example_on_two_ranks(tmp_path):
    # test_readme.py runs the README's context-parallel example as a group of one; here torchrun
    # (--standalone: a free port of its own) runs it on two ranks, as the README says to.
    import re
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"^```python\n(.*?)^```$", f.read(), flags=re.DOTALL | re.MULTILINE)
    block, = [b for b in blocks if "build_cp_context" in b]
    script = tmp_path / "cp_example.py"
    script.write_text(block, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=TIME_LIMIT_S)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-6000:]}"
    # The ranks print concurrently, so their lines may run together: match the number exactly.
    errors = dict(re.findall(r"rank (\d): max \|o - o_whole\| = ([0-9.]+e[+-][0-9]+)", result.stdout))
    assert sorted(errors) == ["0", "1"], result.stdout
    # fp32 on the CPU: the same maths summed in another order
    assert all(float(e) < 1e-5 for e in errors.values()), result.stdout

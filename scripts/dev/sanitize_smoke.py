"""kda_ext: small CUDA calls for compute-sanitizer (memcheck/racecheck): fixed and varlen shapes,
odd head dims, both gate regimes, chunk 32/64, forward and (when a CUDA kernel is registered)
backward. Exits non-zero if any result is not finite."""
import os
import sys

import torch

# Run from a checkout: the in-place build of kda_ext lives in the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import kda_ext  # noqa: E402


def has_cuda_kernel(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"kda_ext::{op}", "CUDA")


def case(B, T, H, HV, K, V, cu=None, chunk_size=64, safe=False, dtype=torch.bfloat16, state_v_first=False):
    dev = "cuda"
    N = len(cu) - 1 if cu is not None else B
    q = torch.randn(B, T, H, K, device=dev, dtype=dtype)
    k = torch.randn(B, T, H, K, device=dev, dtype=dtype)
    v = torch.randn(B, T, HV, V, device=dev, dtype=dtype)
    g = torch.randn(B, T, HV, K, device=dev, dtype=dtype)
    beta = torch.randn(B, T, HV, device=dev, dtype=dtype)
    h0 = torch.randn(N, HV, *((V, K) if state_v_first else (K, V)), device=dev)
    A_log = torch.randn(HV, device=dev)
    dt_bias = torch.randn(HV * K, device=dev)
    leaves = [q, k, v, g, beta, h0, A_log, dt_bias]
    want_grad = has_cuda_kernel("chunk_kda_bwd")
    for t in leaves:
        t.requires_grad_(want_grad)
    cu_t = torch.tensor(cu, device=dev, dtype=torch.int32) if cu is not None else None
    o, ht = kda_ext.chunk_kda(
        q, k, v, g, beta, initial_state=h0, output_final_state=True,
        use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
        safe_gate=safe, lower_bound=-5.0 if safe else None, A_log=A_log, dt_bias=dt_bias,
        cu_seqlens=cu_t, chunk_size=chunk_size, state_v_first=state_v_first,
    )
    outs = [o, ht]
    if want_grad:
        grads = torch.autograd.grad((o.float().sum() + ht.sum()), leaves)
        outs += list(grads)
    torch.cuda.synchronize()
    bad = [i for i, t in enumerate(outs) if not torch.isfinite(t.float()).all()]
    assert not bad, f"non-finite outputs {bad} in case {(B, T, H, HV, K, V, cu, chunk_size, safe, state_v_first)}"


if __name__ == "__main__":
    case(2, 65, 2, 4, 64, 64)
    case(1, 100, 1, 1, 60, 100, chunk_size=32)
    case(1, 131, 2, 2, 128, 128, cu=[0, 1, 2, 67, 131], safe=True)
    case(1, 40, 1, 2, 256, 256, cu=[0, 17, 40], chunk_size=32, safe=True, dtype=torch.float16)
    case(1, 70, 1, 1, 32, 48, dtype=torch.float32)
    # Zero-length sequences with the [V, K] state layout (the final-state store reads S across warps).
    case(1, 70, 1, 2, 64, 48, cu=[0, 0, 5, 5, 70], state_v_first=True)
    # K = 128 16-bit shapes for the register state kernels (the default runs the forward one at
    # 32 columns here, KDA_EXT_STATE_KERNEL=mma64 its 64-column build, wmma the shared-memory
    # kernel; the bf16 one also runs the register reverse pass): V not a multiple of 8 with the
    # [V, K] layout and empty sequences, an odd V.
    case(1, 131, 2, 2, 128, 100, cu=[0, 0, 1, 67, 131], safe=True, dtype=torch.float16, state_v_first=True)
    case(2, 97, 1, 2, 128, 33)
    # K = V = 128 bf16 with GVA, a partial last chunk and the [V, K] layout: the register
    # per-chunk backward kernels (A's state_v_first path); the varlen bf16 case above runs them too.
    case(2, 100, 2, 4, 128, 128, state_v_first=True)
    print("sanitize smoke: ok")

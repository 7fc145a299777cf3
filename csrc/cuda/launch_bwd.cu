// kda_ext CUDA backward: launch layer (grids, shared-memory opt-in, launch checks) of chunk_kda_bwd.
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cuda/bwd_chunk.cuh"
#include "cuda/bwd_chunk_a_mma.cuh"
#include "cuda/bwd_chunk_b_mma.cuh"
#include "cuda/bwd_finalize.cuh"
#include "cuda/bwd_launch.cuh"
#include "cuda/bwd_state.cuh"
#include "cuda/bwd_state_mma.cuh"
#include "cuda/launch_common.h"
#include "cuda/static_switch.h"


namespace kda_ext {
namespace cuda {

BwdWorkspaceSizes bwd_workspace_sizes(const ChunkKdaBwdParams& p) {
  BwdWorkspaceSizes s{};
  const int64_t ntok = p.B * p.T, slots = p.B * p.NT;
  s.bounds = p.N + 1;
  s.dh = slots * p.HV * p.K * p.V;  // dh and dvn: elements of p.dtype, the others float32
  s.dvn = ntok * p.HV * p.V;
  s.dAkk_part = static_cast<int64_t>(p.NKS) * ntok * p.HV * p.BT;
  s.dA = ntok * p.HV * p.BT;
  s.dq_hv = ntok * p.HV * p.K;
  s.dbeta_part = static_cast<int64_t>(p.NKS + 1) * ntok * p.HV;
  s.ddt_part = slots * p.HV * p.K;
  s.dA_part = slots * p.HV * p.NKS;
  return s;
}

namespace {

using namespace bwd;


// Raises kernel's dynamic shared memory to `smem` bytes (checked against the device), launches
// it and checks the launch: the state kernel and the three per-chunk kernels start the same way.
template <typename Kernel>
void launch_with_smem(Kernel kernel, dim3 grid, int threads, int64_t smem, int limit,
                      const char* name, const ChunkKdaBwdParams& p, cudaStream_t stream) {
  set_dynamic_smem(kernel, smem, limit, name);
  kernel<<<grid, threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


// The backward's register-kernel switches: unset, empty, auto or mma pick the register kernel
// (mma.sync) where it applies, wmma the shared-memory one; anything else raises, naming `var`.
bool use_register_kernel(const char* var) {
  const char* v = std::getenv(var);
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0 || std::strcmp(v, "mma") == 0)
    return true;
  if (std::strcmp(v, "wmma") == 0) return false;
  TORCH_CHECK(false, "kda_ext: ", var, " must be auto, mma or wmma, got '", v, "'");
}

// Which reverse state kernel runs where both could (bf16, chunk 64, K = 128), from
// KDA_EXT_BWD_STATE_KERNEL: auto (default) or mma: bwd_state_mma_kernel (dS in registers, 32-column
// slices); wmma: bwd_state_kernel (its own width choice). Read per call, like the forward's
// KDA_EXT_STATE_KERNEL, so tests and benchmarks can compare the two in one process.
bool use_bwd_state_mma() { return use_register_kernel("KDA_EXT_BWD_STATE_KERNEL"); }

// Which kernel A runs where both could (bf16, chunk 64, K = V = 128, 16-byte aligned tensors,
// rstd from the recompute or no l2norm), from KDA_EXT_BWD_A_KERNEL: auto (default) or mma:
// bwd_chunk_a_mma_kernel (products in registers); wmma: bwd_chunk_a_kernel. Read per call.
bool use_bwd_a_mma() { return use_register_kernel("KDA_EXT_BWD_A_KERNEL"); }

// Which kernel B runs where both could (bf16, chunk 64, K = V = 128, 16-byte aligned operands),
// from KDA_EXT_BWD_B_KERNEL: auto (default) or mma: bwd_chunk_b_mma_kernel (products in
// registers); wmma: bwd_chunk_b_kernel. Read per call, as KDA_EXT_BWD_STATE_KERNEL.
bool use_bwd_b_mma() { return use_register_kernel("KDA_EXT_BWD_B_KERNEL"); }

// Whether bwd_chunk_a_mma_kernel takes p (T == bf16 and BT == 64 checked by the caller): its
// fixed shape, every tensor it copies with cp.async 16-byte aligned, and no rstd to compute
// (bwd_chunk_a_kernel computes and stores it for kernel C when the recompute did not).
bool chunk_a_mma_applies(const ChunkKdaBwdParams& p) {
  return p.K == 128 && p.V == 128 && p.NKS == 2 && (p.rstd_ready || !p.use_qk_l2norm) &&
         aligned16(p.h) && aligned16(p.dh) && aligned16(p.dout) && aligned16(p.v_new) &&
         aligned16(p.dvn) && aligned16(p.q) && aligned16(p.k) && aligned16(p.g_cum) &&
         aligned16(p.Akk);
}

// Whether bwd_chunk_b_mma_kernel takes p (T == bf16 and BT == 64 checked by the caller): its fixed
// shape, and every operand it reads by cp.async / 16-byte vectors (the dAkk partials as float2
// rows of 64 floats) 16-byte aligned (V = 128 and BT = 64 keep the rows aligned given aligned
// bases).
bool chunk_b_mma_applies(const ChunkKdaBwdParams& p) {
  return p.K == 128 && p.V == 128 && aligned16(p.dvn) && aligned16(p.v) && aligned16(p.dout) &&
         aligned16(p.v_new) && aligned16(p.Akk) && aligned16(p.dAkk_part);
}

// bwd_state_kernel over V slices of BV columns: grid (N, HV, ceil(V / BV)). The usual head
// sizes (K = 64, 128, 256) get a compile-time K build; with 16 columns only K = 128 has one
// (the other K take the general build).
template <typename T, int BT, int BV>
void launch_state(const ChunkKdaBwdParams& p, int limit, cudaStream_t stream) {
  const int64_t Kp = align_up(p.K, 16);
  const int64_t bytes = BwdStateSmem<BV>(BT, Kp, sizeof(T) == 2).total;
  auto kernel = bwd_state_kernel<T, BT, 0, BV>;
  if constexpr (BV == kBwdStateBV) {
    if (Kp == 64) kernel = bwd_state_kernel<T, BT, 64, BV>;
  }
  if (Kp == 128) kernel = bwd_state_kernel<T, BT, 128, BV>;
  if constexpr (BV == kBwdStateBV) {
    if (Kp == 256) kernel = bwd_state_kernel<T, BT, 256, BV>;
  }
  const dim3 grid(static_cast<unsigned>(p.N), static_cast<unsigned>(p.HV),
                  static_cast<unsigned>(cdiv(p.V, BV)));
  launch_with_smem(kernel, grid, kBwdStateThreads, bytes, limit, "bwd_state_kernel", p, stream);
}

// BT (== p.BT) is the compile-time chunk size of the state and chunk kernels (see
// bwd_state_kernel); the finishing kernels do not depend on it.
template <typename T, int BT>
void launch_typed(const ChunkKdaBwdParams& p, BwdStage stage, cudaStream_t stream) {
  const int limit = max_optin_smem();
  const int64_t slots = p.B * p.NT, ntok = p.B * p.T;
  const unsigned hv = static_cast<unsigned>(p.HV), nks = static_cast<unsigned>(p.NKS);
  // K == V == 128 (the Kimi models' head sizes) gets the compile-time K, V builds of the
  // per-chunk kernels (see kv_size: the slice / tile masks, clamps and size arithmetic fold).
  const bool kv128 = p.K == 128 && p.V == 128;
  switch (stage) {
    case BwdStage::kState:
      bwd_prep_kernel<<<1, kBwdPrepThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (p.N > 0) {
        if constexpr (BT == 64 && std::is_same_v<T, __nv_bfloat16>) {
          if (p.K == 128 && use_bwd_state_mma()) {
            const dim3 grid(static_cast<unsigned>(p.N), static_cast<unsigned>(p.HV),
                            static_cast<unsigned>(cdiv(p.V, state_bwd_mma::kBV)));
            launch_with_smem(bwd_state_mma_kernel<T>, grid, state_bwd_mma::kThreads,
                             state_bwd_mma::layout<T>().total, limit, "bwd_state_mma_kernel", p,
                             stream);
            break;
          }
        }
        // V slice width of the reverse state pass. Each block walks all of its sequence's
        // chunks one after another, so once every block has an SM to itself the pass takes
        // (chunks per sequence) x (time of one chunk step of one block): more blocks than SMs
        // only queue. When the 32-column grid, N * HV * ceil(V / 32) blocks, is smaller than
        // the SM count (few sequences and heads: (1, 32768, 16, 128) has 64 blocks on an
        // H100's 132 SMs), 16-column slices double the blocks onto idle SMs and shorten each
        // chunk step (half the V-proportional work; the columns are independent, see
        // bwd_state_kernel). At or above the SM count (the main shape (2, 8192, 32, 128): 256
        // blocks) the SMs are busy already and 32 columns do less total work (the kg, qg, w,
        // Aqk tiles loaded and widened once per 32 columns instead of per 16), so they stay.
        // 16 columns are built for BT = 64 with K = 128 (compile-time K) or K not 64 / 256
        // (general build); chunk 32 and the compile-time K = 64 / 256 builds keep 32 columns.
        if constexpr (BT == 64) {
          const int64_t Kp = align_up(p.K, 16);
          if (Kp != 64 && Kp != 256 &&
              p.N * p.HV * cdiv(p.V, kBwdStateBV) < sm_count()) {
            launch_state<T, BT, kBwdStateBVNarrow>(p, limit, stream);
            break;
          }
        }
        launch_state<T, BT, kBwdStateBV>(p, limit, stream);
      }
      break;
    case BwdStage::kChunkA:
      if constexpr (BT == 64 && std::is_same_v<T, __nv_bfloat16>) {
        // The switch is read first: an invalid value raises for any bf16, chunk-64 shape.
        if (use_bwd_a_mma() && slots > 0 && chunk_a_mma_applies(p)) {
          launch_with_smem(bwd_chunk_a_mma_kernel<T>, dim3(static_cast<unsigned>(slots), hv, nks),
                           chunk_a_mma::kThreads, chunk_a_mma::layout().total, limit,
                           "bwd_chunk_a_mma_kernel", p, stream);
          break;
        }
      }
      if (slots > 0)
        launch_with_smem(kv128 ? bwd_chunk_a_kernel<T, BT, 128> : bwd_chunk_a_kernel<T, BT, 0>,
                         dim3(static_cast<unsigned>(slots), hv, nks), kBwdThreads,
                         BwdChunkASmem(BT, sizeof(T) == 2).total, limit, "bwd_chunk_a_kernel", p,
                         stream);
      break;
    case BwdStage::kChunkB:
      if constexpr (BT == 64 && std::is_same_v<T, __nv_bfloat16>) {
        // The switch is read only where the register kernel applies (as KDA_EXT_BWD_STATE_KERNEL;
        // kernel A reads its switch first).
        if (slots > 0 && chunk_b_mma_applies(p) && use_bwd_b_mma()) {
          launch_with_smem(bwd_chunk_b_mma_kernel<T>, dim3(static_cast<unsigned>(slots), hv),
                           chunk_b_mma::kThreads, chunk_b_mma::layout<T>().total, limit,
                           "bwd_chunk_b_mma_kernel", p, stream);
          break;
        }
      }
      if (slots > 0)
        launch_with_smem(kv128 ? bwd_chunk_b_kernel<T, BT, 128> : bwd_chunk_b_kernel<T, BT, 0>,
                         dim3(static_cast<unsigned>(slots), hv), kBwdThreads,
                         BwdChunkBSmem(BT, sizeof(T) == 2).total, limit, "bwd_chunk_b_kernel", p,
                         stream);
      break;
    case BwdStage::kChunkC:
      if (slots > 0)
        launch_with_smem(kv128 ? bwd_chunk_c_kernel<T, BT, 128> : bwd_chunk_c_kernel<T, BT, 0>,
                         dim3(static_cast<unsigned>(slots), hv, nks), kBwdThreads,
                         BwdChunkCSmem(BT, kCBf16x3<T>).total, limit, "bwd_chunk_c_kernel", p, stream);
      break;
    case BwdStage::kFinish:
      if (ntok > 0) {
        const int64_t warps = 2 * ntok * p.H;
        auto dqk = p.K <= 128 ? bwd_dqk_kernel<T, 4> : bwd_dqk_kernel<T, 8>;
        dqk<<<static_cast<unsigned>(cdiv(warps * 32, kBwdThreads)), kBwdThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        bwd_dbeta_kernel<<<static_cast<unsigned>(cdiv(ntok * p.HV, kBwdThreads)), kBwdThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (p.use_gate_in_kernel && (p.dA_log != nullptr || p.ddt_bias != nullptr)) {
        bwd_gate_reduce_kernel<<<hv, kBwdThreads, kBwdThreads * sizeof(float), stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      break;
  }
}

}  // namespace

void launch_chunk_kda_bwd_stage(const ChunkKdaBwdParams& p, BwdStage stage, cudaStream_t stream) {
  TORCH_CHECK(p.K >= 1 && p.K <= 256 && p.V >= 1 && p.V <= 256,
              "kda_ext: CUDA backward supports K, V in [1, 256], got K=", p.K, ", V=", p.V);
  TORCH_CHECK(p.BT == 32 || p.BT == 64, "kda_ext: chunk_size must be 32 or 64, got ", p.BT);
  TORCH_CHECK(p.HV >= 1 && p.HV <= 65535, "kda_ext: CUDA backward supports up to 65535 value heads, got ", p.HV);
  TORCH_CHECK(p.B * p.NT < (int64_t(1) << 31) && p.N < (int64_t(1) << 31),
              "kda_ext: too many chunks for one CUDA launch");
  KDA_DTYPE_SWITCH(p.dtype, T, [&] {
    KDA_CHUNK_SWITCH(p.BT, BT, [&] { launch_typed<T, BT>(p, stage, stream); });
  });
}

}  // namespace cuda
}  // namespace kda_ext

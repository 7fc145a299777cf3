// kda_ext CUDA: launch layer of the chunk_kda forward (params + stream in, kernels out).
//
// Grids depend on shapes only and nothing here synchronises or allocates, so the sequence is
// CUDA-graph safe. Every launch is followed by C10_CUDA_KERNEL_LAUNCH_CHECK, and the dynamic
// shared-memory limit is raised (and checked against the device's opt-in maximum) per kernel.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "cuda/chunk_prepare.cuh"
#include "cuda/chunk_prepare_lean.cuh"
#include "cuda/chunk_state_output.cuh"
#include "cuda/launch_common.h"
#include "cuda/launch_fwd.h"
#include "cuda/params.h"
#include "cuda/sm90/launch_sm90.h"
#include "cuda/state_output_mma.cuh"
#include "cuda/static_switch.h"

namespace kda_ext {
namespace cuda {

namespace {

// How many blocks of `smem` dynamic shared-memory bytes one SM holds by shared memory alone:
// attribute queries like max_optin_smem's (no synchronisation, no stream work, so safe under
// CUDA graph capture).
int blocks_per_sm_by_smem(int64_t smem) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int per_sm = 0, reserved = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev));
  return static_cast<int>(per_sm / (smem + reserved));
}

// Which state/output kernel runs where several could (16-bit inputs, chunk 64, K = 128), from
// KDA_EXT_STATE_KERNEL: auto (default): the Hopper kernel on wgmma + TMA
// (sm90/state_output_sm90.cuh) where it applies (state_output_sm90_applies: the forward's output
// pass, K = V = 128), else mma; sm90: the same; mma: the register kernel, V slices of 64 columns
// when that grid nearly fills the GPU, else 32; mma32 / mma64: the register kernel at that
// width; wmma: the shared-memory kernel (its own width choice). Read per call (a few hundred ns,
// no allocation, graph safe), so tests and benchmarks can compare the kernels in one process.
enum class StateKernelChoice { kMma, kMma32, kMma64, kWmma, kSm90 };

StateKernelChoice state_kernel_choice() {
  const char* v = std::getenv("KDA_EXT_STATE_KERNEL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return StateKernelChoice::kSm90;
  if (std::strcmp(v, "mma") == 0) return StateKernelChoice::kMma;
  if (std::strcmp(v, "mma32") == 0) return StateKernelChoice::kMma32;
  if (std::strcmp(v, "mma64") == 0) return StateKernelChoice::kMma64;
  if (std::strcmp(v, "wmma") == 0) return StateKernelChoice::kWmma;
  if (std::strcmp(v, "sm90") == 0) return StateKernelChoice::kSm90;
  TORCH_CHECK(false, "kda_ext: KDA_EXT_STATE_KERNEL must be auto, mma, mma32, mma64, wmma or sm90, got '",
              v, "'");
}

// Which intra-chunk kernel runs where chunk_prepare_lean applies (chunk_prepare_lean_applies), from
// KDA_EXT_PREP_KERNEL: auto (default): chunk_prepare_lean for the backward's recompute and, in the
// forward, under safe_gate; lean: chunk_prepare_lean for every gate; classic: chunk_prepare. Read
// per call like KDA_EXT_STATE_KERNEL, so tests can run both on the same inputs in one process.
// Why auto keeps the forward of the unbounded gate on chunk_prepare: with real decays (A = exp(A_log)
// up to 16) nearly every diagonal block leaves the median path's range and takes the lean
// kernel's element-wise path, which made that forward 26% slower on an H100 (docs/perf-notes.md,
// session 11).
bool prep_lean_wanted(const ChunkKdaFwdParams& p) {
  const char* v = std::getenv("KDA_EXT_PREP_KERNEL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) {
    const bool recompute = p.Akk_saved != nullptr && p.o == nullptr;
    return recompute || p.safe_gate;
  }
  if (std::strcmp(v, "lean") == 0) return true;
  if (std::strcmp(v, "classic") == 0) return false;
  TORCH_CHECK(false, "kda_ext: KDA_EXT_PREP_KERNEL must be auto, lean or classic, got '", v, "'");
}

template <typename T, int BV>
void launch_state_output_mma(const ChunkKdaFwdParams& p, int limit, cudaStream_t stream) {
  auto kernel = chunk_state_output_mma_kernel<T, BV>;
  const int64_t smem = state_mma::layout<T, BV>().total;
  set_dynamic_smem(kernel, smem, limit, "chunk_state_output_mma");
  const dim3 grid(static_cast<unsigned>(p.N * cdiv(p.V, BV)), static_cast<unsigned>(p.HV));
  kernel<<<grid, state_mma::Cfg<BV>::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int BT>
void launch_typed(const ChunkKdaFwdParams& p, cudaStream_t stream) {
  const int limit = max_optin_smem();
  // Grid limits: x < 2^31, y and z <= 65535 (chunk_state_output's 16-column slices run only
  // grids below twice the SM count, so its x bound is the 32-column one).
  TORCH_CHECK(p.HV <= 65535, "kda_ext: the CUDA kernels support up to 65535 value heads, got ", p.HV);
  TORCH_CHECK(p.B <= 65535, "kda_ext: the CUDA kernels support batch sizes up to 65535, got ", p.B);
  TORCH_CHECK(p.NT <= 0x7fffffffLL && p.N * cdiv(p.V, kBV) <= 0x7fffffffLL,
              "kda_ext: too many chunks or sequences for the CUDA kernels: NT=", p.NT, ", N=", p.N);
  // chunk_prepare and chunk_state_output address a chunk's elements as int offsets
  // row * stride + col (row < BT) from a per-chunk base pointer; the widest row stride is
  // HV * max(K, V, BT) (HV >= H). The limits above (HV <= 65535, K, V <= 256) keep this below
  // 2^31; the check keeps a change of those limits from overflowing silently.
  const int64_t widest_row = p.HV * std::max({p.K, p.V, static_cast<int64_t>(BT)});
  TORCH_CHECK(BT * widest_row <= 0x7fffffffLL,
              "kda_ext: the CUDA forward kernels need chunk_size * HV * max(K, V, chunk_size) < "
              "2^31, got chunk_size=", BT, ", HV=", p.HV, ", K=", p.K, ", V=", p.V);

  if (p.varlen) {
    chunk_offsets_kernel<<<1, kOffsetsThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  bool prepared = false;
  if constexpr (BT == 64 && std::is_same_v<T, __nv_bfloat16>) {
    if (p.NT > 0 && p.B > 0 && p.HV > 0 && chunk_prepare_lean_applies(p) && prep_lean_wanted(p)) {
      const bool recompute = p.Akk_saved != nullptr;
      auto kernel = recompute ? chunk_prepare_lean_kernel<T, true> : chunk_prepare_lean_kernel<T, false>;
      const int64_t smem =
          recompute ? prep_lean::layout<T, true>().total : prep_lean::layout<T, false>().total;
      set_dynamic_smem(kernel, smem, limit, "chunk_prepare_lean");
      const dim3 grid(static_cast<unsigned>(p.NT), static_cast<unsigned>(p.HV),
                      static_cast<unsigned>(p.B));
      kernel<<<grid, prep_lean::kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      prepared = true;
    }
  }

  if (!prepared && p.NT > 0 && p.B > 0 && p.HV > 0) {
    int64_t smem = prep_layout<T, BT>().total;
    // K == V == 128 (the Kimi models' head size) with chunk 64 and 16-bit inputs gets the build
    // with K and V as compile-time constants (strides, slice counts and column masks fold;
    // bitwise the same results; static SASS of the bf16 kernel 6832 -> 6560 instructions, pass
    // 2's slice loop 819 -> 645); any other K, V, chunk size or dtype the general one. Left out:
    // fp32 (the safe_gate build spilled 12 bytes at the register cap, and its pass 2 came out
    // longer) and chunk 32 (no spills, but pass 2's loop shrank by 1%).
    auto kernel = p.safe_gate ? chunk_prepare_kernel<T, BT, true, 0>
                              : chunk_prepare_kernel<T, BT, false, 0>;
    if constexpr (BT == 64 && !std::is_same_v<T, float>) {
      if (p.K == 128 && p.V == 128)
        kernel = p.safe_gate ? chunk_prepare_kernel<T, BT, true, 128>
                             : chunk_prepare_kernel<T, BT, false, 128>;
      // The backward's recompute (the forward's Akk passed in, no output o) in that
      // configuration: the recompute-only build (no Aqk/Lkk code, 30.5 KiB of shared memory
      // instead of 88, launch bound kPrepRecomputeCtas; same arithmetic as the
      // run-time reuse_akk path of the build above, so bitwise the same results).
      if (p.K == 128 && p.V == 128 && p.Akk_saved != nullptr && p.o == nullptr) {
        kernel = p.safe_gate ? chunk_prepare_kernel<T, BT, true, 128, true>
                             : chunk_prepare_kernel<T, BT, false, 128, true>;
        smem = prep_layout_recompute<T, BT>().total;
      }
    }
    set_dynamic_smem(kernel, smem, limit, "chunk_prepare");
    const dim3 grid(static_cast<unsigned>(p.NT), static_cast<unsigned>(p.HV),
                    static_cast<unsigned>(p.B));
    kernel<<<grid, kPrepThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  if (p.N > 0 && p.HV > 0 && p.V > 0) {
    // The register-resident kernel (state_output_mma.cuh) for the Kimi configuration (see
    // state_kernel_choice for the switch). 64-column slices when their grid nearly fills the GPU
    // in one wave (the main shape (2, 8192, 32, 128): 128 CTAs on 132 SMs); 32 otherwise (B = 1,
    // T = 32768, HV = 16: 64 CTAs, where 64 columns would leave three quarters of the SMs idle).
    if constexpr (BT == 64 && !std::is_same_v<T, float>) {
      StateKernelChoice choice = state_kernel_choice();
      if (choice == StateKernelChoice::kSm90) {
#ifdef KDA_EXT_WITH_SM90  // setup.py: the sm90 sources are built (CUDA with the 90a target)
        if (state_output_sm90_applies(p)) {
          launch_state_output_sm90(p, stream);
          return;
        }
#endif
        choice = StateKernelChoice::kMma;
      }
      if (p.K == 128 && choice != StateKernelChoice::kWmma) {
        bool wide = choice == StateKernelChoice::kMma64;
        if (choice == StateKernelChoice::kMma)
          wide = 8 * p.N * p.HV * cdiv(p.V, 64) >= 7 * static_cast<int64_t>(sm_count());
        if (wide) launch_state_output_mma<T, 64>(p, limit, stream);
        else launch_state_output_mma<T, 32>(p, limit, stream);
        return;
      }
    }
    int64_t smem = state_layout<T, BT, kBV>(p.K).total;
    int bv = kBV;
    // The usual head sizes (K = 64, 128, 256) with chunk 64 get a compile-time K layout; the
    // BT = 32 fp16 build of the K = 128 one spilled at the register cap, so chunk 32 keeps the
    // general one.
    auto kernel = chunk_state_output_kernel<T, BT, 0, kBV>;
    if constexpr (BT == 64) {
      const int64_t kp = align_up(p.K, 16);
      if (kp == 64) kernel = chunk_state_output_kernel<T, BT, 64, kBV>;
      if (kp == 128) kernel = chunk_state_output_kernel<T, BT, 128, kBV>;
      bool general = kp != 64 && kp != 128;  // the general-K build runs
      // (The fp16 build of K = 256 spilled 12 bytes at the register cap: it keeps the general one.)
      if constexpr (!std::is_same<T, __half>::value) {
        if (kp == 256) kernel = chunk_state_output_kernel<T, BT, 256, kBV>;
        general = general && kp != 256;
      }
      // V slices of 16 columns (chunk_state_output.cuh, "V slice width": same results, twice the
      // CTAs, shorter chunk steps) when the 32-column grid leaves SMs idle: N*HV*ceil(V/32) < SMs
      // (B = 1, T = 32768, HV = 16, V = 128: 64 CTAs -> 128 on an H100's 132 SMs; the (2, 8192,
      // 32, 128) main shape has 256 and keeps 32). And only where the doubled grid still runs in
      // one wave: 2 * N*HV*ceil(V/32) <= SMs * blocks per SM (by shared memory; the launch bounds
      // allow 2 by registers), else half the CTAs would wait for a second wave. On a half-empty
      // GPU the narrow CTAs run alone or in pairs per SM, each pair doing one wide CTA's work per
      // chunk with two independent chains. Built for the K = 128 and the general-K kernels only
      // (K = 64 and K = 256 keep their compile-time builds at 32 columns).
      if (kp == 128 || general) {
        const int64_t wide_ctas = p.N * p.HV * cdiv(p.V, kBV);
        const int sms = sm_count();
        if (wide_ctas < sms) {
          const int64_t narrow_smem = state_layout<T, BT, kBVNarrow>(p.K).total;
          const int64_t per_sm = std::min(2, blocks_per_sm_by_smem(narrow_smem));
          if (2 * wide_ctas <= per_sm * sms) {
            kernel = kp == 128 ? chunk_state_output_kernel<T, BT, 128, kBVNarrow>
                               : chunk_state_output_kernel<T, BT, 0, kBVNarrow>;
            smem = narrow_smem;
            bv = kBVNarrow;
          }
        }
      }
    }
    set_dynamic_smem(kernel, smem, limit, "chunk_state_output");
    const dim3 grid(static_cast<unsigned>(p.N * cdiv(p.V, bv)), static_cast<unsigned>(p.HV));
    kernel<<<grid, kStateThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void launch_chunk_kda_fwd(const ChunkKdaFwdParams& p, cudaStream_t stream) {
  TORCH_CHECK(p.K >= 1 && p.K <= 256 && p.V >= 1 && p.V <= 256,
              "kda_ext: the CUDA kernels need 1 <= K, V <= 256, got K=", p.K, ", V=", p.V);
  TORCH_CHECK(p.H > 0 && p.HV % p.H == 0, "kda_ext: HV must be a multiple of H");
  KDA_DTYPE_SWITCH(p.dtype, T, [&] {
    KDA_CHUNK_SWITCH(p.BT, BT, [&] { launch_typed<T, BT>(p, stream); });
  });
}

}  // namespace cuda
}  // namespace kda_ext

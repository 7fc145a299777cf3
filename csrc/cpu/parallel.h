// kda_ext CPU backend: the stages' parallel loop, with denormal floats flushed to zero inside it.
//
// Why: with strong decays (log-gates around -2, the lower-bound gate's normal range) the gate
// factors e^{G_i - G_j} of a chunk fall below FLT_MIN (2^-126) and every product with them is a
// denormal; x86 cores handle those in microcode, and the forward ran ~10x slower than with mild
// gates. Denormals are below 1.2e-38 (fp32) / 2.2e-308 (fp64), far under the backend's
// tolerances, so the kernels compute as if they were zero: FTZ (results) and DAZ (inputs) on x86
// (MXCSR), FZ on aarch64 (FPCR), nothing on other targets.
//
// The mode is per thread, and at::parallel_for runs its body on the OpenMP pool (and inline on the
// calling thread for small ranges), so the guard sits inside the body: each worker sets the mode
// for its share and restores its previous mode before returning to the pool, and the caller's
// own mode (torch.set_flush_denormal) is what it was before the call.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace kda_ext {
namespace cpu {

// Sets flush-to-zero for the current thread on construction, restores the saved mode on
// destruction. Nests (each guard restores what it found).
class FlushDenormalsGuard {
 public:
  FlushDenormalsGuard() {
#if defined(__x86_64__) || defined(_M_X64)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | kMxcsrFtz | kMxcsrDaz);  // every x86-64 core has DAZ
#elif defined(__aarch64__)
    uint64_t fpcr;
    asm volatile("mrs %0, fpcr" : "=r"(fpcr)::"memory");
    saved_ = fpcr;
    asm volatile("msr fpcr, %0" ::"r"(fpcr | kFpcrFz) : "memory");
#endif
  }
  ~FlushDenormalsGuard() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_setcsr(static_cast<unsigned int>(saved_));
#elif defined(__aarch64__)
    asm volatile("msr fpcr, %0" ::"r"(saved_) : "memory");
#endif
  }
  FlushDenormalsGuard(const FlushDenormalsGuard&) = delete;
  FlushDenormalsGuard& operator=(const FlushDenormalsGuard&) = delete;

 private:
  static constexpr uint64_t kMxcsrFtz = 1u << 15;  // results below FLT_MIN / DBL_MIN become 0
  static constexpr uint64_t kMxcsrDaz = 1u << 6;   // denormal operands read as 0
  static constexpr uint64_t kFpcrFz = uint64_t(1) << 24;  // aarch64: both of the above
  uint64_t saved_ = 0;
};

// at::parallel_for with every share of [begin, end) run under FlushDenormalsGuard. All of the CPU
// stages' parallel loops go through here.
template <class F>
inline void parallel_for_flush_denormals(int64_t begin, int64_t end, int64_t grain, const F& body) {
  at::parallel_for(begin, end, grain, [&body](int64_t share_begin, int64_t share_end) {
    FlushDenormalsGuard guard;
    body(share_begin, share_end);
  });
}

}  // namespace cpu
}  // namespace kda_ext

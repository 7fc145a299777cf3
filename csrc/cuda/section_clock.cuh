// kda_ext CUDA: per-section cycle counts of one warp, for builds made with
// KDA_EXT_PROFILE_SECTIONS=1 (setup.py; recorded as PROFILE_SECTIONS in _build_config.py). Where ncu's
// source-level sampling is unavailable (the leased machines), this says where a warp-specialized
// kernel's warps spend their time: one thread of the warp to watch adds clock64() differences per
// named section over the whole run and prints them from the kernel when it ends
// (scripts/dev/fused_sections.py reads them). Without the switch every macro is empty and the kernel
// compiles exactly as before.
#pragma once

#ifdef KDA_EXT_PROFILE_SECTIONS
#include <cstdio>

namespace kda_ext {
namespace cuda {

template <int kSections>
struct SectionClock {
  long long last = 0;
  long long sums[kSections] = {};
  bool on = false;
  __device__ __forceinline__ void start(bool watch) {
    on = watch;
    last = clock64();
  }
  __device__ __forceinline__ void lap(int section) {
    if (!on) return;
    const long long now = clock64();
    sums[section] += now - last;
    last = now;
  }
  // One line a section: "kda_ext sections <role> <section> <cycles> <per_unit>".
  __device__ __forceinline__ void report(const char* role, const char* const (&names)[kSections], int units) const {
    if (!on) return;
    for (int s = 0; s < kSections; ++s)
      printf("kda_ext sections %s %s %lld %lld\n", role, names[s], sums[s], units > 0 ? sums[s] / units : 0LL);
  }
};

}  // namespace cuda
}  // namespace kda_ext

#define KDA_SECTIONS_DECLARE(clock, n) ::kda_ext::cuda::SectionClock<n> clock
#define KDA_SECTIONS_START(clock, watch) clock.start(watch)
#define KDA_SECTIONS_LAP(clock, section) clock.lap(section)
#define KDA_SECTIONS_REPORT(clock, role, names, units) clock.report(role, names, units)
#else
#define KDA_SECTIONS_DECLARE(clock, n)
#define KDA_SECTIONS_START(clock, watch)
#define KDA_SECTIONS_LAP(clock, section)
#define KDA_SECTIONS_REPORT(clock, role, names, units)
#endif

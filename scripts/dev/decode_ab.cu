// Stand-alone A/B of two versions of the decode kernel (scripts/dev/decode_ab.sh builds it; no torch):
// one decode step, 256 x 32 x 128x128 fp32 states, bf16 inputs, kimi gate, both layouts, functional,
// in place and in place through state slots; median of 7 runs of 20 launches, and the two versions'
// outputs compared. [K, V] also runs the working tree's sliced kernel with 64-column slices and its
// column-per-thread kernel (the one launch_fused_recurrent.cu picks at K = V = 128) at two
// register floors.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <cstdio>
#include <cmath>
#include <vector>
#include "cuda/fused_recurrent_params.h"
#include "fr_old.cuh"  // REV's kernel, namespace recurrent_old (decode_ab.sh writes it)
#include "fr_new.cuh"  // the working tree's, namespace recurrent_new
using namespace kda_ext::cuda;
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA error %s at %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)
__global__ void fill_f(float* p, size_t n, unsigned seed, float scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = scale * ((h & 0xffffff) / float(0x1000000) - 0.5f);
  }
}
__global__ void fill_b(__nv_bfloat16* p, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = __float2bfloat16(2.f * ((h & 0xffffff) / float(0x1000000) - 0.5f));
  }
}
typedef void (*Kern)(const FusedRecurrentParams);
float time_it(Kern k, const FusedRecurrentParams& p, float* restore_dst, const float* restore_src, size_t bytes,
              int cta_cols = 32) {
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  const unsigned blocks = p.N * p.HV * ((p.V + cta_cols - 1) / cta_cols);
  std::vector<float> ms;
  for (int rep = 0; rep < 7; ++rep) {
    float tot = 0;
    for (int it = 0; it < 20; ++it) {
      if (restore_dst) CK(cudaMemcpyAsync(restore_dst, restore_src, bytes, cudaMemcpyDeviceToDevice));
      cudaEventRecord(a);
      if (k) k<<<blocks, 128>>>(p); else CK(cudaMemcpyAsync(p.state_out, p.state_in, bytes, cudaMemcpyDeviceToDevice));
      cudaEventRecord(b); CK(cudaEventSynchronize(b));
      float t; cudaEventElapsedTime(&t, a, b); tot += t;
    }
    ms.push_back(tot / 20);
  }
  CK(cudaGetLastError());
  std::sort(ms.begin(), ms.end());
  return ms[3];
}
int main() {
  const int64_t N = 256, HV = 32, K = 128, V = 128;
  const size_t S = N * HV * K * V, bytes = S * 4;
  float *s0, *s1, *s2, *alog, *dtb; __nv_bfloat16 *q, *k, *v, *g, *beta, *o1, *o2;
  CK(cudaMalloc(&s0, bytes)); CK(cudaMalloc(&s1, bytes)); CK(cudaMalloc(&s2, bytes));
  CK(cudaMalloc(&q, N * HV * K * 2)); CK(cudaMalloc(&k, N * HV * K * 2)); CK(cudaMalloc(&v, N * HV * V * 2));
  CK(cudaMalloc(&g, N * HV * K * 2)); CK(cudaMalloc(&beta, N * HV * 2));
  CK(cudaMalloc(&o1, N * HV * V * 2)); CK(cudaMalloc(&o2, N * HV * V * 2));
  CK(cudaMalloc(&alog, HV * 4)); CK(cudaMalloc(&dtb, HV * K * 4));
  fill_f<<<1024, 256>>>(s0, S, 1, 2.f); fill_b<<<256, 256>>>(q, N * HV * K, 2); fill_b<<<256, 256>>>(k, N * HV * K, 3);
  fill_b<<<256, 256>>>(v, N * HV * V, 4); fill_b<<<256, 256>>>(g, N * HV * K, 5); fill_b<<<256, 256>>>(beta, N * HV, 6);
  fill_f<<<1, 32>>>(alog, HV, 7, 2.f); fill_f<<<64, 256>>>(dtb, HV * K, 8, 2.f);
  int* slots; CK(cudaMalloc(&slots, N * 4));
  { std::vector<int> hsl(N); for (int i = 0; i < N; ++i) hsl[i] = (int)(N - 1 - i); CK(cudaMemcpy(slots, hsl.data(), N * 4, cudaMemcpyHostToDevice)); }
  CK(cudaDeviceSynchronize());
  FusedRecurrentParams p;
  p.q = q; p.k = k; p.v = v; p.g = g; p.beta = beta; p.A_log = alog; p.dt_bias = dtb;
  p.num_slots = N; p.state_in = s0; p.state_in_stride = HV * K * V; p.state_out = s1; p.state_out_stride = HV * K * V;
  p.o = o1; p.B = N; p.T = 1; p.H = HV; p.HV = HV; p.K = K; p.V = V; p.N = N; p.scale = 1.f / sqrtf(128.f);
  p.lower_bound = -5.f; p.dtype = DType::kBFloat16; p.g_dtype = DType::kBFloat16; p.beta_dtype = DType::kBFloat16;
  p.use_qk_l2norm = true; p.use_gate_in_kernel = true; p.use_lower_bound_gate = true; p.use_beta_sigmoid = true;
  float copy = time_it(nullptr, p, nullptr, nullptr, bytes);
  printf("state copy (512 MiB each way): %.4f ms (%.0f GB/s); floor at 3.35 TB/s: %.4f ms\n", copy, 2.0 * bytes / copy / 1e6, 2.0 * bytes / 3.35e9);
  for (int vf = 0; vf < 2; ++vf) {
    p.state_v_first = vf;
    Kern ko = vf ? recurrent_old::fused_recurrent_kda_kernel<__nv_bfloat16, true, 4, 128> : recurrent_old::fused_recurrent_kda_kernel<__nv_bfloat16, false, 4, 128>;
    Kern kn = vf ? recurrent_new::fused_recurrent_kda_kernel<__nv_bfloat16, true, 4, 128> : recurrent_new::fused_recurrent_kda_kernel<__nv_bfloat16, false, 4, 128>;
    Kern kw = vf ? kn : recurrent_new::fused_recurrent_kda_kernel<__nv_bfloat16, false, 4, 128, 64>;
    Kern kc3 = recurrent_new::fused_recurrent_kv_column_kernel<__nv_bfloat16, 128, 3>;
    Kern kc2 = recurrent_new::fused_recurrent_kv_column_kernel<__nv_bfloat16, 128, 1>;
    const int nv = vf ? 3 : 6;
    const char* names[6] = {"old", "new", "old again", "new, 64 cols a CTA", "column/thread, 3/SM", "column/thread, no floor"};
    Kern ks[6] = {ko, kn, ko, kw, kc3, kc2};
    const int cols[6] = {32, 32, 32, vf ? 32 : 64, 128, 128};
    // agreement: old vs each new, functional
    std::vector<__nv_bfloat16> ho1(N * HV * V), ho2(N * HV * V); std::vector<float> hs1(S / 64), hs2(S / 64);
    for (int i = 0; i < nv; ++i) {
      FusedRecurrentParams pf = p; pf.o = i ? o2 : o1; pf.state_out = i ? s2 : s1;
      ks[i]<<<N * HV * (128 / cols[i]), 128>>>(pf); CK(cudaDeviceSynchronize());
      if (i) {
        CK(cudaMemcpy(ho1.data(), o1, ho1.size() * 2, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(ho2.data(), o2, ho2.size() * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(hs1.data(), s1, hs1.size() * 4, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(hs2.data(), s2, hs2.size() * 4, cudaMemcpyDeviceToHost));
        double mo = 0, ms = 0, ro = 0;
        for (size_t j = 0; j < ho1.size(); ++j) { double a = __bfloat162float(ho1[j]), b = __bfloat162float(ho2[j]); mo = std::max(mo, fabs(a - b)); ro = std::max(ro, fabs(a)); }
        for (size_t j = 0; j < hs1.size(); ++j) ms = std::max(ms, (double)fabs(hs1[j] - hs2[j]));
        printf("  %s vs old, %s: max|do| %.3g (max|o| %.3g), max|dS| %.3g (first 1/64 of states)\n", names[i], vf ? "[V,K]" : "[K,V]", mo, ro, ms);
      }
    }
    for (int i = 0; i < nv; ++i) {
      FusedRecurrentParams pf = p;
      float tf = time_it(ks[i], pf, nullptr, nullptr, bytes, cols[i]);
      FusedRecurrentParams pi = p; pi.state_out = s2; pi.state_in = s2; pi.out_by_slot = true;
      float ti = time_it(ks[i], pi, s2, s0, bytes, cols[i]);
      FusedRecurrentParams ps = pi; ps.slots = slots; ps.slots_int64 = false;
      float ts = time_it(ks[i], ps, s2, s0, bytes, cols[i]);
      printf("%s %-20s functional %.4f ms (%.2fx floor, %.2fx copy)  in place %.4f ms (%.2fx floor)  in place, slots %.4f ms (%.2fx floor)\n", vf ? "[V,K]" : "[K,V]", names[i], tf,
             tf / (2.0 * bytes / 3.35e9), tf / copy, ti, ti / (2.0 * bytes / 3.35e9), ts, ts / (2.0 * bytes / 3.35e9));
    }
  }
  return 0;
}

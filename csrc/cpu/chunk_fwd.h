// kda_ext CPU forward pipeline: per-chunk scratch and the stage sequence shared with the backward.
#pragma once

#include "cpu/common.h"
#include "cpu/gate.h"
#include "cpu/intra.h"
#include "cpu/output.h"
#include "cpu/state.h"
#include "cpu/wy.h"

namespace kda_ext {
namespace cpu {

// One thread's buffers for one chunk (row-major acc_t, BT rows; see each stage for its shape).
template <class T>
struct ChunkScratch {
  int64_t BT, K, V;
  std::vector<T> buf;
  T *qh, *kh, *v, *beta, *G;       // inputs: [BT,K] [BT,K] [BT,V] [BT] [BT,K]
  T *Aqk, *Akk, *Lkk;              // [BT,BT]
  T *w, *u, *qg, *kg, *vnew, *o;   // [BT,K] [BT,V] [BT,K] [BT,K] [BT,V] [BT,V]
  T* work;                         // stage scratch

  ChunkScratch(int64_t BT_, int64_t K_, int64_t V_) : BT(BT_), K(K_), V(V_) {
    const int64_t nwork = std::max(intra_work_size(BT, K), wy_work_size(BT, K, V));
    buf.assign(6 * BT * K + 4 * BT * V + BT + 3 * BT * BT + nwork, T(0));
    T* p = buf.data();
    auto take = [&p](int64_t n) {
      T* r = p;
      p += n;
      return r;
    };
    qh = take(BT * K);
    kh = take(BT * K);
    G = take(BT * K);
    w = take(BT * K);
    qg = take(BT * K);
    kg = take(BT * K);
    v = take(BT * V);
    u = take(BT * V);
    vnew = take(BT * V);
    o = take(BT * V);
    beta = take(BT);
    Aqk = take(BT * BT);
    Akk = take(BT * BT);
    Lkk = take(BT * BT);
    work = take(nwork);
  }
};

// gate -> intra -> wy for rows [r0, r0+L) of work item wi: fills qh, kh, v, beta, G, Aqk, Akk
// (rounded as stored), Lkk, w, u, qg, kg (rounded as stored). Exactly what the forward computes,
// so the backward can call it to recompute bit for bit.
template <class T>
void prepare_chunk(const Params& p, const WorkItem& wi, int64_t r0, int64_t L,
                   ChunkScratch<T>& s) {
  load_chunk_inputs(p, wi, r0, L, s.qh, s.kh, s.v, s.beta);
  gate_cumsum_chunk(p, wi, r0, L, s.G);
  intra_chunk(s.qh, s.kh, s.G, s.beta, L, p.BT, p.K, static_cast<T>(p.scale), p.safe_gate,
              p.qkv_dt, s.Aqk, s.Akk, s.Lkk, s.work);
  wy_chunk(s.Akk, s.qh, s.kh, s.v, s.beta, s.G, L, p.BT, p.K, p.V, p.qkv_dt, p.qkv_dt, s.w, s.u,
           s.qg, s.kg, s.work);
}

}  // namespace cpu
}  // namespace kda_ext

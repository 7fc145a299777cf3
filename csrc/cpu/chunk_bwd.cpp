// kda_ext CPU backend: chunk_kda_bwd (binding, recomputation, per-chunk gradients, reductions).
//
// Pipeline: (recompute g_cum, w, qg, kg, v_new, h with the forward when they were not saved) ->
// reverse state pass per (sequence, value head) [state_bwd.cpp] -> every chunk independently:
// output, WY [wy_bwd.cpp] and intra-chunk [intra_bwd.cpp] gradients, the reverse g cumsum and
// the gate / beta backward -> GVA sum + l2norm backward of dq, dk and fixed-order sums of the
// per-chunk dA_log / ddt_bias partials. No step accumulates across threads, so the result is
// deterministic and independent of the thread count.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/chunk_bwd.h"
#include "cpu/chunk_fwd.h"
#include "cpu/common.h"
#include "cpu/gate_bwd.h"
#include "cpu/intra_bwd.h"
#include "cpu/parallel.h"
#include "cpu/wy_bwd.h"

namespace kda_ext {
namespace cpu {
namespace {

// The per-chunk buffers of chunk_grads, carved from one scratch array. Built over a null base
// it only counts, so the size and the layout cannot drift apart.
template <class T>
struct ChunkBufs {
  T *q, *k, *G, *eG, *kb, *dqg, *dkg, *dw, *dkb, *dq, *dk, *dG, *intra_work;  // [BT, K] rows
  T *v, *vn, *dO, *dvn, *dv, *vnT;                                         // [BT, V] / [V, BT]
  T *beta, *dbeta, *dGamma;                                                // [BT], [BT], [K]
  T *S, *St, *dSt;                                                         // [K, V], [V, K]
  T *Akk, *dA, *dL, *wy_work;                                              // [BT, BT] ...
  int64_t size = 0;

  ChunkBufs(const Params& p, T* base) {
    const int64_t BT = p.BT, K = p.K, V = p.V;
    auto take = [&](int64_t n) {
      T* r = base ? base + size : nullptr;
      size += n;
      return r;
    };
    for (T** x : {&q, &k, &G, &eG, &kb, &dqg, &dkg, &dw, &dkb, &dq, &dk, &dG}) *x = take(BT * K);
    intra_work = take(6 * BT * K);
    for (T** x : {&v, &vn, &dO, &dvn, &dv, &vnT}) *x = take(BT * V);
    beta = take(BT);
    dbeta = take(BT);
    dGamma = take(K);
    for (T** x : {&S, &St, &dSt}) *x = take(K * V);
    for (T** x : {&Akk, &dA, &dL}) *x = take(BT * BT);
    wy_work = take(3 * BT * BT + BT * (K + V));
  }
};

// Every gradient of chunk job j except the inter-chunk state pass (already in bp.dh / bp.dvn).
template <class T>
void chunk_grads(const BwdParams<T>& bp, const ChunkJob& job, int64_t j, T* work) {
  const Params& p = bp.p;
  const int64_t BT = p.BT, K = p.K, V = p.V, HV = p.HV, KV = p.K * p.V;
  const int64_t n = job.n, hv = job.hv, h = hv / (p.HV / p.H);
  const SeqLayout& s = p.layout;
  const int64_t L = s.chunk_rows(n, job.c), r0 = s.bos[n] + job.c * BT;
  const int64_t slot = s.slot0[n] + job.c;
  const Dt dt = p.qkv_dt;
  const T scale = static_cast<T>(p.scale);
  const ChunkBufs<T> b(p, work);
  T *q = b.q, *k = b.k, *G = b.G, *eG = b.eG, *kb = b.kb, *dqg = b.dqg, *dkg = b.dkg, *dw = b.dw;
  T *dkb = b.dkb, *dq = b.dq, *dk = b.dk, *dG = b.dG, *intra_work = b.intra_work;
  T *v = b.v, *vn = b.vn, *dO = b.dO, *dvn = b.dvn, *dv = b.dv, *vnT = b.vnT;
  T *beta = b.beta, *dbeta = b.dbeta, *dGamma = b.dGamma, *S = b.S, *St = b.St, *dSt = b.dSt;
  T *Akk = b.Akk, *dA = b.dA, *dL = b.dL, *wy_work = b.wy_work;

  const int64_t rowK = (r0 * HV + hv) * K, rowV = (r0 * HV + hv) * V;
  load_chunk_inputs(p, WorkItem{n, hv, h}, r0, L, q, k, v, beta);
  load_rows(elem_ptr(bp.v_new, dt, rowV), dt, HV * V, L, V, vn, V);
  load_rows(elem_ptr(bp.dout, bp.dout_dt, rowV), bp.dout_dt, HV * V, L, V, dO, V);
  for (int64_t i = 0; i < L; ++i) {
    std::copy(bp.g_cum + rowK + i * HV * K, bp.g_cum + rowK + i * HV * K + K, G + i * K);
    std::copy(bp.dvn + rowV + i * HV * V, bp.dvn + rowV + i * HV * V + V, dvn + i * V);
  }
  load_rows(elem_ptr(bp.Akk, dt, (r0 * HV + hv) * BT), dt, HV * BT, L, L, Akk, BT);
  for (int64_t i = 0; i < L; ++i) std::fill(Akk + i * BT + i + 1, Akk + i * BT + L, T(0));
  state_load(elem_ptr(bp.h, dt, (slot * HV + hv) * KV), dt, p.state_v_first, K, V, S);
  const T* dSp = bp.dh + (slot * HV + hv) * KV;  // dLoss/d(state leaving the chunk)

  // The A B^T products below run as A (B^T) on explicit transposes (row-update form).
  for (int64_t a = 0; a < K; ++a)
    for (int64_t b = 0; b < V; ++b) {
      St[b * K + a] = S[a * V + b];
      dSt[b * K + a] = dSp[a * V + b];
    }
  for (int64_t i = 0; i < L; ++i)
    for (int64_t b = 0; b < V; ++b) vnT[b * BT + i] = vn[i * V + b];

  // o = scale qg S + Aqk v_new, v_new = u - w S, S' = e^{G_last} S + kg^T v_new.
  std::fill(dA, dA + L * BT, T(0));
  gemm_nn(L, L, V, dO, V, vnT, BT, dA, BT, scale);  // dAqk, already times scale
  for (int64_t i = 0; i < L; ++i) std::fill(dA + i * BT + i + 1, dA + i * BT + L, T(0));
  for (T* x : {dqg, dkg, dw}) std::fill(x, x + L * K, T(0));
  gemm_nn(L, K, V, dO, V, St, K, dqg, K, scale);
  gemm_nn(L, K, V, vn, V, dSt, K, dkg, K);
  gemm_nn(L, K, V, dvn, V, St, K, dw, K, T(-1));

  const T* Gl = G + (L - 1) * K;
  for (int64_t a = 0; a < K; ++a) {
    T acc = T(0);
    for (int64_t b = 0; b < V; ++b) acc += S[a * V + b] * dSp[a * V + b];
    dGamma[a] = std::exp(Gl[a]) * acc;
  }
#pragma omp simd
  for (int64_t x = 0; x < L * K; ++x) eG[x] = exp_vec(G[x]);
  for (int64_t i = 0; i < L; ++i)
    for (int64_t c = 0; c < K; ++c) kb[i * K + c] = beta[i] * k[i * K + c] * eG[i * K + c];

  std::fill(dbeta, dbeta + L, T(0));
  wy_bwd_chunk(L, K, V, Akk, BT, dvn, dw, v, kb, beta, dv, dkb, dL, dbeta, wy_work);

  // qg = q e^G, kg = k e^{G_last - G}, kb = beta k e^G; dGamma (dLoss/dG_last) so far holds the
  // S' = e^{G_last} S term.
  for (int64_t i = 0; i < L; ++i) {
    T db = T(0);
#pragma omp simd reduction(+ : db)
    for (int64_t c = 0; c < K; ++c) {
      const int64_t x = i * K + c;
      const T el = exp_vec(Gl[c] - G[x]);
      const T dkg_kg = dkg[x] * k[x] * el;
      dq[x] = dqg[x] * eG[x];
      dk[x] = beta[i] * eG[x] * dkb[x] + dkg[x] * el;
      dG[x] = dqg[x] * q[x] * eG[x] + dkb[x] * kb[x] - dkg_kg;
      dGamma[c] += dkg_kg;  // kg also depends on G_last
      db += dkb[x] * k[x] * eG[x];
    }
    dbeta[i] += db;
  }
  for (int64_t c = 0; c < K; ++c) dG[(L - 1) * K + c] += dGamma[c];

  intra_bwd_chunk(L, K, q, k, beta, G, dA, dL, BT, dq, dk, dG, dbeta, intra_work);

  // g_cum is the inclusive cumsum of the per-step gate: its gradient is the reverse cumsum.
  for (int64_t i = L - 2; i >= 0; --i)
    for (int64_t c = 0; c < K; ++c) dG[i * K + c] += dG[(i + 1) * K + c];

  if (p.use_gate_in_kernel) {
    const bool has_A = p.A_log != nullptr;
    const T A_log = has_A ? read_scalar<T>(p.A_log, p.A_log_dt, hv) : T(0);
    const T lb = static_cast<T>(p.lower_bound);
    T dA_acc = T(0);
    T* dbias = bp.dbias_part + j * K;
    std::fill(dbias, dbias + K, T(0));
    for (int64_t i = 0; i < L; ++i) {
      const int64_t base = ((r0 + i) * HV + hv) * K;
      for (int64_t c = 0; c < K; ++c) {
        T x = read_scalar<T>(p.g, p.g_dt, base + c);
        if (p.dt_bias) x += read_scalar<T>(p.dt_bias, p.dt_bias_dt, hv * K + c);
        const T dx = gate_bwd_elem(x, dG[i * K + c], p.has_lower_bound, lb, has_A, A_log, &dA_acc);
        dG[i * K + c] = dx;
        dbias[c] += dx;
      }
    }
    bp.dA_part[j] = dA_acc;
  }
  store_rows(dG, K, L, K, elem_ptr(bp.dg, p.g_dt, rowK), p.g_dt, HV * K);
  store_rows(dv, V, L, V, elem_ptr(bp.dv, dt, rowV), dt, HV * V);
  for (int64_t i = 0; i < L; ++i) {
    const int64_t idx = (r0 + i) * HV + hv;
    T db = dbeta[i];
    if (p.use_beta_sigmoid)
      db = beta_sigmoid_bwd(read_scalar<T>(p.beta, p.beta_dt, idx), db,
                            p.allow_neg_eigval ? T(2) : T(1));
    store_rows(&db, 1, 1, 1, elem_ptr(bp.dbeta, p.beta_dt, idx), p.beta_dt, 1);
    std::copy(dq + i * K, dq + i * K + K, bp.dq_hv + rowK + i * HV * K);
    std::copy(dk + i * K, dk + i * K + K, bp.dk_hv + rowK + i * HV * K);
  }
}

// The forward's gate -> wy -> state stages for work item it, with the saved Akk, writing g_cum,
// w, qg, kg, v_new and h as a save_intermediates forward would have saved them.
template <class T>
void recompute_item(const Params& p, int64_t it, const void* Akk, T* g_cum, void* w, void* qg,
                    void* kg, void* v_new, void* h, ChunkScratch<T>& s, std::vector<T>& S) {
  const WorkItem wi = work_item(it, p.H, p.HV);
  const int64_t BT = p.BT, K = p.K, V = p.V, HV = p.HV, KV = p.K * p.V;
  const Dt dt = p.qkv_dt, sdt = sizeof(T) == 8 ? Dt::Double : Dt::Float;
  const SeqLayout& L_ = p.layout;
  if (p.h0)
    state_load(elem_ptr(p.h0, sdt, (wi.n * HV + wi.hv) * KV), sdt, p.state_v_first, K, V,
               S.data());
  else
    std::fill(S.begin(), S.end(), T(0));
  for (int64_t c = 0; c < L_.num_chunks(wi.n); ++c) {
    const int64_t L = L_.chunk_rows(wi.n, c), r0 = L_.bos[wi.n] + c * BT;
    const int64_t slot = L_.slot0[wi.n] + c;
    const int64_t rowK = (r0 * HV + wi.hv) * K, rowV = (r0 * HV + wi.hv) * V;
    load_chunk_inputs(p, wi, r0, L, s.qh, s.kh, s.v, s.beta);
    gate_cumsum_chunk(p, wi, r0, L, s.G);
    std::fill(s.Akk, s.Akk + BT * BT, T(0));
    load_rows(elem_ptr(Akk, dt, (r0 * HV + wi.hv) * BT), dt, HV * BT, L, L, s.Akk, BT);
    wy_chunk(s.Akk, s.qh, s.kh, s.v, s.beta, s.G, L, BT, K, V, dt, dt, s.w, s.u, s.qg, s.kg,
             s.work);
    state_store(S.data(), K, V, p.state_v_first, elem_ptr(h, dt, (slot * HV + wi.hv) * KV), dt);
    state_vnew(s.w, s.u, S.data(), L, BT, K, V, dt, s.vnew);
    state_advance(s.kg, s.vnew, s.G + (L - 1) * K, L, K, V, S.data());
    store_rows_typed(s.G, K, L, K, g_cum + rowK, HV * K);
    store_rows(s.w, K, L, K, elem_ptr(w, dt, rowK), dt, HV * K);
    store_rows(s.qg, K, L, K, elem_ptr(qg, dt, rowK), dt, HV * K);
    store_rows(s.kg, K, L, K, elem_ptr(kg, dt, rowK), dt, HV * K);
    store_rows(s.vnew, V, L, V, elem_ptr(v_new, dt, rowV), dt, HV * V);
  }
}

// dq / dk of the q/k heads: the fixed-order sum over each head's value heads, then the l2norm
// backward; written in the storage dtype.
template <class T>
void reduce_qk(const Params& p, const T* d_hv, const void* x, void* dx) {
  const int64_t G = p.HV / p.H, K = p.K, rows = p.B * p.T;
  parallel_for_flush_denormals(0, rows, 16, [&](int64_t r_begin, int64_t r_end) {
    std::vector<T> acc(K), raw(K);
    for (int64_t r = r_begin; r < r_end; ++r)
      for (int64_t h = 0; h < p.H; ++h) {
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t gi = 0; gi < G; ++gi) {
          const T* src = d_hv + (r * p.HV + h * G + gi) * K;
          for (int64_t c = 0; c < K; ++c) acc[c] += src[c];
        }
        if (p.use_qk_l2norm) {
          load_rows(elem_ptr(x, p.qkv_dt, (r * p.H + h) * K), p.qkv_dt, K, 1, K, raw.data(), K);
          l2norm_bwd_row(raw.data(), acc.data(), K);
        }
        store_rows(acc.data(), K, 1, K, elem_ptr(dx, p.qkv_dt, (r * p.H + h) * K), p.qkv_dt, K);
      }
  });
}

template <class T>
void run_backward(BwdParams<T>& bp, const std::vector<ChunkJob>& jobs) {
  const Params& p = bp.p;
  const int64_t items = p.N * p.HV;
  parallel_for_flush_denormals(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> work(state_bwd_work_size(p));
    for (int64_t it = begin; it < end; ++it) {
      const WorkItem wi = work_item(it, p.H, p.HV);
      state_bwd_item(bp, wi.n, wi.hv, work.data());
    }
  });
  const int64_t njobs = static_cast<int64_t>(jobs.size());
  parallel_for_flush_denormals(0, njobs, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> work(ChunkBufs<T>(p, nullptr).size);
    for (int64_t j = begin; j < end; ++j) chunk_grads(bp, jobs[j], j, work.data());
  });
}

using OptT = std::optional<at::Tensor>;
using BwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                          at::Tensor, at::Tensor>;

BwdOut chunk_kda_bwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                         const at::Tensor& g_in, const at::Tensor& beta_in, double scale,
                         const OptT& initial_state, const OptT& A_log_in, const OptT& dt_bias_in,
                         const OptT& cu_seqlens, const at::Tensor& Aqk_in,
                         const at::Tensor& Akk_in, const OptT& g_cum_in, const OptT& w_in,
                         const OptT& u_in, const OptT& qg_in, const OptT& kg_in,
                         const OptT& v_new_in, const OptT& h_in, const at::Tensor& do_in,
                         const OptT& dht_in, bool use_qk_l2norm, bool use_gate_in_kernel,
                         bool use_beta_sigmoid, bool allow_neg_eigval, bool safe_gate,
                         std::optional<double> lower_bound, bool state_v_first,
                         int64_t chunk_size) {
  const KdaDims d = check_chunk_kda_args(q_in, k_in, v_in, g_in, beta_in, initial_state,
                                         A_log_in, dt_bias_in, cu_seqlens, use_gate_in_kernel,
                                         lower_bound, state_v_first, chunk_size);
  const auto sdt = compute_dtype(q_in);
  const auto qdt = q_in.scalar_type();
  check_like(Aqk_in, "Aqk", {d.B, d.T, d.HV, d.BT}, qdt, q_in);
  check_like(Akk_in, "Akk", {d.B, d.T, d.HV, d.BT}, qdt, q_in);
  TORCH_CHECK(do_in.sizes() == v_in.sizes(), "kda_ext: do must have o's shape ", v_in.sizes(),
              ", got ", do_in.sizes());
  TORCH_CHECK(is_float_dtype(do_in.scalar_type()), "kda_ext: do must be a float tensor, got ",
              do_in.scalar_type());
  const int64_t sr = state_v_first ? d.V : d.K, sc = state_v_first ? d.K : d.V;
  if (dht_in.has_value()) check_like(*dht_in, "dht", {d.N, d.HV, sr, sc}, sdt, q_in);
  const int given = g_cum_in.has_value() + w_in.has_value() + u_in.has_value() +
                    qg_in.has_value() + kg_in.has_value() + v_new_in.has_value() +
                    h_in.has_value();
  TORCH_CHECK(given == 0 || given == 7,
              "kda_ext: g_cum, w, u, qg, kg, v_new and h must be given together or not at all, "
              "got ", given, " of 7");

  const bool gate_in = use_gate_in_kernel;
  const OptT A_log = gate_in ? A_log_in : std::nullopt;
  const OptT dt_bias = gate_in ? dt_bias_in : std::nullopt;
  // The forward's binding: contiguous inputs, validated offsets, and the Params pointing into them.
  const BoundInputs bound = bind_inputs(d, q_in, k_in, v_in, g_in, beta_in, scale, initial_state,
                                        A_log_in, dt_bias_in, cu_seqlens, use_qk_l2norm,
                                        use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval,
                                        safe_gate, lower_bound, state_v_first);
  const Params& p = bound.p;
  const at::Tensor &q = bound.q, &k = bound.k, &v = bound.v, &g = bound.g, &beta = bound.beta;
  auto Aqk = Aqk_in.contiguous(), Akk = Akk_in.contiguous(), dout = do_in.contiguous();
  at::Tensor dht = dht_in ? dht_in->contiguous() : at::Tensor();

  at::Tensor g_cum, w, qg, kg, v_new, h;
  if (given == 7) {
    check_like(*g_cum_in, "g_cum", {d.B, d.T, d.HV, d.K}, sdt, q_in);
    check_like(*w_in, "w", {d.B, d.T, d.HV, d.K}, qdt, q_in);
    check_like(*qg_in, "qg", {d.B, d.T, d.HV, d.K}, qdt, q_in);
    check_like(*kg_in, "kg", {d.B, d.T, d.HV, d.K}, qdt, q_in);
    check_like(*u_in, "u", {d.B, d.T, d.HV, d.V}, qdt, q_in);
    check_like(*v_new_in, "v_new", {d.B, d.T, d.HV, d.V}, qdt, q_in);
    check_like(*h_in, "h", {d.B, d.NT, d.HV, sr, sc}, qdt, q_in);
    g_cum = g_cum_in->contiguous();
    w = w_in->contiguous();
    qg = qg_in->contiguous();
    kg = kg_in->contiguous();
    v_new = v_new_in->contiguous();
    h = h_in->contiguous();
  } else {
    // Recomputed below by the forward's own stages, into tensors shaped as the saved ones.
    const auto qo = q.options();
    g_cum = at::empty({d.B, d.T, d.HV, d.K}, qo.dtype(sdt));
    w = at::empty({d.B, d.T, d.HV, d.K}, qo);
    qg = at::empty({d.B, d.T, d.HV, d.K}, qo);
    kg = at::empty({d.B, d.T, d.HV, d.K}, qo);
    v_new = at::empty({d.B, d.T, d.HV, d.V}, qo);
    h = at::zeros({d.B, d.NT, d.HV, sr, sc}, qo);
  }

  std::vector<ChunkJob> jobs;
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t hv = 0; hv < p.HV; ++hv)
      for (int64_t c = 0; c < p.layout.num_chunks(n); ++c) jobs.push_back({n, hv, c});

  const auto fopt = q.options().dtype(sdt);
  auto dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  auto dg = at::zeros_like(g), dbeta = at::zeros_like(beta);
  auto dh_ws = at::empty({d.B * d.NT, d.HV, d.K, d.V}, fopt);
  auto dvn_ws = at::empty({d.B * d.T, d.HV, d.V}, fopt);
  auto dh0_ws = at::empty({d.N, d.HV, d.K, d.V}, fopt);
  auto dq_hv = at::zeros({d.B * d.T, d.HV, d.K}, fopt);
  auto dk_hv = at::zeros({d.B * d.T, d.HV, d.K}, fopt);
  const int64_t njobs = static_cast<int64_t>(jobs.size());
  auto dA_part = at::zeros({njobs}, fopt);
  auto dbias_part = at::zeros({njobs, d.K}, fopt);

  AT_DISPATCH_FLOATING_TYPES(sdt, "chunk_kda_bwd_cpu", [&] {
    using T = scalar_t;
    BwdParams<T> bp{};
    bp.p = p;
    bp.Aqk = Aqk.data_ptr();
    bp.Akk = Akk.data_ptr();
    bp.g_cum = g_cum.data_ptr<T>();
    bp.w = w.data_ptr();
    bp.qg = qg.data_ptr();
    bp.kg = kg.data_ptr();
    bp.v_new = v_new.data_ptr();
    bp.h = h.data_ptr();
    bp.dout = dout.data_ptr();
    bp.dout_dt = to_dt(dout.scalar_type());
    bp.dht = dht.defined() ? dht.data_ptr<T>() : nullptr;
    bp.dh = dh_ws.data_ptr<T>();
    bp.dvn = dvn_ws.data_ptr<T>();
    bp.dh0 = dh0_ws.data_ptr<T>();
    bp.dq_hv = dq_hv.data_ptr<T>();
    bp.dk_hv = dk_hv.data_ptr<T>();
    bp.dv = dv.data_ptr();
    bp.dg = dg.data_ptr();
    bp.dbeta = dbeta.data_ptr();
    bp.dA_part = dA_part.data_ptr<T>();
    bp.dbias_part = dbias_part.data_ptr<T>();
    if (given == 0) {
      parallel_for_flush_denormals(0, p.N * p.HV, 1, [&](int64_t begin, int64_t end) {
        ChunkScratch<T> s(p.BT, p.K, p.V);
        std::vector<T> S(p.K * p.V);
        for (int64_t it = begin; it < end; ++it)
          recompute_item(p, it, bp.Akk, g_cum.data_ptr<T>(), w.data_ptr(), qg.data_ptr(),
                         kg.data_ptr(), v_new.data_ptr(), h.data_ptr(), s, S);
      });
    }
    run_backward(bp, jobs);
    reduce_qk(p, bp.dq_hv, p.q, dq.data_ptr());
    reduce_qk(p, bp.dk_hv, p.k, dk.data_ptr());
  });

  // dA_log / ddt_bias: per value head, the chunk partials summed in job order (deterministic).
  at::Tensor dA_log, ddt_bias;
  auto dA_acc = at::zeros({d.HV}, fopt.dtype(at::kDouble));
  auto dbias_acc = at::zeros({d.HV, d.K}, fopt.dtype(at::kDouble));
  if (A_log || dt_bias) {
    auto part_A = dA_part.to(at::kDouble), part_b = dbias_part.to(at::kDouble);
    const double* pa = part_A.data_ptr<double>();
    const double* pb = part_b.data_ptr<double>();
    double* ra = dA_acc.data_ptr<double>();
    double* rb = dbias_acc.data_ptr<double>();
    for (int64_t j = 0; j < njobs; ++j) {
      const int64_t hv = jobs[j].hv;
      ra[hv] += pa[j];
      for (int64_t c = 0; c < d.K; ++c) rb[hv * d.K + c] += pb[j * d.K + c];
    }
  }
  if (A_log) {
    dA_log = dA_acc.to(bound.A_log.scalar_type()).view(A_log_in->sizes());
  } else {
    dA_log = q.new_empty({0}, A_log_in ? A_log_in->scalar_type() : sdt);
  }
  if (dt_bias) {
    ddt_bias = dbias_acc.to(bound.dt_bias.scalar_type()).view(dt_bias_in->sizes());
  } else {
    ddt_bias = q.new_empty({0}, dt_bias_in ? dt_bias_in->scalar_type() : sdt);
  }
  at::Tensor dh0;
  if (initial_state) {
    dh0 = state_v_first ? dh0_ws.transpose(2, 3).contiguous() : dh0_ws;
    dh0 = dh0.to(initial_state->scalar_type());
  } else {
    dh0 = q.new_empty({0}, sdt);
  }
  return {dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dh0};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(kda_ext, CPU, m) { m.impl("chunk_kda_bwd", &cpu::chunk_kda_bwd_cpu); }

}  // namespace kda_ext

// kda_ext CPU backend: shared layout, parameters, scalar and dense-matmul helpers of every stage.
//
// Everything above the "binding layer" section is ATen-free: stages see raw pointers, sizes and a
// storage-dtype tag. Per-chunk buffers are row-major acc_t arrays (acc_t = float, or double for
// float64 inputs); a chunk has BT rows of which the first L are valid.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace kda_ext {
namespace cpu {

constexpr int64_t kBC = 16;  // sub-chunk rows (the 16x16 blocks of Aqk / Lkk)

// Storage dtype of a tensor, resolved once in the binding so that stages need no ATen.
enum class Dt : int8_t { Half, BFloat16, Float, Double };

// ---------------------------------------------------------------------------------------------
// Sequence / chunk layout.
//
// Rows live in the flattened [B*T] row space, chunk slots in the flattened [B*NT] slot space:
// without cu_seqlens sequence n is batch n (rows n*T .. n*T+T, slots from n*NT); with cu_seqlens
// (B == 1) sequence n is rows cu[n] .. cu[n+1] and its chunks start at slot
// sum_{m<n} ceil(len_m / BT) (docs/design.md).
struct SeqLayout {
  int64_t N = 0, BT = 0;
  std::vector<int64_t> bos, eos, slot0;

  int64_t len(int64_t n) const { return eos[n] - bos[n]; }
  int64_t num_chunks(int64_t n) const { return (len(n) + BT - 1) / BT; }
  // Valid rows of chunk c of sequence n (BT except maybe the last).
  int64_t chunk_rows(int64_t n, int64_t c) const { return std::min(BT, len(n) - c * BT); }
};

// cu == nullptr: fixed length (N = B sequences of T rows). cu must already be validated.
inline SeqLayout make_seq_layout(int64_t B, int64_t T, int64_t BT, int64_t NT, const int64_t* cu,
                                 int64_t N) {
  SeqLayout s;
  s.BT = BT;
  s.N = cu ? N : B;
  s.bos.resize(s.N);
  s.eos.resize(s.N);
  s.slot0.resize(s.N);
  int64_t slot = 0;
  for (int64_t n = 0; n < s.N; ++n) {
    s.bos[n] = cu ? cu[n] : n * T;
    s.eos[n] = cu ? cu[n + 1] : (n + 1) * T;
    s.slot0[n] = cu ? slot : n * NT;
    slot += (s.eos[n] - s.bos[n] + BT - 1) / BT;
  }
  return s;
}

// One unit of parallel work: sequence n at value head hv (which reads q/k head h).
struct WorkItem {
  int64_t n, hv, h;
};

inline WorkItem work_item(int64_t index, int64_t H, int64_t HV) {
  WorkItem w;
  w.n = index / HV;
  w.hv = index % HV;
  w.h = w.hv / (HV / H);
  return w;
}

// ---------------------------------------------------------------------------------------------
// Everything one chunk_kda call needs, ATen-free. Tensors are contiguous; pointers that were None
// are nullptr. Row r (flattened [B*T]) of head x of a [B,T,X,D] tensor starts at (r*X + x)*D.
struct Params {
  int64_t B, T, H, HV, K, V, N, BT, NT;
  const void* q;
  const void* k;
  const void* v;
  Dt qkv_dt;  // q, k, v share a dtype; it is also the storage dtype of Aqk/Akk/w/qg/kg/h/u/v_new
  const void* g;
  Dt g_dt;
  const void* beta;
  Dt beta_dt;
  const void* A_log;    // HV elements or nullptr
  const void* dt_bias;  // HV*K elements or nullptr
  Dt A_log_dt, dt_bias_dt;
  const void* h0;  // [N,HV,K,V] (or [N,HV,V,K]) in the compute dtype, or nullptr
  double scale;
  bool use_qk_l2norm, use_gate_in_kernel, use_beta_sigmoid, allow_neg_eigval, safe_gate;
  bool has_lower_bound;
  double lower_bound;
  bool state_v_first;
  SeqLayout layout;
};

inline int64_t elem_size(Dt dt) {
  return dt == Dt::Double ? 8 : (dt == Dt::Float ? 4 : 2);
}

// p + n elements of dtype dt.
inline const void* elem_ptr(const void* p, Dt dt, int64_t n) {
  return static_cast<const char*>(p) + n * elem_size(dt);
}
inline void* elem_ptr(void* p, Dt dt, int64_t n) {
  return static_cast<char*>(p) + n * elem_size(dt);
}

// ---------------------------------------------------------------------------------------------
// Scalars.
template <class T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Softplus with the threshold of the reference kernels (x > 20 returns x).
template <class T>
inline T softplus(T x) {
  return x > T(20) ? x : std::log1p(std::exp(x));
}

template <class T>
inline T read_scalar(const void* p, Dt dt, int64_t i) {
  switch (dt) {
    case Dt::Half: return static_cast<T>(static_cast<float>(static_cast<const c10::Half*>(p)[i]));
    case Dt::BFloat16:
      return static_cast<T>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]));
    case Dt::Float: return static_cast<T>(static_cast<const float*>(p)[i]);
    case Dt::Double: return static_cast<T>(static_cast<const double*>(p)[i]);
  }
  return T(0);
}

// x rounded to storage dtype dt and back (what a consumer of the stored tensor will read).
template <class T>
inline T round_to(T x, Dt dt) {
  switch (dt) {
    case Dt::Half: return static_cast<T>(static_cast<float>(c10::Half(static_cast<float>(x))));
    case Dt::BFloat16:
      return static_cast<T>(static_cast<float>(c10::BFloat16(static_cast<float>(x))));
    case Dt::Float: return static_cast<T>(static_cast<float>(x));
    case Dt::Double: return x;
  }
  return x;
}

template <class T>
inline void round_inplace(T* x, int64_t n, Dt dt) {
  if (dt == Dt::Double || (dt == Dt::Float && sizeof(T) == sizeof(float))) return;
  for (int64_t i = 0; i < n; ++i) x[i] = round_to(x[i], dt);
}

// ---------------------------------------------------------------------------------------------
// exp that the compiler can vectorise (no libm call, no floating-point compare: under the default
// -ftrapping-math GCC will not if-convert those): Cephes-style range reduction to |r| <= ln2/2 and a
// degree-6 polynomial, ~1 ulp in fp32. Results below 2^-126 (x < ~-87.3, also -inf) are 0; x must
// be < 88 (the stages only pass gate differences, <= ~60).
inline float exp_vec(float x) {
  // Round to nearest through the 1.5*2^23 shifter: SSE2 has no round instruction.
  const float fn = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  int32_t n = static_cast<int32_t>(fn);
  const int32_t keep = -static_cast<int32_t>(n > -127);  // all ones or zero
  n = n > -126 ? n : -126;
  n = n < 127 ? n : 127;
  const float scaled = y * __builtin_bit_cast(float, (n + 127) << 23);
  return __builtin_bit_cast(float, __builtin_bit_cast(int32_t, scaled) & keep);
}

inline double exp_vec(double x) { return std::exp(x); }

// ---------------------------------------------------------------------------------------------
// Strided row copies between storage tensors and acc_t buffers. `src_stride`/`dst_stride` are in
// elements between consecutive rows; `ld` is the acc_t buffer's row stride.
template <class T, class S>
inline void load_rows_typed(const S* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst,
                            int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      dst[r * ld + c] = static_cast<T>(static_cast<float>(src[r * src_stride + c]));
}

template <class T>
inline void load_rows(const void* src, Dt dt, int64_t src_stride, int64_t rows, int64_t cols,
                      T* dst, int64_t ld) {
  switch (dt) {
    case Dt::Half:
      load_rows_typed(static_cast<const c10::Half*>(src), src_stride, rows, cols, dst, ld);
      break;
    case Dt::BFloat16:
      load_rows_typed(static_cast<const c10::BFloat16*>(src), src_stride, rows, cols, dst, ld);
      break;
    case Dt::Float:
      load_rows_typed(static_cast<const float*>(src), src_stride, rows, cols, dst, ld);
      break;
    case Dt::Double:  // no detour through float
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          dst[r * ld + c] = static_cast<T>(static_cast<const double*>(src)[r * src_stride + c]);
      break;
  }
}

template <class S, class T>
inline void store_rows_typed(const T* src, int64_t ld, int64_t rows, int64_t cols, S* dst,
                             int64_t dst_stride) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * dst_stride + c] = static_cast<S>(src[r * ld + c]);
}

template <class T>
inline void store_rows(const T* src, int64_t ld, int64_t rows, int64_t cols, void* dst, Dt dt,
                       int64_t dst_stride) {
  switch (dt) {
    case Dt::Half:
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          static_cast<c10::Half*>(dst)[r * dst_stride + c] =
              c10::Half(static_cast<float>(src[r * ld + c]));
      break;
    case Dt::BFloat16:
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          static_cast<c10::BFloat16*>(dst)[r * dst_stride + c] =
              c10::BFloat16(static_cast<float>(src[r * ld + c]));
      break;
    case Dt::Float:
      store_rows_typed(src, ld, rows, cols, static_cast<float*>(dst), dst_stride);
      break;
    case Dt::Double:
      store_rows_typed(src, ld, rows, cols, static_cast<double*>(dst), dst_stride);
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// Small dense matmuls on row-major acc_t pointers with leading dimensions; C is accumulated into
// (C += alpha * op(A) op(B)). The innermost loop always runs over a contiguous row of B and C so
// that -O3 vectorises it; four rows of C share each loaded row of B.

// C[M,N] += alpha * A B[P,N] with A(i, p) = A[i * a_row + p * a_col]: gemm_nn and gemm_tn below
// differ only in A's strides.
template <class T>
inline void gemm_strided_a(int64_t M, int64_t N, int64_t P, const T* A, int64_t a_row,
                           int64_t a_col, const T* B, int64_t ldb, T* C, int64_t ldc, T alpha) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) {
    T* c0 = C + i * ldc;
    T* c1 = c0 + ldc;
    T* c2 = c1 + ldc;
    T* c3 = c2 + ldc;
    for (int64_t p = 0; p < P; ++p) {
      const T* a = A + i * a_row + p * a_col;
      const T a0 = alpha * a[0], a1 = alpha * a[a_row], a2 = alpha * a[2 * a_row],
              a3 = alpha * a[3 * a_row];
      const T* b = B + p * ldb;
      for (int64_t j = 0; j < N; ++j) {
        const T bj = b[j];
        c0[j] += a0 * bj;
        c1[j] += a1 * bj;
        c2[j] += a2 * bj;
        c3[j] += a3 * bj;
      }
    }
  }
  for (; i < M; ++i) {
    T* c = C + i * ldc;
    for (int64_t p = 0; p < P; ++p) {
      const T a = alpha * A[i * a_row + p * a_col];
      const T* b = B + p * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// C[M,N] += alpha * A[M,P] B[P,N]
template <class T>
inline void gemm_nn(int64_t M, int64_t N, int64_t P, const T* A, int64_t lda, const T* B,
                    int64_t ldb, T* C, int64_t ldc, T alpha = T(1)) {
  gemm_strided_a(M, N, P, A, lda, int64_t(1), B, ldb, C, ldc, alpha);
}

// C[M,N] += alpha * A[P,M]^T B[P,N]
template <class T>
inline void gemm_tn(int64_t M, int64_t N, int64_t P, const T* A, int64_t lda, const T* B,
                    int64_t ldb, T* C, int64_t ldc, T alpha = T(1)) {
  gemm_strided_a(M, N, P, A, int64_t(1), lda, B, ldb, C, ldc, alpha);
}

// C[M,N] += alpha * A[M,P] B[N,P]^T (dot products of rows; the reduction is vectorised through
// `omp simd`, which permits reassociation without -ffast-math).
template <class T>
inline void gemm_nt(int64_t M, int64_t N, int64_t P, const T* A, int64_t lda, const T* B,
                    int64_t ldb, T* C, int64_t ldc, T alpha = T(1)) {
  for (int64_t i = 0; i < M; ++i) {
    const T* a = A + i * lda;
    for (int64_t j = 0; j < N; ++j) {
      const T* b = B + j * ldb;
      T s = T(0);
#pragma omp simd reduction(+ : s)
      for (int64_t p = 0; p < P; ++p) s += a[p] * b[p];
      C[i * ldc + j] += alpha * s;
    }
  }
}

// C[M,N] += alpha * A[M,M] B[M,N] with A lower triangular (entries above the diagonal are never
// read, so they may hold anything).
template <class T>
inline void trmm_lower_nn(int64_t M, int64_t N, const T* A, int64_t lda, const T* B, int64_t ldb,
                          T* C, int64_t ldc, T alpha = T(1)) {
  for (int64_t i0 = 0; i0 < M; i0 += 4) {
    const int64_t mb = std::min<int64_t>(4, M - i0);
    // Rows i0..i0+mb share B rows 0..i0 (full), then the small triangle.
    gemm_nn(mb, N, i0, A + i0 * lda, lda, B, ldb, C + i0 * ldc, ldc, alpha);
    for (int64_t i = i0; i < i0 + mb; ++i)
      gemm_nn(int64_t(1), N, i - i0 + 1, A + i * lda + i0, lda, B + i0 * ldb, ldb, C + i * ldc,
              ldc, alpha);
  }
}

}  // namespace cpu
}  // namespace kda_ext

// =============================================================================================
// Binding layer (ATen): shared by the forward and backward ops to turn their arguments into
// Params. Stages never include anything below this line's dependencies directly.
#include <ATen/ATen.h>

#include <optional>

#include "checks.h"

namespace kda_ext {
namespace cpu {

inline Dt to_dt(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return Dt::Half;
    case at::kBFloat16: return Dt::BFloat16;
    case at::kFloat: return Dt::Float;
    case at::kDouble: return Dt::Double;
    default: TORCH_CHECK(false, "kda_ext: unsupported dtype ", t);
  }
}

// cu_seqlens as int64 offsets, checked: starts at 0, non-decreasing, ends at T.
inline std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu_seqlens, int64_t T) {
  const at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* p = cu.data_ptr<int64_t>();
  std::vector<int64_t> out(p, p + cu.numel());
  TORCH_CHECK(out.front() == 0, "kda_ext: cu_seqlens must start at 0, got ", out.front());
  TORCH_CHECK(out.back() == T, "kda_ext: cu_seqlens must end at T=", T, ", got ", out.back());
  for (size_t i = 1; i < out.size(); ++i)
    TORCH_CHECK(out[i] >= out[i - 1], "kda_ext: cu_seqlens must be non-decreasing, got ",
                out[i - 1], " then ", out[i], " at index ", i);
  return out;
}

// Contiguous inputs kept alive for the duration of a call, and the Params that point into them.
struct BoundInputs {
  at::Tensor q, k, v, g, beta, h0, A_log, dt_bias;
  std::vector<int64_t> cu;
  Params p;
};

inline BoundInputs bind_inputs(const KdaDims& d, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& g, const at::Tensor& beta,
                               double scale, const std::optional<at::Tensor>& initial_state,
                               const std::optional<at::Tensor>& A_log,
                               const std::optional<at::Tensor>& dt_bias,
                               const std::optional<at::Tensor>& cu_seqlens, bool use_qk_l2norm,
                               bool use_gate_in_kernel, bool use_beta_sigmoid,
                               bool allow_neg_eigval, bool safe_gate,
                               std::optional<double> lower_bound, bool state_v_first) {
  BoundInputs b;
  b.q = q.contiguous();
  b.k = k.contiguous();
  b.v = v.contiguous();
  b.g = g.contiguous();
  b.beta = beta.contiguous();
  Params& p = b.p;
  p.B = d.B;
  p.T = d.T;
  p.H = d.H;
  p.HV = d.HV;
  p.K = d.K;
  p.V = d.V;
  p.N = d.N;
  p.BT = d.BT;
  p.NT = d.NT;
  p.q = b.q.data_ptr();
  p.k = b.k.data_ptr();
  p.v = b.v.data_ptr();
  p.qkv_dt = to_dt(q.scalar_type());
  p.g = b.g.data_ptr();
  p.g_dt = to_dt(g.scalar_type());
  p.beta = b.beta.data_ptr();
  p.beta_dt = to_dt(beta.scalar_type());
  p.A_log = p.dt_bias = nullptr;
  p.A_log_dt = p.dt_bias_dt = Dt::Float;
  if (use_gate_in_kernel && A_log.has_value()) {
    b.A_log = A_log->contiguous();
    p.A_log = b.A_log.data_ptr();
    p.A_log_dt = to_dt(b.A_log.scalar_type());
  }
  if (use_gate_in_kernel && dt_bias.has_value()) {
    b.dt_bias = dt_bias->contiguous();
    p.dt_bias = b.dt_bias.data_ptr();
    p.dt_bias_dt = to_dt(b.dt_bias.scalar_type());
  }
  p.h0 = nullptr;
  if (initial_state.has_value()) {
    b.h0 = initial_state->contiguous();
    p.h0 = b.h0.data_ptr();
  }
  p.scale = scale;
  p.use_qk_l2norm = use_qk_l2norm;
  p.use_gate_in_kernel = use_gate_in_kernel;
  p.use_beta_sigmoid = use_beta_sigmoid;
  p.allow_neg_eigval = allow_neg_eigval;
  p.safe_gate = safe_gate;
  p.has_lower_bound = lower_bound.has_value();
  p.lower_bound = lower_bound.value_or(0.0);
  p.state_v_first = state_v_first;
  if (cu_seqlens.has_value()) b.cu = read_cu_seqlens(*cu_seqlens, d.T);
  p.layout = make_seq_layout(d.B, d.T, d.BT, d.NT, d.varlen ? b.cu.data() : nullptr, d.N);
  return b;
}

}  // namespace cpu
}  // namespace kda_ext

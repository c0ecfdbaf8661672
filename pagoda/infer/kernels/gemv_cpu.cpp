// Skinny matrix products for decoding on CPU: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
//
// MKL runs x @ w.T single-threaded when x has only a few rows, reaching about half the memory
// bandwidth of two cores. Decoding is bound by reading the weights once per step, so we split the
// output rows across torch's own thread pool and stream each weight row through AVX2 FMAs once
// for every chunk of up to 8 rows of x (a decode batch of up to 64 sequences).
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/types.h>

namespace {

constexpr int64_t kMaxRows = 64;  // rows of x per call (a decode batch)
constexpr int kChunk = 8;         // rows sharing one pass over a weight row

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// a . b over n floats (AVX2; n need not be a multiple of 8).
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += p * x over n floats.
inline void axpy(float* y, float p, const float* x, int64_t n) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += p * x[i];
}

// One weight row against M input rows: M dot products sharing every load of the weight row.
template <int M>
inline void dot_rows(const float* x, int64_t ldx, const float* w, int64_t K, float* out) {
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv = _mm256_loadu_ps(w + k);
    for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k), wv, acc[m]);
  }
  for (int m = 0; m < M; ++m) {
    float s = hsum(acc[m]);
    for (int64_t kk = k; kk < K; ++kk) s += x[m * ldx + kk] * w[kk];
    out[m] = s;
  }
}

template <int M>
void dot_rows_bias(const float* x, int64_t K, const float* w, const float* bias, float* y,
                   int64_t N, int64_t n) {
  float tmp[M];
  dot_rows<M>(x, K, w, K, tmp);
  const float b = bias ? bias[n] : 0.f;
  for (int m = 0; m < M; ++m) y[m * N + n] = tmp[m] + b;
}

using RowsFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t, int64_t);
constexpr RowsFn kRows[kChunk] = {dot_rows_bias<1>, dot_rows_bias<2>, dot_rows_bias<3>, dot_rows_bias<4>,
                                  dot_rows_bias<5>, dot_rows_bias<6>, dot_rows_bias<7>, dot_rows_bias<8>};

// Output columns [begin, end): each weight row is loaded from memory once, then reused from L1
// for every chunk of up to 8 input rows.
void gemv_block(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t K,
                int64_t N, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
      const int64_t rows = std::min<int64_t>(kChunk, M - m0);
      kRows[rows - 1](x + m0 * K, K, w + n * K, bias, y + m0 * N, N, n);
    }
  }
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shape mismatch");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "1..64 rows only");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "CPU tensors only");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  auto y = at::empty({M, N}, xc.options());
  at::Tensor bc;  // must outlive the loop: a non-contiguous bias is copied here
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N &&
                bias->device().is_cpu(), "bias must be a float32 CPU vector of out_features");
    bc = bias->contiguous();
  }
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // ~16 KiB of weights per task keeps scheduling overhead small against the memory traffic.
  const int64_t grain = std::max<int64_t>(1, 4096 / K);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { gemv_block(xp, wp, bp, yp, M, K, N, begin, end); });
  return y;
}

// RMSNorm of each row of a contiguous (rows, D) float32 tensor: y = x / rms(x) * weight.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  const int64_t D = wc.numel();
  TORCH_CHECK(xc.size(-1) == D, "last dimension must match the weight");
  const int64_t rows = xc.numel() / D;
  auto y = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * D;
      double ss = 0;
      for (int64_t i = 0; i < D; ++i) ss += double(xr[i]) * xr[i];
      const float scale = float(1.0 / std::sqrt(ss / D + eps));
      for (int64_t i = 0; i < D; ++i) yp[r * D + i] = xr[i] * scale * wp[i];
    }
  });
  return y;
}

// Rotate-half RoPE in place on x (B, H, T, hd), any strides with a unit last stride;
// cos and sin are (B, 1, T, hd).
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.stride(3) == 1, "x: float32 (B,H,T,hd)");
  auto c = cos.contiguous();
  auto s = sin.contiguous();
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), hd = x.size(3), half = hd / 2;
  TORCH_CHECK(c.numel() == B * T * hd && s.numel() == B * T * hd, "cos/sin must be (B, 1, T, hd)");
  float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const int64_t sb = x.stride(0), sh = x.stride(1), st = x.stride(2);
  at::parallel_for(0, B * H * T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (H * T), h = (i / T) % H, t = i % T;
      float* v = xp + b * sb + h * sh + t * st;
      const float* cr = cp + (b * T + t) * hd;
      const float* sr = sp + (b * T + t) * hd;
      for (int64_t j = 0; j < half; ++j) {
        const float a = v[j], z = v[j + half];
        v[j] = a * cr[j] - z * sr[j];
        v[j + half] = z * cr[j + half] + a * sr[j + half];
      }
    }
  });
}

// Attention of one new query per sequence: q (B, H, 1, hd) against k, v (B, Hkv, S, hd) views of
// the KV cache (unit last stride), optional bool mask (B, 1, 1, S) of visible keys.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.dim() == 4, "q (B,H,1,hd), k/v (B,Hkv,S,hd)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "unit last stride");
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(H % Hkv == 0 && k.size(3) == hd && v.size(2) == S, "shape mismatch");
  at::Tensor m;
  if (mask.has_value()) {
    m = mask->to(at::kBool).expand({B, 1, 1, S}).contiguous();
  }
  const bool* mp = m.defined() ? m.data_ptr<bool>() : nullptr;
  auto out = at::empty({B, H, 1, hd}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t group = H / Hkv;
  const float scale = 1.0f / std::sqrt(float(hd));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(S);
    std::vector<float> acc(hd);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, g = h / group;
      const float* qv = qp + b * q.stride(0) + h * q.stride(1);
      const float* kb = kp + b * k.stride(0) + g * k.stride(1);
      const float* vb = vp + b * v.stride(0) + g * v.stride(1);
      float best = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        if (mp && !mp[b * S + s]) { scores[s] = -INFINITY; continue; }
        scores[s] = dot(qv, kb + s * k.stride(2), hd) * scale;
        best = std::max(best, scores[s]);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float total = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        if (scores[s] == -INFINITY) continue;
        const float p = std::exp(scores[s] - best);
        total += p;
        axpy(acc.data(), p, vb + s * v.stride(2), hd);
      }
      float* o = op + (b * H + h) * hd;
      for (int64_t d = 0; d < hd; ++d) o[d] = total > 0.f ? acc[d] / total : 0.f;
    }
  });
  return out;
}

// Decode attention straight from a paged KV pool: q (B, H, 1, hd); k_pool, v_pool (slots, Hkv,
// hd); slots (B, S_max) int64 naming each row's cached positions in order; lengths (B) how many
// of them row b attends to. No gather: each key row is read in place.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& slots, const at::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.stride(3) == 1, "q (B,H,1,hd) with unit last stride");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.dim() == 3, "pools (slots,Hkv,hd) contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_pool.scalar_type() == at::kFloat, "float32 only");
  auto sl = slots.to(at::kLong).contiguous();
  auto len = lengths.to(at::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(3), Hkv = k_pool.size(1), Smax = sl.size(1);
  TORCH_CHECK(H % Hkv == 0 && k_pool.size(2) == hd && sl.size(0) == B && len.numel() == B, "shape mismatch");
  auto out = at::empty({B, H, 1, hd}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pool.data_ptr<float>();
  const float* vp = v_pool.data_ptr<float>();
  const int64_t* sp = sl.data_ptr<int64_t>();
  const int64_t* lp = len.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t group = H / Hkv, row = Hkv * hd;
  const float scale = 1.0f / std::sqrt(float(hd));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(Smax);
    std::vector<float> acc(hd);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, g = h / group, S = std::min(lp[b], Smax);
      const float* qv = qp + b * q.stride(0) + h * q.stride(1);
      float best = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        scores[s] = dot(qv, kp + sp[b * Smax + s] * row + g * hd, hd) * scale;
        best = std::max(best, scores[s]);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float total = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        const float p = std::exp(scores[s] - best);
        total += p;
        axpy(acc.data(), p, vp + sp[b * Smax + s] * row + g * hd, hd);
      }
      float* o = op + (b * H + h) * hd;
      for (int64_t d = 0; d < hd; ++d) o[d] = total > 0.f ? acc[d] / total : 0.f;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(pagoda_kernels, m) {
  m.def("skinny_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor", &skinny_linear);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()", &rope_);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor", &decode_attention);
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor slots, Tensor lengths) -> Tensor",
        &paged_decode_attention);
}

// CPU kernels for inference: skinny matrix products, RMSNorm, RoPE, attention over a paged KV
// cache (one new token per sequence, or a causal prompt chunk), and `decode_block`, one whole
// pre-norm Transformer block for one new token per sequence.
//
// MKL runs x @ w.T single-threaded when x has only a few rows, reaching about half the memory
// bandwidth of two cores. Decoding is bound by reading the weights once per step, so we split the
// output rows across torch's own thread pool and stream each weight row through AVX2 FMAs once
// for every chunk of up to 8 rows of x (a decode batch of up to 64 sequences). Everything else
// in a decode step is tiny, and running it as one call per block instead of ~30 torch ops saves
// the per-op dispatch that otherwise costs a third of the step.
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/types.h>

namespace {

constexpr int64_t kMaxRows = 64;  // rows of x per call (a decode batch)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// a . b over n floats (AVX2; n need not be a multiple of 8). Two accumulators halve the FMA
// dependency chain of the short (head-size) vectors attention works on.
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = hsum(_mm256_add_ps(acc0, acc1));
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

// Loops over template constants are unrolled explicitly: unrolled late, GCC keeps the
// accumulator arrays on the stack and spills every FMA's result.
#define UNROLL _Pragma("GCC unroll 16")

// A register tile: NR weight rows against MR input rows, NR*MR accumulators. Each step of 8
// along K loads NR + MR vectors for NR*MR FMAs, so a batch of decode rows is bound by the FMA
// units rather than by loads; one row (MR = 1) is bound by reading the weights anyway. `next`
// (or null) is the next tile's first weight row: fetched into cache while this one computes,
// since several rows read at once are more streams than the hardware prefetcher follows.
template <int NR, int MR>
inline void tile(const float* x, int64_t K, const float* w, const float* bias, float* y,
                 int64_t N, int64_t n, int64_t m, const float* next) {
  __m256 acc[NR][MR];
  UNROLL for (int i = 0; i < NR; ++i)
    UNROLL for (int j = 0; j < MR; ++j) acc[i][j] = _mm256_setzero_ps();
  const float* wr = w + n * K;
  const float* xr = x + m * K;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (next && k % 16 == 0)
      UNROLL for (int i = 0; i < NR; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + i * K + k), _MM_HINT_T0);
    __m256 wv[NR];
    UNROLL for (int i = 0; i < NR; ++i) wv[i] = _mm256_loadu_ps(wr + i * K + k);
    UNROLL for (int j = 0; j < MR; ++j) {
      const __m256 xv = _mm256_loadu_ps(xr + j * K + k);
      UNROLL for (int i = 0; i < NR; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MR; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s += xr[j * K + kk] * wr[i * K + kk];
      y[(m + j) * N + n + i] = s + (bias ? bias[n + i] : 0.f);
    }
}

using TileFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t, int64_t,
                        int64_t, const float*);
// kTiles[NR - 1][MR - 1]; no 4 x 4 tile: from 4 input rows on, tiles are 3 weight rows wide.
constexpr TileFn kTiles[4][4] = {{tile<1, 1>, tile<1, 2>, tile<1, 3>, tile<1, 4>},
                                 {tile<2, 1>, tile<2, 2>, tile<2, 3>, tile<2, 4>},
                                 {tile<3, 1>, tile<3, 2>, tile<3, 3>, tile<3, 4>},
                                 {tile<4, 1>, tile<4, 2>, tile<4, 3>, nullptr}};

// Output columns [begin, end): a few weight rows at a time, kept in L1 while every input row
// passes over them, so each weight is read from memory once per call. Up to 3 input rows get
// 4 weight rows a tile; from 4 rows on, 3 x 4 tiles (12 accumulators + 3 weight + 1 input
// register of the 16) do the most FMAs per load.
void gemv_block(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t K,
                int64_t N, int64_t begin, int64_t end) {
  const int64_t tn = M >= 4 ? 3 : 4;
  for (int64_t n = begin; n < end; n += tn) {
    const int64_t nr = std::min<int64_t>(tn, end - n);
    const float* next = n + tn < end ? w + (n + tn) * K : nullptr;
    for (int64_t m = 0; m < M; m += 4)
      kTiles[nr - 1][std::min<int64_t>(4, M - m) - 1](x, K, w, bias, y, N, n, m, m == 0 ? next : nullptr);
  }
}

// y (M, N) = x (M, K) @ w (N, K).T (+ bias), contiguous rows, output rows split over threads.
void linear_rows(const float* x, int64_t M, int64_t K, const float* w, int64_t N,
                 const float* bias, float* y) {
  // ~16 KiB of weights per task keeps scheduling overhead small against the memory traffic.
  const int64_t grain = std::max<int64_t>(1, 4096 / K);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { gemv_block(x, w, bias, y, M, K, N, begin, end); });
}

inline void rms_norm_row(const float* x, const float* w, float* y, int64_t D, float eps) {
  const float scale = 1.0f / std::sqrt(dot(x, x, D) / D + eps);
  const __m256 sv = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= D; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), sv), _mm256_loadu_ps(w + i)));
  for (; i < D; ++i) y[i] = x[i] * scale * w[i];
}

// Rotate-half RoPE of one head vector in place; c and s hold hd values for its position.
inline void rope_row(float* v, const float* c, const float* s, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t j = 0; j < half; ++j) {
    const float a = v[j], z = v[j + half];
    v[j] = a * c[j] - z * s[j];
    v[j + half] = z * c[j + half] + a * s[j + half];
  }
}

// Where key/value position s of a sequence lives in a paged pool: its block table maps blocks of
// `block_size` positions to pool blocks.
struct PagedSeq {
  const int64_t* table;
  int64_t block_size;
  int64_t length;  // positions to attend to
  // fn(i, slot) for positions s0 + i in [s0, s1), one division per block rather than per key.
  template <typename Fn>
  void for_each_slot(int64_t s0, int64_t s1, Fn fn) const {
    for (int64_t s = s0; s < s1;) {
      const int64_t off = s % block_size, n = std::min(block_size - off, s1 - s);
      const int64_t base = table[s / block_size] * block_size + off;
      for (int64_t i = 0; i < n; ++i) fn(s - s0 + i, base + i);
      s += n;
    }
  }
};

// exp(x) for 8 floats (AVX2): 2^(x log2 e) split into 2^integer (exponent bits) times a degree-6
// polynomial for the fraction; relative error ~2e-7, the accuracy of expf.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-88.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.69314718055994531f));  // |f| <= ln2/2
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// v[i] = exp(v[i] - shift) for n floats; returns their sum.
inline float exp_shift_sum(float* v, int64_t n, float shift) {
  const __m256 sv = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(v + i), sv));
    _mm256_storeu_ps(v + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  for (; i < n; ++i) sum += (v[i] = std::exp(v[i] - shift));
  return sum;
}

// max(m, v[0..n)).
inline float max_of(const float* v, int64_t n, float m) {
  __m256 acc = _mm256_set1_ps(m);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(v + i));
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  r = _mm_max_ss(r, _mm_shuffle_ps(r, r, 1));
  float out = _mm_cvtss_f32(r);
  for (; i < n; ++i) out = std::max(out, v[i]);
  return out;
}

// out = silu(g) * u = g / (1 + exp(-g)) * u over n floats: SwiGLU's gate.
inline void silu_mul_row(const float* g, const float* u, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 sig = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(sig, _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// Keys and values are rows `row` floats apart in the pool, too far for the hardware prefetcher
// to follow: while attention scores 8 keys it asks for the next 8 key rows and these 8 value
// rows (summed once every key is scored).
inline void prefetch_row(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

// Scores of one query against 8 key rows (columns col..col+hd of each): eight dot products accumulated side by side, then
// reduced together by a tree of horizontal adds (one reduction for 8 keys, not one each).
inline __m256 dot8(const float* q, const float* const* k, int64_t col, int64_t hd) {
  __m256 a[8];
  UNROLL for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= hd; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    UNROLL for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[i] + col + d), a[i]);
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  if (d < hd) {  // a head size that is not a multiple of 8
    alignas(32) float tail[8];
    for (int i = 0; i < 8; ++i) {
      tail[i] = 0.f;
      for (int64_t e = d; e < hd; ++e) tail[i] += q[e] * k[i][col + e];
    }
    sum = _mm256_add_ps(sum, _mm256_load_ps(tail));
  }
  return sum;
}

// out (hd) = sum_i p[i] * v[i][col:col+hd]: 8 output vectors stay in registers across all n rows.
inline void weighted_sum(const float* p, const float* const* v, int64_t n, int64_t col, int64_t hd,
                         float* out) {
  int64_t d0 = 0;
  for (; d0 + 64 <= hd; d0 += 64) {
    __m256 acc[8];
    UNROLL for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      const __m256 pv = _mm256_set1_ps(p[i]);
      UNROLL for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v[i] + col + d0 + 8 * c), acc[c]);
    }
    UNROLL for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + d0 + 8 * c, acc[c]);
  }
  std::fill(out + d0, out + hd, 0.f);
  for (int64_t i = 0; i < n; ++i) axpy(out + d0, p[i], v[i] + col + d0, hd - d0);
}

// Softmax attention of all H query heads of one sequence over its keys [s0, s1), left
// unnormalised so key ranges can be merged: best[h] = max score, total[h] = sum of
// exp(score - best[h]), acc[h] = sum of exp(score - best[h]) * value. Every head at once, so each
// pool row (all KV heads of a position, contiguous) is streamed from memory once and whole;
// query head h reads KV head h / (H / Hkv). qs holds the queries pre-multiplied by 1/sqrt(hd);
// keys and values hold room for s1 - s0 row pointers.
void attend_range(const float* qs, int64_t H, int64_t Hkv, const float* kp, const float* vp,
                  const PagedSeq& seq, int64_t s0, int64_t s1, int64_t hd, float* scores,
                  const float** keys, const float** values, float* best, float* total, float* acc) {
  const int64_t n = s1 - s0, row = Hkv * hd, group = H / Hkv;
  seq.for_each_slot(s0, s1, [&](int64_t i, int64_t slot) {
    keys[i] = kp + slot * row;
    values[i] = vp + slot * row;
  });
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int64_t a = i + 8; a < std::min(i + 16, n); ++a) {
      prefetch_row(keys[a], row);
      prefetch_row(values[a - 8], row);
    }
    for (int64_t h = 0; h < H; ++h)
      _mm256_storeu_ps(scores + h * n + i, dot8(qs + h * hd, keys + i, (h / group) * hd, hd));
  }
  for (; i < n; ++i)
    for (int64_t h = 0; h < H; ++h) scores[h * n + i] = dot(qs + h * hd, keys[i] + (h / group) * hd, hd);
  for (int64_t h = 0; h < H; ++h) {
    const float m = max_of(scores + h * n, n, -INFINITY);
    best[h] = m;
    total[h] = n ? exp_shift_sum(scores + h * n, n, m) : 0.f;
    weighted_sum(scores + h * n, values, n, (h / group) * hd, hd, acc + h * hd);
  }
}

// Every query head of B sequences (q_at(b, h) points at a head vector) over the paged pools;
// out is (B, H, hd) contiguous. Work is split by (sequence, range of keys) so that even one
// sequence keeps every thread busy (split-K, as in flash-decoding); the ranges are merged
// with the usual log-sum-exp rescaling.
template <typename QAt>
void attend_paged(QAt q_at, const float* kp, const float* vp, const int64_t* tables,
                  int64_t table_width, int64_t block_size, const int64_t* lengths, int64_t B,
                  int64_t H, int64_t Hkv, int64_t hd, float* out) {
  const float scale = 1.0f / std::sqrt(float(hd));
  int64_t longest = 1;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, lengths[b]);
  const int64_t want = 4 * at::get_num_threads();  // tasks to aim for
  const int64_t splits = std::min<int64_t>((want + B - 1) / B, (longest + 31) / 32);
  const int64_t span = (longest + splits - 1) / splits;  // keys per range (>= 32 unless short)
  const int64_t parts = B * splits;  // part t = (sequence t / splits, range t % splits)
  std::vector<float> best(parts * H), total(parts * H), acc(parts * H * hd);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(H * hd), scores(H * span), local(H * hd), m(H), l(H);
    std::vector<const float*> keys(span), values(span);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / splits, c = t % splits;
      const PagedSeq seq{tables + b * table_width, block_size, lengths[b]};
      const int64_t s0 = std::min(c * span, seq.length), s1 = std::min(s0 + span, seq.length);
      for (int64_t h = 0; h < H; ++h) {
        const float* q = q_at(b, h);
        for (int64_t d = 0; d < hd; ++d) qs[h * hd + d] = q[d] * scale;
      }
      attend_range(qs.data(), H, Hkv, kp, vp, seq, s0, s1, hd, scores.data(), keys.data(),
                   values.data(), m.data(), l.data(), local.data());
      // copied out at the end: neighbouring tasks (other threads) share these cache lines
      std::copy(m.begin(), m.end(), best.begin() + t * H);
      std::copy(l.begin(), l.end(), total.begin() + t * H);
      std::copy(local.begin(), local.end(), acc.begin() + t * H * hd);
    }
  });
  at::parallel_for(0, B * H, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H;
      float m = -INFINITY;
      for (int64_t c = 0; c < splits; ++c) m = std::max(m, best[(b * splits + c) * H + h]);
      float* o = out + i * hd;
      std::fill(o, o + hd, 0.f);
      float sum = 0.f;
      for (int64_t c = 0; c < splits; ++c) {
        const int64_t at = (b * splits + c) * H + h;
        if (total[at] == 0.f) continue;  // an empty range
        const float w = std::exp(best[at] - m);
        sum += total[at] * w;
        axpy(o, w, &acc[at * hd], hd);
      }
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      for (int64_t d = 0; d < hd; ++d) o[d] *= inv;
    }
  });
}

void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, ": float32 CPU tensor expected");
}

const float* optional_ptr(const std::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return nullptr;
  check_cpu_float(*t, name);
  TORCH_CHECK(t->is_contiguous() && t->numel() == n, name, ": contiguous vector of ", n, " expected");
  return t->data_ptr<float>();
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
  at::Tensor bc;  // must outlive the call: a non-contiguous bias is copied here
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N &&
                bias->device().is_cpu(), "bias must be a float32 CPU vector of out_features");
    bc = bias->contiguous();
  }
  linear_rows(xc.data_ptr<float>(), M, K, wc.data_ptr<float>(), N,
              bc.defined() ? bc.data_ptr<float>() : nullptr, y.data_ptr<float>());
  return y;
}

// RMSNorm of each row of a (rows, D) float32 tensor: y = x / rms(x) * weight.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  const int64_t D = wc.numel();
  TORCH_CHECK(xc.size(-1) == D, "last dimension must match the weight");
  auto y = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, xc.numel() / D, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(xp + r * D, wp, yp + r * D, D, float(eps));
  });
  return y;
}

// SwiGLU's activation of a fused gate/up projection: (..., 2F) -> (..., F) = silu(gate) * up.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_cpu_float(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, "gate_up: (..., 2F)");
  auto x = gate_up.contiguous();
  const int64_t F = x.size(-1) / 2, rows = x.numel() / (2 * F);
  auto sizes = x.sizes().vec();
  sizes.back() = F;
  auto out = at::empty(sizes, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / F), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_mul_row(xp + r * 2 * F, xp + r * 2 * F + F, op + r * F, F);
  });
  return out;
}

// Rotate-half RoPE in place on x (B, H, T, hd), any strides with a unit last stride;
// cos and sin are (B, 1, T, hd).
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.stride(3) == 1, "x: float32 (B,H,T,hd)");
  auto c = cos.contiguous();
  auto s = sin.contiguous();
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), hd = x.size(3);
  TORCH_CHECK(c.numel() == B * T * hd && s.numel() == B * T * hd, "cos/sin must be (B, 1, T, hd)");
  float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const int64_t sb = x.stride(0), sh = x.stride(1), st = x.stride(2);
  at::parallel_for(0, B * H * T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (H * T), h = (i / T) % H, t = i % T;
      rope_row(xp + b * sb + h * sh + t * st, cp + (b * T + t) * hd, sp + (b * T + t) * hd, hd);
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
      float* o = op + i * hd;
      std::fill(o, o + hd, 0.f);
      float total = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        if (scores[s] == -INFINITY) continue;
        const float p = std::exp(scores[s] - best);
        total += p;
        axpy(o, p, vb + s * v.stride(2), hd);
      }
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t d = 0; d < hd; ++d) o[d] *= inv;
    }
  });
  return out;
}

// The paged view of one layer: pools (slots, Hkv, hd), block tables (B, width) int64, lengths (B).
struct PagedArgs {
  at::Tensor tables, lengths;
  int64_t B, width, Hkv, hd;
  PagedArgs(const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& block_tables,
            const at::Tensor& lens, int64_t batch) {
    check_cpu_float(k_pool, "k_pool");
    check_cpu_float(v_pool, "v_pool");
    TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.dim() == 3 &&
                k_pool.sizes() == v_pool.sizes(), "pools: contiguous (slots, Hkv, hd), same shape");
    tables = block_tables.to(at::kLong).contiguous();
    lengths = lens.to(at::kLong).contiguous();
    B = batch, width = tables.size(1), Hkv = k_pool.size(1), hd = k_pool.size(2);
    TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && lengths.numel() == B, "block tables (B, width), lengths (B)");
  }
  void check_lengths(int64_t block_size, int64_t slots) const {
    const int64_t* lp = lengths.data_ptr<int64_t>();
    const int64_t* tp = tables.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(lp[b] >= 1 && lp[b] <= width * block_size, "lengths must be 1..width*block_size");
      for (int64_t j = 0; j < (lp[b] + block_size - 1) / block_size; ++j)
        TORCH_CHECK(tp[b * width + j] >= 0 && (tp[b * width + j] + 1) * block_size <= slots, "block id out of range");
    }
  }
};

// Decode attention straight from a paged KV pool: q (B, H, 1, hd); k_pool, v_pool (slots, Hkv,
// hd); block_tables (B, width) naming each row's pool blocks in order; lengths (B) how many
// positions row b attends to. No gather: each key row is read in place.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_tables, const at::Tensor& lengths,
                                  int64_t block_size) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.stride(3) == 1, "q (B,H,1,hd) with unit last stride");
  check_cpu_float(q, "q");
  const int64_t B = q.size(0), H = q.size(1);
  PagedArgs pa(k_pool, v_pool, block_tables, lengths, B);
  TORCH_CHECK(H % pa.Hkv == 0 && q.size(3) == pa.hd, "shape mismatch");
  pa.check_lengths(block_size, k_pool.size(0));
  auto out = at::empty({B, H, 1, pa.hd}, q.options());
  const float* qp = q.data_ptr<float>();
  const int64_t sb = q.stride(0), sh = q.stride(1);
  attend_paged([&](int64_t b, int64_t h) { return qp + b * sb + h * sh; }, k_pool.data_ptr<float>(),
               v_pool.data_ptr<float>(), pa.tables.data_ptr<int64_t>(), pa.width, block_size,
               pa.lengths.data_ptr<int64_t>(), B, H, pa.Hkv, pa.hd, out.data_ptr<float>());
  return out;
}

// ---------------------------------------------------------------------------- prefill attention
// Causal attention of a chunk of new tokens over a paged cache (flash attention: key blocks
// streamed through an online softmax, never a full score matrix). A task is one KV head and
// kQBlock query positions of one sequence; its rows are the `group` query heads sharing that KV
// head at those positions, so every key and value row loaded serves all of them. Scores and the
// weighted sum of values are small register-tiled matrix products (6 x 16 and 2 x 32 tiles of
// FMAs), which run near the FMA units' peak where SDPA's CPU kernel reaches about a third of it
// on these sizes (head size 64, hundreds of keys).
constexpr int64_t kQBlock = 32;  // query positions per task
constexpr int64_t kKBlock = 64;  // keys per block of the online softmax

// s (MR x 16, row stride kKBlock) = q (MR rows of hd, row stride hd) @ kt (hd x kKBlock)[:, c0:c0+16]
template <int MR>
inline void qk_tile(const float* q, int64_t hd, const float* kt, float* s) {
  __m256 acc[MR][2];
  UNROLL for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < hd; ++d) {
    const __m256 k0 = _mm256_loadu_ps(kt + d * kKBlock), k1 = _mm256_loadu_ps(kt + d * kKBlock + 8);
    UNROLL for (int i = 0; i < MR; ++i) {
      const __m256 qv = _mm256_broadcast_ss(q + i * hd + d);
      acc[i][0] = _mm256_fmadd_ps(qv, k0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(qv, k1, acc[i][1]);
    }
  }
  UNROLL for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(s + i * kKBlock, acc[i][0]);
    _mm256_storeu_ps(s + i * kKBlock + 8, acc[i][1]);
  }
}

// o (MR rows, row stride hd)[:, d0:d0+8*NV] += p (MR x nk, row stride kKBlock) @ v rows[:, d0:...]
template <int MR, int NV>
inline void pv_tile(const float* p, const float* const* v, int64_t nk, int64_t d0, float* o, int64_t hd) {
  __m256 acc[MR][NV];
  UNROLL for (int i = 0; i < MR; ++i)
    UNROLL for (int c = 0; c < NV; ++c) acc[i][c] = _mm256_loadu_ps(o + i * hd + d0 + 8 * c);
  for (int64_t j = 0; j < nk; ++j) {
    __m256 vv[NV];
    UNROLL for (int c = 0; c < NV; ++c) vv[c] = _mm256_loadu_ps(v[j] + d0 + 8 * c);
    UNROLL for (int i = 0; i < MR; ++i) {
      const __m256 pv = _mm256_broadcast_ss(p + i * kKBlock + j);
      UNROLL for (int c = 0; c < NV; ++c) acc[i][c] = _mm256_fmadd_ps(pv, vv[c], acc[i][c]);
    }
  }
  UNROLL for (int i = 0; i < MR; ++i)
    UNROLL for (int c = 0; c < NV; ++c) _mm256_storeu_ps(o + i * hd + d0 + 8 * c, acc[i][c]);
}

using QkFn = void (*)(const float*, int64_t, const float*, float*);
constexpr QkFn kQk[6] = {qk_tile<1>, qk_tile<2>, qk_tile<3>, qk_tile<4>, qk_tile<5>, qk_tile<6>};
using PvFn = void (*)(const float*, const float* const*, int64_t, int64_t, float*, int64_t);
constexpr PvFn kPv4[2] = {pv_tile<1, 4>, pv_tile<2, 4>};
constexpr PvFn kPv1[2] = {pv_tile<1, 1>, pv_tile<2, 1>};

// The working set of one task, reused across the tasks of a thread.
struct PrefillScratch {
  std::vector<float> q, s, o, best, total;
  std::vector<const float*> v;
  PrefillScratch(int64_t rows, int64_t hd)
      : q(rows * hd), s(rows * kKBlock), o(rows * hd), best(rows), total(rows), v(kKBlock) {}
};

// Keys of one sequence and KV head, transposed block by block: kt[blk] is (hd x kKBlock), the
// layout the score tile reads; kt comes zeroed, so columns past the last key stay 0. Packed once
// and shared by every task.
void pack_keys(const float* kp, const PagedSeq& seq, int64_t row, int64_t col, int64_t hd, float* kt) {
  seq.for_each_slot(0, seq.length, [&](int64_t i, int64_t slot) {
    const float* k = kp + slot * row + col;
    float* dst = kt + (i / kKBlock) * hd * kKBlock + i % kKBlock;
    for (int64_t d = 0; d < hd; ++d) dst[d * kKBlock] = k[d];
  });
}

// Rows r = j * n + i: query head g*group + j at position start + p0 + i, which sees keys
// 0..start + p0 + i. Writes each row's normalised output through out_at(j, i).
template <typename OutAt>
void prefill_task(PrefillScratch& w, const float* qp, int64_t sq_h, int64_t sq_t, int64_t g,
                  int64_t group, int64_t p0, int64_t n, int64_t start, const PagedSeq& seq,
                  const float* kt, const float* vp, int64_t row, int64_t hd, OutAt out_at) {
  const int64_t rows = group * n;
  const float scale = 1.0f / std::sqrt(float(hd));
  for (int64_t j = 0; j < group; ++j)
    for (int64_t i = 0; i < n; ++i) {
      const float* src = qp + (g * group + j) * sq_h + (p0 + i) * sq_t;
      float* dst = w.q.data() + (j * n + i) * hd;
      for (int64_t d = 0; d < hd; ++d) dst[d] = src[d] * scale;
    }
  std::fill(w.o.begin(), w.o.begin() + rows * hd, 0.f);
  std::fill(w.best.begin(), w.best.begin() + rows, -INFINITY);
  std::fill(w.total.begin(), w.total.begin() + rows, 0.f);
  const int64_t keys = start + p0 + n;  // the last row's limit
  for (int64_t k0 = 0; k0 < keys; k0 += kKBlock) {
    const int64_t nk = std::min(kKBlock, keys - k0);
    const float* ktb = kt + (k0 / kKBlock) * hd * kKBlock;
    seq.for_each_slot(k0, k0 + nk, [&](int64_t jj, int64_t slot) { w.v[jj] = vp + slot * row + g * hd; });
    for (int64_t r = 0; r < rows; r += 6) {
      const int64_t mr = std::min<int64_t>(6, rows - r);
      for (int64_t c = 0; c < nk; c += 16)
        kQk[mr - 1](w.q.data() + r * hd, hd, ktb + c, w.s.data() + r * kKBlock + c);
    }
    // online softmax: rescale what each row accumulated so far to the new running maximum
    for (int64_t r = 0; r < rows; ++r) {
      float* s = w.s.data() + r * kKBlock;
      const int64_t visible = start + p0 + r % n + 1;  // keys row r may see
      const int64_t valid = std::clamp<int64_t>(visible - k0, 0, nk);
      const float m = max_of(s, valid, w.best[r]);
      float sum = 0.f;
      if (valid > 0) {
        sum = exp_shift_sum(s, valid, m);
        const float alpha = std::exp(w.best[r] - m);  // 0 on the first block (best = -inf)
        if (alpha != 1.f) {
          float* o = w.o.data() + r * hd;
          for (int64_t d = 0; d < hd; ++d) o[d] *= alpha;
        }
        w.total[r] = w.total[r] * alpha + sum;
        w.best[r] = m;
      }
      std::fill(s + valid, s + kKBlock, 0.f);  // masked keys weigh nothing
    }
    for (int64_t r = 0; r < rows; r += 2) {
      const int64_t mr = std::min<int64_t>(2, rows - r);
      const float* p = w.s.data() + r * kKBlock;
      float* o = w.o.data() + r * hd;
      int64_t d0 = 0;
      for (; d0 + 32 <= hd; d0 += 32) kPv4[mr - 1](p, w.v.data(), nk, d0, o, hd);
      for (; d0 < hd; d0 += 8) kPv1[mr - 1](p, w.v.data(), nk, d0, o, hd);
    }
  }
  for (int64_t j = 0; j < group; ++j)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = j * n + i;
      const float inv = 1.f / w.total[r];
      const float* o = w.o.data() + r * hd;
      float* dst = out_at(j, i);
      for (int64_t d = 0; d < hd; ++d) dst[d] = o[d] * inv;
    }
}

// q (B, H, T, hd) with unit last stride: T new tokens per sequence after starts[b] cached ones,
// whose keys and values (all starts[b] + T of them) are already in the pools (slots, Hkv, hd).
// Returns (B, H, T, hd) as a transposed view of a (B, T, H, hd) tensor, so the output
// projection's reshape to (B, T, H*hd) is free.
at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                   const at::Tensor& block_tables, const at::Tensor& starts,
                                   int64_t block_size) {
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1, "q (B,H,T,hd) with unit last stride");
  check_cpu_float(q, "q");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
  const at::Tensor total = starts.to(at::kLong) + T;
  PagedArgs pa(k_pool, v_pool, block_tables, total, B);
  TORCH_CHECK(H % pa.Hkv == 0 && q.size(3) == pa.hd && pa.hd % 8 == 0,
              "shape mismatch (head size must be a multiple of 8)");
  pa.check_lengths(block_size, k_pool.size(0));
  const int64_t hd = pa.hd, Hkv = pa.Hkv, group = H / Hkv, row = Hkv * hd;
  auto out = at::empty({B, T, H, hd}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pool.data_ptr<float>();
  const float* vp = v_pool.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* lp = pa.lengths.data_ptr<int64_t>();
  const int64_t* tp = pa.tables.data_ptr<int64_t>();
  // Later query blocks see more keys: hand the tasks out longest first, each thread taking the
  // next one when it is free, so the causal triangle does not leave a thread idle at the end.
  const int64_t nq = (T + kQBlock - 1) / kQBlock, heads = B * Hkv, tasks = nq * heads;
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, lp[b]);
  const int64_t kt_size = (longest + kKBlock - 1) / kKBlock * kKBlock * hd;  // per (b, g)
  std::vector<float> kt(heads * kt_size);  // zeroed: the padding of each last key block
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h)
      pack_keys(kp, PagedSeq{tp + (h / Hkv) * pa.width, block_size, lp[h / Hkv]}, row,
                (h % Hkv) * hd, hd, kt.data() + h * kt_size);
  });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    PrefillScratch w(group * kQBlock, hd);
    for (int64_t t = next++; t < tasks; t = next++) {
      const int64_t qb = nq - 1 - t / heads, b = (t % heads) / Hkv, g = t % Hkv;
      const int64_t p0 = qb * kQBlock, n = std::min(kQBlock, T - p0), start = lp[b] - T;
      const PagedSeq seq{tp + b * pa.width, block_size, lp[b]};
      prefill_task(w, qp + b * q.stride(0), q.stride(1), q.stride(2), g, group, p0, n, start, seq,
                   kt.data() + (t % heads) * kt_size, vp, row, hd, [&](int64_t j, int64_t i) {
                     return op + ((b * T + p0 + i) * H + g * group + j) * hd;
                   });
    }
  });
  return out.transpose(1, 2);
}

// One pre-norm block (RMSNorm, RoPE attention over the paged cache, RMSNorm, SwiGLU FFN, both
// residuals) for one new token per sequence, in one call:
//   h = x + o(attend(rope(qkv(norm1(x))))),  out = h + down(silu(gate(norm2(h))) * up(norm2(h)))
// x (B, D); qkv_w (H*hd + 2*Hkv*hd, D) = [Wq; Wk; Wv]; gate_up_w (2F, D) = [Wgate; Wup];
// cos, sin (B, hd) at each row's position; the new key/value go to pool slot new_slots[b].
at::Tensor decode_block(const at::Tensor& x, const at::Tensor& norm1, const at::Tensor& norm2, double eps,
                        const at::Tensor& qkv_w, const std::optional<at::Tensor>& qkv_b,
                        const at::Tensor& o_w, const std::optional<at::Tensor>& o_b,
                        const at::Tensor& gate_up_w, const std::optional<at::Tensor>& gate_up_b,
                        const at::Tensor& down_w, const std::optional<at::Tensor>& down_b,
                        const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_pool, at::Tensor& v_pool,
                        const at::Tensor& new_slots, const at::Tensor& block_tables,
                        const at::Tensor& lengths, int64_t block_size, int64_t n_head) {
  for (const auto* t : {&x, &norm1, &norm2, &qkv_w, &o_w, &gate_up_w, &down_w, &cos, &sin}) {
    check_cpu_float(*t, "decode_block");
    TORCH_CHECK(t->is_contiguous(), "decode_block: contiguous tensors expected");
  }
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxRows, "x: (B, D) with 1..64 rows");
  const int64_t B = x.size(0), D = x.size(1);
  PagedArgs pa(k_pool, v_pool, block_tables, lengths, B);
  const int64_t H = n_head, Hkv = pa.Hkv, hd = pa.hd, F = gate_up_w.size(0) / 2;
  const int64_t Nq = H * hd, Nkv = Hkv * hd, Nqkv = Nq + 2 * Nkv;
  TORCH_CHECK(H % Hkv == 0 && norm1.numel() == D && norm2.numel() == D, "decode_block: head or norm shape mismatch");
  TORCH_CHECK(qkv_w.sizes() == at::IntArrayRef({Nqkv, D}) && o_w.sizes() == at::IntArrayRef({D, Nq}) &&
              gate_up_w.sizes() == at::IntArrayRef({2 * F, D}) && down_w.sizes() == at::IntArrayRef({D, F}),
              "decode_block: weight shape mismatch");
  TORCH_CHECK(cos.numel() == B * hd && sin.numel() == B * hd, "cos/sin must be (B, hd)");
  auto slots = new_slots.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == B, "new_slots: one slot per row");
  pa.check_lengths(block_size, k_pool.size(0));
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(sp[b] >= 0 && sp[b] < k_pool.size(0), "new slot out of range");

  auto opts = x.options();
  auto out = at::empty({B, D}, opts);
  auto h = at::empty({B, D}, opts);  // normed input of each sub-layer
  auto qkv = at::empty({B, Nqkv}, opts);
  auto attn = at::empty({B, Nq}, opts);
  auto gate_up = at::empty({B, 2 * F}, opts);
  auto act = at::empty({B, F}, opts);
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
  float *outp = out.data_ptr<float>(), *hp = h.data_ptr<float>(), *qkvp = qkv.data_ptr<float>();
  float *attnp = attn.data_ptr<float>(), *gup = gate_up.data_ptr<float>(), *actp = act.data_ptr<float>();
  float *kp = k_pool.data_ptr<float>(), *vp = v_pool.data_ptr<float>();

  // attention sub-layer
  for (int64_t b = 0; b < B; ++b) rms_norm_row(xp + b * D, norm1.data_ptr<float>(), hp + b * D, D, float(eps));
  linear_rows(hp, B, D, qkv_w.data_ptr<float>(), Nqkv, optional_ptr(qkv_b, Nqkv, "qkv bias"), qkvp);
  for (int64_t b = 0; b < B; ++b) {
    float* row = qkvp + b * Nqkv;
    for (int64_t head = 0; head < H + Hkv; ++head) rope_row(row + head * hd, cp + b * hd, snp + b * hd, hd);
    std::copy(row + Nq, row + Nq + Nkv, kp + sp[b] * Nkv);
    std::copy(row + Nq + Nkv, row + Nqkv, vp + sp[b] * Nkv);
  }
  attend_paged([&](int64_t b, int64_t hh) { return qkvp + b * Nqkv + hh * hd; }, kp, vp,
               pa.tables.data_ptr<int64_t>(), pa.width, block_size, pa.lengths.data_ptr<int64_t>(),
               B, H, Hkv, hd, attnp);
  linear_rows(attnp, B, Nq, o_w.data_ptr<float>(), D, optional_ptr(o_b, D, "o bias"), outp);
  for (int64_t i = 0; i < B * D; ++i) outp[i] += xp[i];

  // feed-forward sub-layer
  for (int64_t b = 0; b < B; ++b) rms_norm_row(outp + b * D, norm2.data_ptr<float>(), hp + b * D, D, float(eps));
  linear_rows(hp, B, D, gate_up_w.data_ptr<float>(), 2 * F, optional_ptr(gate_up_b, 2 * F, "gate/up bias"), gup);
  at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) silu_mul_row(gup + b * 2 * F, gup + b * 2 * F + F, actp + b * F, F);
  });
  auto ffn = at::empty({B, D}, opts);
  linear_rows(actp, B, F, down_w.data_ptr<float>(), D, optional_ptr(down_b, D, "down bias"), ffn.data_ptr<float>());
  const float* fp = ffn.data_ptr<float>();
  for (int64_t i = 0; i < B * D; ++i) outp[i] += fp[i];
  return out;
}

}  // namespace

TORCH_LIBRARY(pagoda_kernels, m) {
  m.def("skinny_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor", &skinny_linear);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()", &rope_);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor", &decode_attention);
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, "
        "Tensor lengths, int block_size) -> Tensor", &paged_decode_attention);
  m.def("paged_prefill_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, "
        "Tensor starts, int block_size) -> Tensor", &paged_prefill_attention);
  m.def("decode_block(Tensor x, Tensor norm1, Tensor norm2, float eps, Tensor qkv_w, Tensor? qkv_b, "
        "Tensor o_w, Tensor? o_b, Tensor gate_up_w, Tensor? gate_up_b, Tensor down_w, Tensor? down_b, "
        "Tensor cos, Tensor sin, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor new_slots, "
        "Tensor block_tables, Tensor lengths, int block_size, int n_head) -> Tensor", &decode_block);
}

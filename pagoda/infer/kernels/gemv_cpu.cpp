// Skinny matrix products for decoding on CPU: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
//
// MKL runs x @ w.T single-threaded when x has only a few rows, reaching about half the memory
// bandwidth of two cores. Decoding is bound by reading the weights once per step, so we split the
// output rows across torch's own thread pool and stream each weight row through AVX2 FMAs once
// for all (up to 8) rows of x.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/types.h>

namespace {

constexpr int64_t kMaxRows = 8;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
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
void gemv_block(const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t N,
                int64_t begin, int64_t end) {
  float tmp[M];
  for (int64_t n = begin; n < end; ++n) {
    dot_rows<M>(x, K, w + n * K, K, tmp);
    float b = bias ? bias[n] : 0.f;
    for (int m = 0; m < M; ++m) y[m * N + n] = tmp[m] + b;
  }
}

using Block = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
constexpr Block kBlocks[kMaxRows] = {gemv_block<1>, gemv_block<2>, gemv_block<3>, gemv_block<4>,
                                     gemv_block<5>, gemv_block<6>, gemv_block<7>, gemv_block<8>};

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shape mismatch");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "1..8 rows only");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  auto y = at::empty({M, N}, xc.options());
  const float* bp = bias.has_value() ? bias->contiguous().data_ptr<float>() : nullptr;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  Block block = kBlocks[M - 1];
  // ~16 KiB of weights per task keeps scheduling overhead small against the memory traffic.
  const int64_t grain = std::max<int64_t>(1, 4096 / K);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { block(xp, wp, bp, yp, K, N, begin, end); });
  return y;
}

}  // namespace

TORCH_LIBRARY(pagoda_kernels, m) {
  m.def("skinny_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor", &skinny_linear);
}

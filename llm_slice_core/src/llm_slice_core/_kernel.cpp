// The decode product of llm_slice_core.kernel: y[M, N] = x[M, K] @ w[K, N] (+ bias[N]) in
// float32 on a CPU, for a few input rows, reading the weight at the memory's streaming speed.
//
// w is row-major [K, N] (a packed weight_t). The weight is read 8 rows at a time, each row
// segment from start to end (8 sequential streams, all hardware prefetchers follow), and each
// 16-column strip of those 8 rows updates the output rows held in registers: the outputs for
// up to 8 input rows are loaded once per 8 weight rows, so the weight is read from memory once
// however many rows (up to 8) the product has. Columns are split over torch's threads in
// multiples of 16; each output element is the same sum in the same order whatever the split,
// so the result does not depend on the thread count.
//
// Built on first use by llm_slice_core/kernel.py (the host compiler, -O3 -march=native) and
// called through ctypes, which releases the GIL.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace {

typedef float v8 __attribute__((vector_size(32), aligned(4)));

inline v8 load(const float* p) { return *reinterpret_cast<const v8*>(p); }
inline void store(float* p, v8 v) { *reinterpret_cast<v8*>(p) = v; }

constexpr int64_t kChunk = 4096;  // columns per pass: the output rows stay in L1/L2
constexpr int64_t kNarrow = 1024;  // up to this many columns (per thread), prefetch explicitly

// y[0:MR, n0:n1] = (first ? bias or 0 : y) + x[0:MR, 0:KB] @ w[0:KB, n0:n1]
template <int MR, int KB>
void block(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy,
           int64_t n0, int64_t n1, const float* bias, bool first, bool ahead) {
  float xs[KB][MR];
  for (int k = 0; k < KB; k++)
    for (int m = 0; m < MR; m++) xs[k][m] = x[m * ldx + k];
  int64_t j = n0;
  for (; j + 16 <= n1; j += 16) {
    v8 a0[MR], a1[MR];
    if (first) {
      const v8 b0 = bias ? load(bias + j) : v8{}, b1 = bias ? load(bias + j + 8) : v8{};
      for (int m = 0; m < MR; m++) a0[m] = b0, a1[m] = b1;
    } else {
      for (int m = 0; m < MR; m++) a0[m] = load(y + m * ldy + j), a1[m] = load(y + m * ldy + j + 8);
    }
    for (int k = 0; k < KB; k++) {
      const float* row = w + k * ldw + j;
      if (ahead) __builtin_prefetch(row + KB * ldw);  // the same strip of the next 8 rows
      const v8 w0 = load(row), w1 = load(row + 8);
      for (int m = 0; m < MR; m++) {
        a0[m] += xs[k][m] * w0;
        a1[m] += xs[k][m] * w1;
      }
    }
    for (int m = 0; m < MR; m++) store(y + m * ldy + j, a0[m]), store(y + m * ldy + j + 8, a1[m]);
  }
  for (; j < n1; j++) {  // the last columns of a width that is not a multiple of 16
    for (int m = 0; m < MR; m++) {
      float a = first ? (bias ? bias[j] : 0.0f) : y[m * ldy + j];
      for (int k = 0; k < KB; k++) a += xs[k][m] * w[k * ldw + j];
      y[m * ldy + j] = a;
    }
  }
}

// y[0:MR, n0:n1] = x[0:MR, :] @ w[:, n0:n1] (+ bias)
template <int MR>
void rows(const float* x, int64_t K, const float* w, int64_t N, float* y, const float* bias,
          int64_t n0, int64_t n1) {
  // a narrow weight's 8 rows are short streams the hardware prefetcher starts late: ask ahead
  const bool narrow = n1 - n0 <= kNarrow;
  for (int64_t c0 = n0; c0 < n1; c0 += kChunk) {
    const int64_t c1 = std::min(c0 + kChunk, n1);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const bool ahead = narrow && k + 16 <= K;
      block<MR, 8>(x + k, K, w + k * N, N, y, N, c0, c1, bias, k == 0, ahead);
    }
    for (; k < K; k++) block<MR, 1>(x + k, K, w + k * N, N, y, N, c0, c1, bias, k == 0, false);
  }
}

typedef void (*rows_fn)(const float*, int64_t, const float*, int64_t, float*, const float*,
                        int64_t, int64_t);
constexpr rows_fn kRows[9] = {nullptr,  rows<1>, rows<2>, rows<3>, rows<4>,
                              rows<5>, rows<6>, rows<7>, rows<8>};

}  // namespace

extern "C" int llm_slice_core_product(const float* x, int64_t M, int64_t K, const float* w,
                                      int64_t N, const float* bias, float* y) {
  if (M < 1 || K < 1 || N < 1) return 1;
  const int64_t strips = (N + 15) / 16;
  // a thread gets at least ~64K multiply-adds per input row: smaller products stay on one
  const int64_t grain = std::max<int64_t>(1, 65536 / (16 * K));
  at::parallel_for(0, strips, grain, [&](int64_t s0, int64_t s1) {
    const int64_t n0 = s0 * 16, n1 = std::min(s1 * 16, N);
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t r = std::min<int64_t>(8, M - m0);
      kRows[r](x + m0 * K, K, w, N, y + m0 * N, bias, n0, n1);
    }
  });
  return 0;
}

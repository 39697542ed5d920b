// The micro-kernel every matmul of the row path runs: acc = x @ w for up to kRows rows of x and a
// tile of C x U columns of w, laid out so that it reads w front to back. float32 FMAs on AVX-512
// (16 lanes, 8 rows: 16 sums + weights + a broadcast in 32 registers) or AVX2 (8 lanes, 3 rows:
// AVX2 has 16 registers); bfloat16 pair dot products (vdpbf16ps) on AVX-512 BF16. Nothing here
// is built where neither is (the portable build), and the callers take at::mm there.
//
// Reference: a plain float32 matmul (torch.mm); tests/model/test_kernels.py checks the loops and
// decoding that call it, for every build this CPU runs.
#pragma once
#include "kernels.h"

namespace charlm {

#ifdef CHARLM_ROWS_F32
// The vector the micro-kernels work in: U float32 lanes; a tile is up to kRows rows of the batch.
#ifdef __AVX512F__
using Vec = __m512;
constexpr int U = 16, kRows = 8;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(float a, Vec w, Vec acc) { return _mm512_fmadd_ps(_mm512_set1_ps(a), w, acc); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
#else
using Vec = __m256;
constexpr int U = 8, kRows = 3;  // AVX2 has 16 registers: 9 sums, 3 weights, 1 input
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vfma(float a, Vec w, Vec acc) { return _mm256_fmadd_ps(_mm256_set1_ps(a), w, acc); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
#endif

// acc[i][c] = x[i] @ w[:, c] for R rows of x (K each, row stride xs) and one tile of weights,
// C blocks of U columns laid out by for_tiles: (K, C, U) float32, or (K / 2, C, U, 2) bfloat16
// (row pairs side by side, as vdpbf16ps multiplies them). float32 sums. WS: how many columns a
// row of the layout holds (C U in for_tiles'; decoding reads part of gemv_layout's kCols).
template <int R, int C, int64_t WS = C * U>
inline void tile(const float* x, int64_t xs, int64_t K, const float* w, float (*out)[C][U]) {
  Vec acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) acc[i][c] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = vload(w + k * WS + c * U);
    for (int i = 0; i < R; ++i) {
      const float a = x[i * xs + k];
      for (int c = 0; c < C; ++c) acc[i][c] = vfma(a, wv[c], acc[i][c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) vstore(out[i][c], acc[i][c]);
}

#ifdef CHARLM_PAIRS_BF16
inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

template <int R, int C, int64_t WS = C * U>
inline void tile(const at::BFloat16* x, int64_t xs, int64_t K, const at::BFloat16* w, float (*out)[C][U]) {
  __m512 acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) acc[i][c] = _mm512_setzero_ps();
  const int32_t* xp = reinterpret_cast<const int32_t*>(x);  // x's pairs, one 32-bit word each
  for (int64_t k = 0; k < K / 2; ++k) {
    __m512bh wv[C];
    for (int c = 0; c < C; ++c) wv[c] = as_bh(_mm512_loadu_si512(w + (k * WS + c * U) * 2));
    for (int i = 0; i < R; ++i) {
      const __m512bh a = as_bh(_mm512_set1_epi32(xp[i * xs / 2 + k]));
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], a, wv[c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out[i][c], acc[i][c]);
}
#endif

// tile for r rows, 1 <= r <= kRows: the row count a template parameter, so that the loops unroll.
template <int C, int64_t WS = C * U, typename M>
void tile_rows(int r, const M* x, int64_t xs, int64_t K, const M* w, float (*out)[C][U]) {
  switch (r) {
#ifdef __AVX512F__
    case 8: return tile<8, C, WS>(x, xs, K, w, out);
    case 7: return tile<7, C, WS>(x, xs, K, w, out);
    case 6: return tile<6, C, WS>(x, xs, K, w, out);
    case 5: return tile<5, C, WS>(x, xs, K, w, out);
    case 4: return tile<4, C, WS>(x, xs, K, w, out);
#endif
    case 3: return tile<3, C, WS>(x, xs, K, w, out);
    case 2: return tile<2, C, WS>(x, xs, K, w, out);
    default: return tile<1, C, WS>(x, xs, K, w, out);
  }
}
#endif  // CHARLM_ROWS_F32

}  // namespace charlm

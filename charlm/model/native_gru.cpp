// charlm's fused GRU kernels for the CPU: nn.GRU's equations (reset gate after the recurrent
// matmul), one time step's elementwise work in one pass over the batch, the time loop in C++.
// Built on first use by charlm/model/native.py; where it cannot be built, charlm/model/fused_gru.py
// runs the same loops with PyTorch's operations, with the same results (tests/test_native.py).
//
//   r = sigmoid(gi_r + W_hr h + b_hr)        gi = W_i x + b_i, for all steps at once (the caller's
//                                            matmul; b_i it may leave to the loop)
//   z = sigmoid(gi_z + W_hz h + b_hz)
//   n = tanh(gi_n + r * (W_hn h + b_hn))
//   h' = n + z * (h - n)
//
// The matmuls run in the dtype of the weights given (float32, or bfloat16 under bf16 autocast);
// the gates, the state and everything saved for the backward pass stay float32. Two ways through
// the training loops: the row path (forward_rows, backward_rows), where charlm's micro-kernels do
// the recurrent matmuls and each thread runs every step for its own rows of the batch, and one
// at::mm a step with the gates split over the threads, where the micro-kernels are not built for
// this CPU (rows_path says which).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// The row path: the recurrent matmuls by charlm's own micro-kernels, so that each thread runs the
// whole time loop for its own rows of the batch, with no hand-over between threads a step. float32
// with AVX-512 or AVX2 and FMA; bfloat16 with AVX-512 BF16's pair dot product (vdpbf16ps), where
// the CPU has no AMX (there oneDNN's at::mm, which uses AMX, does the bfloat16 matmuls; decoding
// still uses the pair products).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define CHARLM_ROWS_F32 1
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define CHARLM_PAIRS_BF16 1  // the bfloat16 micro-kernel is built
constexpr bool kBf16Tiles = true;
#else
constexpr bool kBf16Tiles = false;
#endif
#if defined(CHARLM_PAIRS_BF16) && !defined(__AMX_BF16__)
#define CHARLM_ROWS_BF16 1  // and the training loops use it
#endif

using at::Tensor;

// Runs the lambda with scalar_t = float or at::BFloat16, the matmul dtypes the kernels take.
#define CHARLM_FLOAT_OR_BF16(TYPE, NAME, ...)                                      \
  [&] {                                                                            \
    if (TYPE == at::kFloat) {                                                      \
      using scalar_t = float;                                                      \
      return __VA_ARGS__();                                                        \
    }                                                                              \
    TORCH_CHECK(TYPE == at::kBFloat16, NAME ": the matmul dtype must be float32 or bfloat16"); \
    using scalar_t = at::BFloat16;                                                 \
    return __VA_ARGS__();                                                          \
  }()

namespace {

template <typename T> inline float f32(T v) { return static_cast<float>(v); }

// Stores v as the matmul dtype at p[j]. bfloat16: rounded to nearest even, as c10's conversion
// does, NaN kept NaN, but without its branch and through the raw bits, so that the loops that
// write bfloat16 vectorize.
inline void put(float* p, int64_t j, float v) { p[j] = v; }
inline void put(at::BFloat16* p, int64_t j, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  reinterpret_cast<uint16_t*>(p)[j] = v != v ? uint16_t{0x7fc0} : rounded;
}

// exp for the gates, inline so that the gate loops vectorize: Cody-Waite reduction and Cephes'
// degree-6 polynomial. The sigmoid and tanh below built on it stay within 2e-7 of float64's on
// [-20, 20] (measured); NaN stays NaN, and large arguments saturate to 0 and 1 (or -1 and 1).
inline float fast_exp(float x) {
  const float c = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float k = __builtin_rintf(c * 1.44269504088896341f);
  float r = std::fma(k, -0.693359375f, c);
  r = std::fma(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(k) << 23;  // times 2^k
  float y;
  std::memcpy(&y, &bits, sizeof y);
  return x != x ? x : y;
}
inline float sigmoid(float x) { return 1.f / (1.f + fast_exp(-x)); }
inline float tanh_(float x) { return 1.f - 2.f / (1.f + fast_exp(2.f * x)); }

// Rows [begin, end) of the batch, in chunks of at least this many elements per thread.
constexpr int64_t kGrain = 8192;

template <typename F> void over_rows(int64_t rows, int64_t width, const F& body) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, width)), body);
}

// One forward step for rows [b0, b1): reads gi (B, 3H), gh = W_h h (B, 3H), b_hh, h_prev;
// writes the gates, the new state (float32) and its copy in the matmul dtype. With kInBias, gi
// is W_i x without its bias: b_hh then holds b_ir + b_hr, b_iz + b_hz and b_hn, and b_in is added
// to gi's n part (the matmul that made gi had no bias to add, and adding it there costs a pass).
template <typename M, typename G = M, bool kInBias = false>
void forward_step(int64_t b0, int64_t b1, int64_t H, const M* gi, const G* gh, const float* b_hh,
                  const float* b_in, const float* h_prev, float* rz, float* n_out, float* ghn_out, float* h_out,
                  M* h_mm) {
  for (int64_t b = b0; b < b1; ++b) {
    const M* gib = gi + b * 3 * H;
    const G* ghb = gh + b * 3 * H;
    const float* hp = h_prev + b * H;
    float* r_ = rz + b * 2 * H;
    float* z_ = r_ + H;
    float* n_ = n_out + b * H;
    float* g_ = ghn_out + b * H;
    float* ho = h_out + b * H;
    M* hm = h_mm + b * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      float r = sigmoid(f32(gib[j]) + f32(ghb[j]) + b_hh[j]);
      float z = sigmoid(f32(gib[H + j]) + f32(ghb[H + j]) + b_hh[H + j]);
      float ghn = f32(ghb[2 * H + j]) + b_hh[2 * H + j];
      float n = tanh_(f32(gib[2 * H + j]) + (kInBias ? b_in[j] : 0.f) + r * ghn);
      float h = n + z * (hp[j] - n);
      r_[j] = r;
      z_[j] = z;
      n_[j] = n;
      g_[j] = ghn;
      ho[j] = h;
      put(hm, j, h);
    }
  }
}


// One backward step for rows [b0, b1). dh = d_out + dhz + back, where back = d_gh(t+1) @ W_h
// and dhz = dh(t+1) * z(t+1); writes d_gi = dL/d(W_i x + b_i) and d_gh = dL/d(W_h h + b_h),
// each (B, 3H) in the matmul dtype, and the new dhz; adds the rows' d_r, d_z, d_n and d_n * r
// (float32, before rounding) to sums (4H): the bias gradients.
template <typename M, typename Back = M>
void backward_step(int64_t b0, int64_t b1, int64_t H, const float* d_out, const Back* back, float* dhz,
                   const float* rz, const float* n_, const float* ghn, const float* h_prev, M* d_gi, M* d_gh,
                   float* sums) {
  for (int64_t b = b0; b < b1; ++b) {
    const float* dob = d_out + b * H;
    const Back* bb = back ? back + b * H : nullptr;
    float* dz_ = dhz + b * H;
    const float* r_ = rz + b * 2 * H;
    const float* z_ = r_ + H;
    const float* nb = n_ + b * H;
    const float* gb = ghn + b * H;
    const float* hp = h_prev + b * H;
    M* di = d_gi + b * 3 * H;
    M* dg = d_gh + b * 3 * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      float dh = dob[j] + dz_[j] + (bb ? f32(bb[j]) : 0.f);
      float r = r_[j], z = z_[j], n = nb[j];
      const float d_pre_n = dh * (1.f - z) * (1.f - n * n);
      const float d_r = d_pre_n * gb[j] * r * (1.f - r);
      const float d_z = dh * (hp[j] - n) * z * (1.f - z);
      const float d_hn = d_pre_n * r;
      put(di, j, d_r);
      put(dg, j, d_r);
      put(di, H + j, d_z);
      put(dg, H + j, d_z);
      put(di, 2 * H + j, d_pre_n);
      put(dg, 2 * H + j, d_hn);
      dz_[j] = dh * z;
      sums[j] += d_r;
      sums[H + j] += d_z;
      sums[2 * H + j] += d_pre_n;
      sums[3 * H + j] += d_hn;
    }
  }
}

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

// w (K, N) laid out as tiles, one after another, each read front to back by the micro-kernel:
// tile q holds columns q * qs + c * cs + [0, U) for c < C, as (K, C, U) float32 or, K even,
// (K / 2, C, U, 2) bfloat16.
template <typename E, int64_t pair>
void lay_tiles(const E* src, E* dst, int64_t K, int64_t N, int64_t tiles, int64_t qs, int64_t cs, int64_t C) {
  at::parallel_for(0, tiles, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      E* tile = dst + q * K * C * U;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < C; ++c) {
          const E* row = src + k * N + q * qs + c * cs;
          E* to = tile + ((k / pair) * C + c) * U * pair + k % pair;
          for (int64_t j = 0; j < U; ++j) to[j * pair] = row[j];
        }
    }
  });
}

Tensor for_tiles(const Tensor& w_, int64_t tiles, int64_t qs, int64_t cs, int64_t C) {
  const Tensor w = w_.contiguous();
  const int64_t K = w.size(0), N = w.size(1);
  Tensor p = at::empty({tiles, K * C * U}, w.options());
  if (w.scalar_type() == at::kFloat)
    lay_tiles<float, 1>(w.const_data_ptr<float>(), p.data_ptr<float>(), K, N, tiles, qs, cs, C);
  else
    lay_tiles<uint16_t, 2>(reinterpret_cast<const uint16_t*>(w.const_data_ptr<at::BFloat16>()),
                           reinterpret_cast<uint16_t*>(p.data_ptr<at::BFloat16>()), K, N, tiles, qs, cs, C);
  return p;
}

// The rows of the batch never meet in the time loop, so each thread takes a block of rows and
// runs every step for them alone: the recurrent matmul, U hidden units of each gate at a time,
// into gh (float32), then the gates.
template <typename M>
void forward_rows(int64_t T, int64_t B, int64_t H, const M* gi, const M* w, const float* b_hh, const float* b_in,
                  const float* h0,
                  const M* h0_mm, float* rz, float* n, float* ghn, float* out, M* out_mm) {
  const int64_t blocks = (B + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t blk0, int64_t blk1) {
    const int64_t begin = blk0 * kRows, end = std::min(B, blk1 * kRows);
    std::vector<float> gh((end - begin) * 3 * H);  // this thread's rows of W_h h
    alignas(64) float acc[kRows][3][U];
    for (int64_t t = 0; t < T; ++t) {
      const M* hm = t == 0 ? h0_mm : out_mm + (t - 1) * B * H;
      for (int64_t u = 0; u < H; u += U) {
        const M* slab = w + u * H * 3;  // tile u / U: columns u, H + u and 2H + u, U of each
        for (int64_t r0 = begin; r0 < end; r0 += kRows) {
          const int r = static_cast<int>(std::min<int64_t>(kRows, end - r0));
          tile_rows<3>(r, hm + r0 * H, H, H, slab, acc);
          for (int i = 0; i < r; ++i)
            for (int c = 0; c < 3; ++c) std::memcpy(&gh[((r0 - begin + i) * 3 + c) * H + u], acc[i][c], sizeof acc[i][c]);
        }
      }
      const int64_t o = t * B * H;
      const float* h_prev = t == 0 ? h0 : out + o - B * H;
      const M* gi_t = gi + t * B * 3 * H;
      const float* gh_t = gh.data() - begin * 3 * H;
      if (b_in)
        forward_step<M, float, true>(begin, end, H, gi_t, gh_t, b_hh, b_in, h_prev, rz + 2 * o, n + o, ghn + o,
                                     out + o, out_mm + o);
      else
        forward_step<M, float>(begin, end, H, gi_t, gh_t, b_hh, nullptr, h_prev, rz + 2 * o, n + o, ghn + o,
                               out + o, out_mm + o);
    }
  });
}

// The backward time loop, a block of rows per thread as in forward_rows: a step's gradients for
// all of the thread's rows, then their d_gh @ W_h (float32), which the step before reads, each
// weight tile taken once for all those rows (its 3H x 2U floats are read from cache once a step).
template <typename M>
void backward_rows(int64_t T, int64_t B, int64_t H, const float* d_out, const float* h0, const float* out,
                   const float* rz, const float* n, const float* ghn, const M* w, M* d_gi, M* d_gh, float* dhz,
                   float* back, float* sums) {
  const int64_t blocks = (B + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t blk0, int64_t blk1) {
    alignas(64) float acc[kRows][2][U];
    float* my_sums = sums + at::get_thread_num() * 4 * H;
    const int64_t end = std::min(B, blk1 * kRows);
    const int64_t begin = blk0 * kRows;
    for (int64_t t = T - 1; t >= 0; --t) {
      const float* h_prev = t == 0 ? h0 : out + (t - 1) * B * H;
      backward_step<M, float>(begin, end, H, d_out + t * B * H, t == T - 1 ? nullptr : back, dhz, rz + t * B * 2 * H,
                              n + t * B * H, ghn + t * B * H, h_prev, d_gi + t * B * 3 * H, d_gh + t * B * 3 * H,
                              my_sums);
      for (int64_t c = 0; c < H; c += 2 * U) {
        const M* slab = w + c * 3 * H;  // tile c / 2U: columns [c, c + 2U), over 3H rows
        for (int64_t r0 = begin; r0 < end; r0 += kRows) {
          const int64_t r = std::min<int64_t>(end - r0, kRows);
          tile_rows<2>(static_cast<int>(r), d_gh + (t * B + r0) * 3 * H, 3 * H, 3 * H, slab, acc);
          for (int64_t i = 0; i < r; ++i) std::memcpy(back + (r0 + i) * H + c, acc[i], sizeof acc[i]);
        }
      }
    }
  });
}
// float32 weight gradients, a^T b for a (K, M) and b (K, N): no pairs to pack in float32, so the
// tile reads both operands where they lie, a row of each a step down K (kTnfRows numbers of a's
// row broadcast, 2U of b's as vectors), kTnfChunk rows of K at a time so that the thread's part
// of a and all of b stay in cache while its rows of the result are carried from chunk to chunk.
constexpr int64_t kTnfChunk = 128;
#ifdef __AVX512F__
constexpr int kTnfRows = 8;  // 16 sums, 2 weights and a broadcast of 32 registers
#else
constexpr int kTnfRows = 6;  // AVX2's 16: 12 sums, 2 weights, a broadcast
#endif

template <int R>
inline void tnf_tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t kc, float* c, int64_t ldc,
                     bool first) {
  Vec acc[R][2];
  for (int i = 0; i < R; ++i)
    for (int cc = 0; cc < 2; ++cc) acc[i][cc] = first ? vzero() : vload(c + i * ldc + cc * U);
  for (int64_t k = 0; k < kc; ++k) {
    const Vec w0 = vload(b + k * ldb), w1 = vload(b + k * ldb + U);
    for (int i = 0; i < R; ++i) {
      acc[i][0] = vfma(a[k * lda + i], w0, acc[i][0]);
      acc[i][1] = vfma(a[k * lda + i], w1, acc[i][1]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int cc = 0; cc < 2; ++cc) vstore(c + i * ldc + cc * U, acc[i][cc]);
}

// tnf_tile for r rows, 1 <= r <= kTnfRows (the rows past the last whole tile).
inline void tnf_tile_rows(int r, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t kc, float* c,
                          int64_t ldc, bool first) {
  switch (r) {
#ifdef __AVX512F__
    case 8: return tnf_tile<8>(a, lda, b, ldb, kc, c, ldc, first);
    case 7: return tnf_tile<7>(a, lda, b, ldb, kc, c, ldc, first);
#endif
    case 6: return tnf_tile<6>(a, lda, b, ldb, kc, c, ldc, first);
    case 5: return tnf_tile<5>(a, lda, b, ldb, kc, c, ldc, first);
    case 4: return tnf_tile<4>(a, lda, b, ldb, kc, c, ldc, first);
    case 3: return tnf_tile<3>(a, lda, b, ldb, kc, c, ldc, first);
    case 2: return tnf_tile<2>(a, lda, b, ldb, kc, c, ldc, first);
    default: return tnf_tile<1>(a, lda, b, ldb, kc, c, ldc, first);
  }
}

// a (K, M), b (K, N) float32, contiguous, N a multiple of 2U -> a^T b (M, N), each thread taking
// a block of c's rows.
Tensor tn_f32(const Tensor& a, const Tensor& b) {
  const int64_t K = a.size(0), M = a.size(1), N = b.size(1);
  Tensor c = at::zeros({M, N}, a.options());
  if (K == 0 || M == 0) return c;
  const float* ap = a.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* cp = c.data_ptr<float>();
  const int64_t blocks = (M + kTnfRows - 1) / kTnfRows, threads = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, blocks, (blocks + threads - 1) / threads, [&](int64_t blk0, int64_t blk1) {
    for (int64_t k0 = 0; k0 < K; k0 += kTnfChunk) {
      const int64_t kc = std::min(kTnfChunk, K - k0);
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t m0 = blk * kTnfRows;
        const int r = static_cast<int>(std::min<int64_t>(kTnfRows, M - m0));
        for (int64_t n = 0; n < N; n += 2 * U)
          tnf_tile_rows(r, ap + k0 * M + m0, M, bp + k0 * N + n, N, kc, cp + m0 * N + n, N, k0 == 0);
      }
    }
  });
  return c;
}
#endif

// run(float()) or run(at::BFloat16()), for the row path's dtype (bfloat16 only where it is built).
template <typename F> void rows_float_or_bf16(at::ScalarType type, const F& run) {
#ifdef CHARLM_ROWS_BF16
  if (type == at::kBFloat16) return run(at::BFloat16());
#endif
  run(float());
}

// Whether the row path takes a layer of H units in this matmul dtype: where its micro-kernel is
// built for this CPU, and the units come in whole blocks of its vector width (twice that, for
// the backward pass's tiles).
bool rows_path(at::ScalarType mm_type, int64_t H) {
#ifdef CHARLM_ROWS_F32
  if (H % (2 * U) != 0) return false;
  if (mm_type == at::kFloat) return true;
#ifdef CHARLM_ROWS_BF16
  if (mm_type == at::kBFloat16) return true;
#endif
#endif
  (void)mm_type, (void)H;
  return false;
}

// What the time loops' recurrent matmuls run on, for mm_type "float32" or "bfloat16".
std::string recurrent_matmul(const std::string& mm_type) {
  const auto type = mm_type == "bfloat16" ? at::kBFloat16 : at::kFloat;
  if (!rows_path(type, 64)) return "at::mm";
#ifdef __AVX512F__
  return type == at::kBFloat16 ? "avx512_bf16" : "avx512";
#else
  return "avx2";
#endif
}

// gi (T, B, 3H) and w_hh_t (H, 3H) in the matmul dtype, h0 (B, H), b_hh (3H) and b_ih (3H, or
// None where gi holds it already) float32 -> out (T, B, H) float32, out in the matmul dtype (the
// same tensor in float32), and the saved gates rz (T, B, 2H), n (T, B, H), ghn = W_hn h + b_hn
// (T, B, H).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gru_forward(const Tensor& gi_, const Tensor& h0_,
                                                               const Tensor& w_hh_t, const Tensor& b_hh_,
                                                               const std::optional<Tensor>& b_ih_) {
  TORCH_CHECK(gi_.dim() == 3 && h0_.dim() == 2, "gru_forward: gi (T, B, 3H) and h0 (B, H)");
  const Tensor gi = gi_.contiguous(), h0 = h0_.contiguous().to(at::kFloat);
  const int64_t T = gi.size(0), B = gi.size(1), H = h0.size(1);
  // with b_ih: b_hh's r and z parts carry b_ir and b_iz as well, and b_in goes to the n part of gi
  Tensor b_hh = b_hh_.contiguous().to(at::kFloat), b_in;
  if (b_ih_.has_value()) {
    const Tensor b_ih = b_ih_->contiguous().to(at::kFloat);
    b_hh = at::cat({b_hh.narrow(0, 0, 2 * H) + b_ih.narrow(0, 0, 2 * H), b_hh.narrow(0, 2 * H, H)});
    b_in = b_ih.narrow(0, 2 * H, H).contiguous();
  }
  const float* b_in_p = b_in.defined() ? b_in.const_data_ptr<float>() : nullptr;
  const auto mm_type = gi.scalar_type();
  TORCH_CHECK(w_hh_t.scalar_type() == mm_type, "gru_forward: gi and w_hh_t must share a dtype");
  auto f = h0.options();
  Tensor out = at::empty({T, B, H}, f), rz = at::empty({T, B, 2 * H}, f);
  Tensor n = at::empty({T, B, H}, f), ghn = at::empty({T, B, H}, f);
  Tensor out_mm = mm_type == at::kFloat ? out : at::empty({T, B, H}, gi.options());
  Tensor h_mm0 = h0.to(mm_type);
#ifdef CHARLM_ROWS_F32
  if (rows_path(mm_type, H)) {
    const Tensor w = for_tiles(w_hh_t, H / U, U, H, 3);
    rows_float_or_bf16(mm_type, [&](auto zero) {
      using scalar_t = decltype(zero);
      forward_rows<scalar_t>(T, B, H, gi.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                             b_hh.const_data_ptr<float>(), b_in_p, h0.const_data_ptr<float>(),
                             h_mm0.const_data_ptr<scalar_t>(),
                             rz.data_ptr<float>(), n.data_ptr<float>(), ghn.data_ptr<float>(), out.data_ptr<float>(),
                             out_mm.data_ptr<scalar_t>());
    });
    return {out, out_mm, rz, n, ghn};
  }
#endif
  Tensor gh = at::empty({B, 3 * H}, gi.options());
  const std::vector<Tensor> mm_steps = out_mm.unbind(0);  // the views made once, not one call a step
  CHARLM_FLOAT_OR_BF16(mm_type, "gru_forward", [&] {
    for (int64_t t = 0; t < T; ++t) {
      const Tensor& h_prev_mm = t == 0 ? h_mm0 : mm_steps[t - 1];
      at::mm_out(gh, h_prev_mm, w_hh_t);
      const float* h_prev = t == 0 ? h0.const_data_ptr<float>() : out.const_data_ptr<float>() + (t - 1) * B * H;
      const scalar_t* gi_t = gi.const_data_ptr<scalar_t>() + t * B * 3 * H;
      const scalar_t* gh_p = gh.const_data_ptr<scalar_t>();
      float* rz_t = rz.data_ptr<float>() + t * B * 2 * H;
      float* n_t = n.data_ptr<float>() + t * B * H;
      float* ghn_t = ghn.data_ptr<float>() + t * B * H;
      float* out_t = out.data_ptr<float>() + t * B * H;
      scalar_t* mm_t = out_mm.data_ptr<scalar_t>() + t * B * H;
      over_rows(B, 3 * H, [&](int64_t b0, int64_t b1) {
        const float* bias = b_hh.const_data_ptr<float>();
        if (b_in_p)
          forward_step<scalar_t, scalar_t, true>(b0, b1, H, gi_t, gh_p, bias, b_in_p, h_prev, rz_t, n_t, ghn_t,
                                                 out_t, mm_t);
        else
          forward_step<scalar_t>(b0, b1, H, gi_t, gh_p, bias, nullptr, h_prev, rz_t, n_t, ghn_t, out_t, mm_t);
      });
    }
  });
  return {out, out_mm, rz, n, ghn};
}

// d_out (T, B, H) float32, what gru_forward saved, w_hh (3H, H) in the matmul dtype
// -> d_gi = dL/d(W_i x + b_i) and d_gh = dL/d(W_h h + b_h), each (T, B, 3H) in the matmul dtype,
// dL/dh0 (B, H), and the bias gradients dL/db_i, dL/db_h (3H), float32.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward(const Tensor& d_out_, const Tensor& h0_, const Tensor& out,
                                                const Tensor& rz, const Tensor& n, const Tensor& ghn,
                                                const Tensor& w_hh) {
  const Tensor d_out = d_out_.contiguous().to(at::kFloat), h0 = h0_.contiguous().to(at::kFloat);
  const int64_t T = out.size(0), B = out.size(1), H = out.size(2);
  const auto mm_type = w_hh.scalar_type();
  auto m = w_hh.options();
  Tensor d_gi = at::empty({T, B, 3 * H}, m), d_gh = at::empty({T, B, 3 * H}, m);
  Tensor dhz = at::zeros({B, H}, h0.options());
  // each thread sums its own rows (at::parallel_for gives a thread one block of rows a call)
  Tensor sums = at::zeros({at::get_num_threads(), 4 * H}, h0.options());
  Tensor d_h0;
#ifdef CHARLM_ROWS_F32
  if (rows_path(mm_type, H)) {
    const Tensor w = for_tiles(w_hh, H / (2 * U), 2 * U, U, 2), back = at::zeros({B, H}, h0.options());
    rows_float_or_bf16(mm_type, [&](auto zero) {
      using scalar_t = decltype(zero);
      backward_rows<scalar_t>(T, B, H, d_out.const_data_ptr<float>(), h0.const_data_ptr<float>(),
                              out.const_data_ptr<float>(), rz.const_data_ptr<float>(), n.const_data_ptr<float>(),
                              ghn.const_data_ptr<float>(), w.const_data_ptr<scalar_t>(), d_gi.data_ptr<scalar_t>(),
                              d_gh.data_ptr<scalar_t>(), dhz.data_ptr<float>(), back.data_ptr<float>(),
                              sums.data_ptr<float>());
    });
    d_h0 = dhz + back;
  } else
#endif
  {
    Tensor back = at::empty({B, H}, m);
    const std::vector<Tensor> dgh_steps = d_gh.unbind(0);
    CHARLM_FLOAT_OR_BF16(mm_type, "gru_backward", [&] {
      for (int64_t t = T - 1; t >= 0; --t) {
        const float* h_prev = t == 0 ? h0.const_data_ptr<float>() : out.const_data_ptr<float>() + (t - 1) * B * H;
        const scalar_t* back_p = t == T - 1 ? nullptr : back.const_data_ptr<scalar_t>();
        const float* do_t = d_out.const_data_ptr<float>() + t * B * H;
        const float* rz_t = rz.const_data_ptr<float>() + t * B * 2 * H;
        const float* n_t = n.const_data_ptr<float>() + t * B * H;
        const float* g_t = ghn.const_data_ptr<float>() + t * B * H;
        scalar_t* di_t = d_gi.data_ptr<scalar_t>() + t * B * 3 * H;
        scalar_t* dg_t = d_gh.data_ptr<scalar_t>() + t * B * 3 * H;
        float* dz = dhz.data_ptr<float>();
        over_rows(B, 3 * H, [&](int64_t b0, int64_t b1) {
          backward_step<scalar_t>(b0, b1, H, do_t, back_p, dz, rz_t, n_t, g_t, h_prev, di_t, dg_t,
                                  sums.data_ptr<float>() + at::get_thread_num() * 4 * H);
        });
        at::mm_out(back, dgh_steps[t], w_hh);
      }
    });
    d_h0 = dhz + back.to(at::kFloat);
  }
  Tensor total = sums.sum(0);  // d_r, d_z, d_n, d_n * r
  Tensor d_b_ih = total.narrow(0, 0, 3 * H).clone();
  Tensor d_b_hh = at::cat({total.narrow(0, 0, 2 * H), total.narrow(0, 3 * H, H)});
  return {d_gi, d_gh, d_h0, d_b_ih, d_b_hh};
}

#ifdef CHARLM_ROWS_BF16
// Weight gradients, a^T b for a (K, M) and b (K, N) bfloat16, both positions x features: the
// pair dot product wants pairs of rows of K side by side in both operands, so each thread packs
// kTnPairs pairs of rows at a time (its own rows of the result from a, all of b) into panels in
// cache and runs the micro-kernel over them, its rows of the float32 result carried from chunk to
// chunk. oneDNN's matmul takes this product (its first operand transposed) 15-30% longer at the
// GRU's and the head's shapes (docs/speed.md).
constexpr int64_t kTnPairs = 256;
constexpr int kTnRows = 8;       // rows of the result a tile
constexpr int kTnCols = 2 * U;   // columns of the result a tile

// Pairs of rows 2p, 2p + 1 (p in [p0, p0 + np); a row past K reads as zeros) of x (row stride ld),
// columns [c0, c0 + width), as 32-bit words (row 2p in the low half), in panels of pw columns:
// word (p, j) at out[(j / pw) * np * pw + (p - p0) * pw + j % pw]. width a multiple of 32; pw 8
// (a's panels, kTnRows) or a multiple of 32 (b's, kTnCols).
void pack_pairs(const uint16_t* x, int64_t ld, int64_t K, int64_t p0, int64_t np, int64_t c0, int64_t width,
                int64_t pw, uint32_t* out) {
  const __m512i first = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i second = _mm512_add_epi16(first, _mm512_set1_epi16(16));
  for (int64_t p = 0; p < np; ++p) {
    const int64_t k0 = 2 * (p0 + p), k1 = k0 + 1;
    const uint16_t* r0 = x + k0 * ld + c0;
    const uint16_t* r1 = x + k1 * ld + c0;
    for (int64_t j = 0; j < width; j += 32) {
      const __m512i lo = _mm512_loadu_si512(r0 + j);
      const __m512i hi = k1 < K ? _mm512_loadu_si512(r1 + j) : _mm512_setzero_si512();
      const __m512i w0 = _mm512_permutex2var_epi16(lo, first, hi), w1 = _mm512_permutex2var_epi16(lo, second, hi);
      uint32_t* to = out + (j / pw) * np * pw + p * pw + j % pw;
      if (pw >= 32) {
        _mm512_storeu_si512(to, w0);
        _mm512_storeu_si512(to + 16, w1);
      } else {  // pw == 8: four panels
        const int64_t step = np * pw;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), _mm512_castsi512_si256(w0));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + step), _mm512_extracti64x4_epi64(w0, 1));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + 2 * step), _mm512_castsi512_si256(w1));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + 3 * step), _mm512_extracti64x4_epi64(w1, 1));
      }
    }
  }
}

// pack_pairs for 8 columns (pw 8), one word at a time.
void pack_pairs_narrow(const uint16_t* x, int64_t ld, int64_t K, int64_t p0, int64_t np, int64_t c0, uint32_t* out) {
  for (int64_t p = 0; p < np; ++p) {
    const int64_t k0 = 2 * (p0 + p), k1 = k0 + 1;
    for (int64_t j = 0; j < kTnRows; ++j) {
      const uint32_t lo = x[k0 * ld + c0 + j], hi = k1 < K ? x[k1 * ld + c0 + j] : 0u;
      out[p * kTnRows + j] = lo | (hi << 16);
    }
  }
}

// Rows i < kTnRows of c, columns [0, 2U): (c's own values, unless first) + the sum over np pairs
// of a's words (an np x kTnRows panel) times b's (an np x 2U panel).
inline void tn_tile(const uint32_t* ap, const uint32_t* bp, int64_t np, float* c, int64_t ldc, bool first) {
  __m512 acc[kTnRows][2];
  for (int i = 0; i < kTnRows; ++i)
    for (int cc = 0; cc < 2; ++cc)
      acc[i][cc] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + cc * U);
  for (int64_t p = 0; p < np; ++p) {
    const __m512bh w0 = as_bh(_mm512_loadu_si512(bp + p * kTnCols));
    const __m512bh w1 = as_bh(_mm512_loadu_si512(bp + p * kTnCols + U));
    for (int i = 0; i < kTnRows; ++i) {
      const __m512bh a = as_bh(_mm512_set1_epi32(static_cast<int32_t>(ap[p * kTnRows + i])));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, w0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, w1);
    }
  }
  for (int i = 0; i < kTnRows; ++i)
    for (int cc = 0; cc < 2; ++cc) _mm512_storeu_ps(c + i * ldc + cc * U, acc[i][cc]);
}

// a (K, M), b (K, N) bfloat16, contiguous, M a multiple of kTnRows and N of kTnCols -> a^T b (M, N)
// float32, each thread taking a block of c's rows.
Tensor tn_pairs(const Tensor& a, const Tensor& b) {
  const int64_t K = a.size(0), M = a.size(1), N = b.size(1), pairs = (K + 1) / 2;
  const auto f = a.options().dtype(at::kFloat);
  Tensor c = pairs == 0 ? at::zeros({M, N}, f) : at::empty({M, N}, f);
  const uint16_t* ap = reinterpret_cast<const uint16_t*>(a.const_data_ptr<at::BFloat16>());
  const uint16_t* bp = reinterpret_cast<const uint16_t*>(b.const_data_ptr<at::BFloat16>());
  float* cp = c.data_ptr<float>();
  const int64_t blocks = M / kTnRows, threads = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, blocks, (blocks + threads - 1) / threads, [&](int64_t blk0, int64_t blk1) {
    const int64_t m0 = blk0 * kTnRows, width = (blk1 - blk0) * kTnRows;
    std::vector<uint32_t> a_pack(kTnPairs * width), b_pack(kTnPairs * N);
    for (int64_t p0 = 0; p0 < pairs; p0 += kTnPairs) {
      const int64_t np = std::min(kTnPairs, pairs - p0);
      // this thread's columns of a, 32 at a time (the last 8s one by one), then all of b
      int64_t j = 0;
      for (; j + 32 <= width; j += 32)
        pack_pairs(ap, M, K, p0, np, m0 + j, 32, kTnRows, a_pack.data() + j * np);
      for (; j < width; j += kTnRows)
        pack_pairs_narrow(ap, M, K, p0, np, m0 + j, a_pack.data() + j * np);
      pack_pairs(bp, N, K, p0, np, 0, N, kTnCols, b_pack.data());
      for (int64_t i = 0; i < width; i += kTnRows)
        for (int64_t n = 0; n < N; n += kTnCols)
          tn_tile(a_pack.data() + i * np, b_pack.data() + n * np, np, cp + (m0 + i) * N + n, N, p0 == 0);
    }
  });
  return c;
}
#endif

// Whether mm_tn takes a (K, M) and b (K, N) of this dtype ("float32", "bfloat16") through
// charlm's kernels: bfloat16's pair kernel (AVX-512 BF16 without AMX; M a multiple of 8, N of
// 32) or float32's tile (AVX-512 or AVX2 with FMA; N a multiple of 2U).
bool tn_kernel(const std::string& dtype, int64_t M, int64_t N) {
#ifdef CHARLM_ROWS_BF16
  if (dtype == "bfloat16") return M % kTnRows == 0 && N % kTnCols == 0;
#endif
#ifdef CHARLM_ROWS_F32
  if (dtype == "float32") return N % (2 * U) == 0;
#endif
  (void)dtype, (void)M, (void)N;
  return false;
}

// a (K, M), b (K, N) of one dtype, float32 or bfloat16 -> a^T b (M, N) float32: a weight
// gradient, where both operands are positions x features. Through charlm's kernels where
// tn_kernel says (bfloat16's sums then float32 to the end, not rounded to bfloat16 as at::mm's
// result is); elsewhere at::mm.
Tensor mm_tn(const Tensor& a_, const Tensor& b_) {
  TORCH_CHECK(a_.dim() == 2 && b_.dim() == 2 && a_.size(0) == b_.size(0) && a_.scalar_type() == b_.scalar_type(),
              "mm_tn: a (K, M) and b (K, N) of one dtype");
  const auto type = a_.scalar_type();
  const std::string dtype = type == at::kBFloat16 ? "bfloat16" : type == at::kFloat ? "float32" : "";
  if (tn_kernel(dtype, a_.size(1), b_.size(1))) {
#ifdef CHARLM_ROWS_BF16
    if (dtype == "bfloat16") return tn_pairs(a_.contiguous(), b_.contiguous());
#endif
#ifdef CHARLM_ROWS_F32
    if (dtype == "float32") return tn_f32(a_.contiguous(), b_.contiguous());
#endif
  }
  return at::mm(a_.t(), b_).to(at::kFloat);
}

// Decoding's matmuls, y (N, M) = b + x (N, K) @ w (K, M), float32 sums, with the weights laid out
// once (gemv_layout) in blocks of kCols columns, block after block. One row (batch-1 sampling) is
// bound by reading the weights: a block's kCols sums stay in registers over the whole of K while
// its weights are read in order. More rows go through the row path's micro-kernel, tiles of kRows
// rows by 2U columns, where it is built for the dtype; elsewhere at::mm in float32, and row by row
// in bfloat16. The weights and x are float32, or bfloat16 (sample.py precision=bf16: both rounded
// to it, the sums still float32).
constexpr int64_t kCols = 64;

inline float f32_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float bf16_bits(uint16_t u) { return f32_bits(static_cast<uint32_t>(u) << 16); }

// Whether gemv takes more than one row in this dtype: float32 by the micro-kernel where it is
// built (else at::mm, float32 as well); bfloat16 always (at::mm would round its sums to bfloat16).
bool gemv_rows(at::ScalarType type) {
#ifdef CHARLM_ROWS_F32
  if (type == at::kFloat) return true;
#endif
  return type == at::kBFloat16;
}

// w_t (K, M), float32 -> (ceil(M / kCols), K, kCols); bfloat16 -> (ceil(M / kCols), ceil(K / 2),
// kCols, 2), pairs of rows side by side as vdpbf16ps reads them. Padded with zeros.
Tensor gemv_layout(const Tensor& w_t) {
  TORCH_CHECK(w_t.dim() == 2 && (w_t.scalar_type() == at::kFloat || w_t.scalar_type() == at::kBFloat16),
              "gemv_layout: w_t (K, M), float32 or bfloat16");
  const int64_t pair = w_t.scalar_type() == at::kBFloat16 ? 2 : 1;
  const int64_t K = w_t.size(0), M = w_t.size(1), blocks = (M + kCols - 1) / kCols, Kp = (K + pair - 1) / pair * pair;
  Tensor padded = w_t;
  if (M % kCols != 0 || Kp != K) {
    padded = at::zeros({Kp, blocks * kCols}, w_t.options());
    padded.narrow(0, 0, K).narrow(1, 0, M).copy_(w_t);
  }
  if (pair == 1) return padded.reshape({K, blocks, kCols}).permute({1, 0, 2}).contiguous();
  return padded.reshape({Kp / 2, 2, blocks, kCols}).permute({2, 0, 3, 1}).contiguous();
}

struct Gemv {
  const void* x;      // (N, xs): float32, or bfloat16 with K padded to even
  int64_t xs;
  const Tensor* w;    // gemv_layout's blocks
  const float* bias;  // (M) or nullptr
  float* y;           // (N, M)
  int64_t N, M;
};

// acc (kCols) = one row x (K) @ block w (K rows of kCols, or K / 2 pairs of rows), float32 sums.
inline void row_block(const float* x, const float* w, int64_t K, float* acc) {
  for (int64_t k = 0; k < K; ++k) {
    const float xk = x[k];
    const float* row = w + k * kCols;
    for (int64_t c = 0; c < kCols; ++c) acc[c] += xk * row[c];
  }
}
inline void row_block(const at::BFloat16* x, const at::BFloat16* w, int64_t K, float* acc) {
#ifdef CHARLM_PAIRS_BF16
  alignas(64) float sums[1][kCols / U][U];
  tile<1, kCols / U, kCols>(x, K, K, w, sums);
  std::memcpy(acc, sums, sizeof sums);
#else
  // each 32-bit word holds one column's pair of weights, rows k (low half) and k + 1 (high half)
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x);
  const uint32_t* words = reinterpret_cast<const uint32_t*>(w);
#if defined(__AVX2__) && defined(__FMA__)
  __m256 sums[kCols / 8];
  for (int64_t c = 0; c < kCols / 8; ++c) sums[c] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t k = 0; k < K; k += 2) {
    const __m256 x0 = _mm256_set1_ps(bf16_bits(xb[k])), x1 = _mm256_set1_ps(bf16_bits(xb[k + 1]));
    const uint32_t* row = words + (k / 2) * kCols;
    for (int64_t c = 0; c < kCols / 8; ++c) {
      const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 8 * c));
      sums[c] = _mm256_fmadd_ps(x0, _mm256_castsi256_ps(_mm256_slli_epi32(u, 16)), sums[c]);
      sums[c] = _mm256_fmadd_ps(x1, _mm256_castsi256_ps(_mm256_and_si256(u, high)), sums[c]);
    }
  }
  for (int64_t c = 0; c < kCols / 8; ++c) _mm256_storeu_ps(acc + 8 * c, sums[c]);
#else
  for (int64_t k = 0; k < K; k += 2) {
    const float x0 = bf16_bits(xb[k]), x1 = bf16_bits(xb[k + 1]);
    const uint32_t* row = words + (k / 2) * kCols;
    for (int64_t c = 0; c < kCols; ++c) acc[c] += x0 * f32_bits(row[c] << 16) + x1 * f32_bits(row[c] & 0xffff0000u);
  }
#endif
#endif
}

// Columns [c0, c0 + kCols) of one job's y, from block w.
template <typename E>
void gemv_block(const Gemv& g, const E* w, int64_t K, int64_t c0) {
  const int64_t n = std::min(kCols, g.M - c0);
  const E* x = static_cast<const E*>(g.x);
  auto store = [&](int64_t row, int64_t from, int64_t width, const float* sums) {
    float* y = g.y + row * g.M + c0 + from;
    for (int64_t c = 0; c < width; ++c) y[c] = sums[c] + (g.bias ? g.bias[c0 + from + c] : 0.f);
  };
#ifdef CHARLM_ROWS_F32
  if constexpr (std::is_same_v<E, float> || kBf16Tiles) {
    if (g.N > 1) {
      constexpr int64_t pair = std::is_same_v<E, float> ? 1 : 2;
      alignas(64) float acc[kRows][2][U];
      for (int64_t s = 0; s < n; s += 2 * U) {  // 2U columns of the block, for every tile of rows
        for (int64_t r0 = 0; r0 < g.N; r0 += kRows) {
          const int r = static_cast<int>(std::min<int64_t>(kRows, g.N - r0));
          tile_rows<2, kCols>(r, x + r0 * g.xs, g.xs, K, w + s * pair, acc);
          for (int i = 0; i < r; ++i) store(r0 + i, s, std::min<int64_t>(2 * U, n - s), acc[i][0]);
        }
      }
      return;
    }
  }
#endif
  for (int64_t row = 0; row < g.N; ++row) {  // one row, or bfloat16 without the pair products
    alignas(64) float acc[kCols] = {};
    row_block(x + row * g.xs, w, K, acc);
    store(row, 0, n, acc);
  }
}

// Every job's y, their column blocks shared among the threads in one parallel region.
void gemv(const std::vector<Gemv>& jobs) {
  std::vector<int64_t> first{0};  // the first block of each job, in one count over all of them
  int64_t work = 0;
  for (const Gemv& g : jobs) {
    first.push_back(first.back() + g.w->size(0));
    work += g.w->numel() * g.N;
  }
  const int64_t blocks = first.back(), grain = std::max<int64_t>(1, blocks * (1 << 15) / std::max<int64_t>(1, work));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const size_t j = std::upper_bound(first.begin(), first.end(), b) - first.begin() - 1;
      const Gemv& g = jobs[j];
      const int64_t i = b - first[j], K = g.w->size(1) * (g.w->dim() == 4 ? 2 : 1);
      if (g.w->scalar_type() == at::kFloat)
        gemv_block(g, g.w->const_data_ptr<float>() + i * K * kCols, K, i * kCols);
      else
        gemv_block(g, g.w->const_data_ptr<at::BFloat16>() + i * K * kCols, K, i * kCols);
    }
  });
}

// One of decoding's matmuls: y (N, M) float32 = x (N, K) float32 @ w (+ bias), w as gemv_layout's
// blocks, in the decoding dtype, and as w_t (K, M) float32, for at::mm where gemv cannot take the rows.
struct Product {
  Tensor x;
  const Tensor* blocked;
  const Tensor* w_t;
  const Tensor* bias;
  Tensor y;
};

// All of them, in one parallel region where gemv takes them.
void products(const std::vector<Product>& ps) {
  const at::ScalarType type = ps[0].blocked->scalar_type();
  const int64_t N = ps[0].x.size(0);
  if (N == 1 || gemv_rows(type)) {
    std::vector<Tensor> keep;  // the bfloat16 copies of x
    std::vector<Gemv> jobs;
    for (const Product& p : ps) {
      Tensor x = p.x;
      if (type == at::kBFloat16) {
        const int64_t K = x.size(1);
        x = at::constant_pad_nd(x.to(at::kBFloat16), {0, K % 2}).contiguous();
        keep.push_back(x);
      }
      jobs.push_back({x.const_data_ptr(), x.size(1), p.blocked, p.bias ? p.bias->const_data_ptr<float>() : nullptr,
                      p.y.data_ptr<float>(), N, p.y.size(1)});
    }
    gemv(jobs);
    return;
  }
  for (const Product& p : ps) {
    Tensor y = p.y;
    if (p.bias) at::addmm_out(y, *p.bias, p.x, *p.w_t);
    else at::mm_out(y, p.x, *p.w_t);
  }
}

// One step of the stacked GRU and the output layer: byte (N,) and h (L, N, H) float32 ->
// log-probabilities of the next byte (N, V) and the new state (L, N, H), float32. table (V, 3H) is
// the embedding folded into layer 0's input projection (float32); w_ih_t, w_hh_t are transposed
// (in, 3H), float32, and `blocked` holds the same weights in gemv_layout's order: layer k's input
// projection (empty for layer 0) and recurrent weights, for each layer in turn, then the head's.
// The matmuls run in the dtype of `blocked` (float32 or bfloat16), the gates in float32.
std::tuple<Tensor, Tensor> gru_decode(const Tensor& byte, const Tensor& h, const Tensor& table,
                                      const std::vector<Tensor>& w_ih_t, const std::vector<Tensor>& b_ih,
                                      const std::vector<Tensor>& w_hh_t, const std::vector<Tensor>& b_hh,
                                      const Tensor& head_w_t, const Tensor& head_b,
                                      const std::vector<Tensor>& blocked) {
  const int64_t L = h.size(0), N = h.size(1), H = h.size(2), V = head_b.size(0);
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous(), "gru_decode: h float32, contiguous");
  TORCH_CHECK(static_cast<int64_t>(blocked.size()) == 2 * L + 1, "gru_decode: blocked needs 2 L + 1 tensors");
  Tensor h_new = at::empty_like(h);
  Tensor rz = at::empty({N, 2 * H}, h.options()), n = at::empty({N, H}, h.options()), g = at::empty({N, H}, h.options());
  // every layer's recurrent matmul needs only the state read in: all in one region
  Tensor gh_all = at::empty({L, N, 3 * H}, h.options());
  std::vector<Product> recurrent;
  for (int64_t k = 0; k < L; ++k) recurrent.push_back({h[k], &blocked[2 * k + 1], &w_hh_t[k], nullptr, gh_all[k]});
  products(recurrent);
  Tensor x;
  for (int64_t k = 0; k < L; ++k) {
    Tensor gi;
    if (k == 0) {
      gi = table.index_select(0, byte);
    } else {
      gi = at::empty({N, 3 * H}, h.options());
      products({{x, &blocked[2 * k], &w_ih_t[k], &b_ih[k], gi}});
    }
    Tensor out = h_new[k];
    over_rows(N, 3 * H, [&](int64_t b0, int64_t b1) {
      forward_step<float>(b0, b1, H, gi.const_data_ptr<float>(), gh_all[k].const_data_ptr<float>(),
                          b_hh[k].const_data_ptr<float>(), nullptr, h[k].const_data_ptr<float>(),
                          rz.data_ptr<float>(),
                          n.data_ptr<float>(), g.data_ptr<float>(), out.data_ptr<float>(), out.data_ptr<float>());
    });
    x = out;
  }
  Tensor logits = at::empty({N, V}, h.options());
  products({{x, &blocked[2 * L], &head_w_t, &head_b, logits}});
  return {at::log_softmax(logits, -1), h_new};
}

// The next byte from log_probs (N, V) at temperature > 0, by inverse CDF with one uniform number
// per row, drawn from `generator` as torch.rand((N, 1)) would: what charlm.inference.sampling's
// next_byte does without top_k or top_p.
Tensor draw(const Tensor& log_probs_, double temperature, std::optional<at::Generator> generator) {
  const Tensor lp = log_probs_.contiguous().to(at::kFloat);
  const int64_t N = lp.size(0), V = lp.size(1);
  Tensor u = at::rand({N, 1}, generator, lp.options());
  Tensor out = at::empty({N}, lp.options().dtype(at::kLong));
  const float inv_t = static_cast<float>(1.0 / temperature);
  constexpr int64_t kDrawBlock = 16;
  const int64_t blocks = (V + kDrawBlock - 1) / kDrawBlock;
  std::vector<float> e(V), block_sum(blocks);
  for (int64_t i = 0; i < N; ++i) {
    const float* row = lp.const_data_ptr<float>() + i * V;
    float lane[kDrawBlock];  // the largest by lanes, a vector of them, then the largest of those
    for (int64_t l = 0; l < kDrawBlock; ++l) lane[l] = -INFINITY;
    for (int64_t j0 = 0; j0 + kDrawBlock <= V; j0 += kDrawBlock)
      for (int64_t l = 0; l < kDrawBlock; ++l) lane[l] = std::max(lane[l], row[j0 + l] * inv_t);
    float top = -INFINITY;
    for (int64_t j = V / kDrawBlock * kDrawBlock; j < V; ++j) top = std::max(top, row[j] * inv_t);
    for (int64_t l = 0; l < kDrawBlock; ++l) top = std::max(top, lane[l]);
    for (int64_t j = 0; j < V; ++j) e[j] = fast_exp(row[j] * inv_t - top);
    // the CDF by blocks of kDrawBlock bytes: the blocks' sums are independent of each other, where
    // one running sum over all V bytes is V dependent additions
    float total = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      float sum = 0.f;
      for (int64_t j = b * kDrawBlock; j < std::min(V, (b + 1) * kDrawBlock); ++j) sum += e[j];
      block_sum[b] = sum;
    }
    for (int64_t b = 0; b < blocks; ++b) total += block_sum[b];
    // strictly below the total, so that the draw lands on a byte with probability above zero
    const float target = std::min(u.const_data_ptr<float>()[i] * total, std::nextafter(total, 0.f));
    float below = 0.f;  // the CDF before block b
    int64_t b = 0;
    while (b + 1 < blocks && below + block_sum[b] <= target) below += block_sum[b++];
    // the first byte of block b whose CDF passes target; rounding aside, the last likely one
    int64_t pick = -1, last = -1;
    float cdf = below;
    for (int64_t j = b * kDrawBlock; j < std::min(V, (b + 1) * kDrawBlock); ++j) {
      cdf += e[j];
      if (e[j] > 0.f) last = j;
      if (cdf > target && e[j] > 0.f) {
        pick = j;
        break;
      }
    }
    out.data_ptr<int64_t>()[i] = pick >= 0 ? pick : (last >= 0 ? last : V - 1);
  }
  return out;
}

// Up to `steps` bytes written in one call, as that many turns of charlm.inference.sampling's loop
// would: draw the next byte from log_probs (N, V), then step the model on it (gru_decode). Stops
// early, for one text (N = 1), once its last bytes, after `tail` (the bytes written before this
// call), spell `stop` (uint8; empty: never). -> the bytes (k, N) int64, and the log_probs and
// state after the last of them: what the loop would leave, down to the generator's state.
std::tuple<Tensor, Tensor, Tensor> gru_write(const Tensor& log_probs, const Tensor& h, const Tensor& table,
                                             const std::vector<Tensor>& w_ih_t, const std::vector<Tensor>& b_ih,
                                             const std::vector<Tensor>& w_hh_t, const std::vector<Tensor>& b_hh,
                                             const Tensor& head_w_t, const Tensor& head_b,
                                             const std::vector<Tensor>& blocked, double temperature,
                                             int64_t steps, const Tensor& stop_, const Tensor& tail_,
                                             std::optional<at::Generator> generator) {
  const Tensor stop = stop_.to(at::kByte).contiguous(), tail = tail_.to(at::kByte).contiguous();
  const int64_t N = log_probs.size(0), S = stop.numel();
  TORCH_CHECK(S == 0 || N == 1, "gru_write: a stop sequence is for one text");
  std::vector<uint8_t> seen(tail.const_data_ptr<uint8_t>(), tail.const_data_ptr<uint8_t>() + tail.numel());
  Tensor out = at::empty({steps, N}, log_probs.options().dtype(at::kLong));
  Tensor lp = log_probs, state = h.contiguous();
  int64_t k = 0;
  while (k < steps) {
    const Tensor byte = draw(lp, temperature, generator);
    std::memcpy(out.data_ptr<int64_t>() + k * N, byte.const_data_ptr<int64_t>(), N * sizeof(int64_t));
    std::tie(lp, state) = gru_decode(byte, state, table, w_ih_t, b_ih, w_hh_t, b_hh, head_w_t, head_b, blocked);
    ++k;
    if (S > 0) {
      seen.push_back(static_cast<uint8_t>(byte.const_data_ptr<int64_t>()[0]));
      if (static_cast<int64_t>(seen.size()) >= S &&
          std::memcmp(seen.data() + seen.size() - S, stop.const_data_ptr<uint8_t>(), S) == 0)
        break;
    }
  }
  return {out.narrow(0, 0, k), lp, state};
}

// A 32-bit integer hash (lowbias32): the dropout mask's random bits, by element index.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Inverted dropout's mask, float32 in the shape of `like`: each element 1 / (1 - p) with
// probability 1 - p, else 0, from the bits of hash(index, seed); the caller draws seed from
// PyTorch's generator, so that manual_seed and a restored generator state repeat the masks.
// Counter-based and vectorised: F.dropout on the CPU draws each element from mt19937 in turn.
Tensor dropout_mask(const Tensor& like, double p, int64_t seed) {
  TORCH_CHECK(p >= 0 && p < 1, "dropout_mask: p must be in [0, 1)");
  Tensor mask = at::empty(like.sizes(), like.options().dtype(at::kFloat));
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  const double cut = p * 4294967296.0;
  const uint32_t threshold = cut >= 4294967295.0 ? 4294967295U : static_cast<uint32_t>(cut);
  const uint32_t s0 = static_cast<uint32_t>(seed), s1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  float* m = mask.data_ptr<float>();
  at::parallel_for(0, mask.numel(), int64_t{1} << 16, [&](int64_t b, int64_t e) {
    // locals and a 32-bit index: the loop then vectorizes without checks and 64-bit lanes
    float* out = m + b;
    const float keep = scale;
    const uint32_t cut32 = threshold, a = s0, c = s1, first = static_cast<uint32_t>(b);
    const uint32_t n = static_cast<uint32_t>(e - b);
    for (uint32_t k = 0; k < n; ++k) out[k] = mix32(mix32((first + k) ^ a) + c) >= cut32 ? keep : 0.f;
  });
  return mask;
}

// The output layer's log-softmax in training: lp = log_softmax(logits + bias) over each row, one
// pass over logits (N, V) in the matmul dtype (the head's matmul had no bias to add); bias and lp
// float32. The sums run in 16 lanes, so that they vectorize.
constexpr int kLanes = 16;

template <typename M>
void log_softmax_rows_(const M* logits, const float* bias, float* lp, int64_t N, int64_t V) {
  at::parallel_for(0, N, std::max<int64_t>(1, kGrain / V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const M* in = logits + r * V;
      float* out = lp + r * V;
      float top[kLanes], sum[kLanes];
      for (int k = 0; k < kLanes; ++k) top[k] = -INFINITY, sum[k] = 0.f;
      const int64_t whole = V - V % kLanes;
      for (int64_t j = 0; j < whole; j += kLanes)
        for (int k = 0; k < kLanes; ++k) {
          const float v = f32(in[j + k]) + bias[j + k];
          out[j + k] = v;
          top[k] = std::max(top[k], v);
        }
      for (int64_t j = whole; j < V; ++j) {
        out[j] = f32(in[j]) + bias[j];
        top[0] = std::max(top[0], out[j]);
      }
      float most = top[0];
      for (int k = 1; k < kLanes; ++k) most = std::max(most, top[k]);
      for (int64_t j = 0; j < whole; j += kLanes)
        for (int k = 0; k < kLanes; ++k) sum[k] += fast_exp(out[j + k] - most);
      for (int64_t j = whole; j < V; ++j) sum[0] += fast_exp(out[j] - most);
      float total = 0.f;
      for (int k = 0; k < kLanes; ++k) total += sum[k];
      const float shift = most + std::log(total);
      for (int64_t j = 0; j < V; ++j) out[j] -= shift;
    }
  });
}

// logits (N, V) in the matmul dtype, bias (V) -> log_softmax(logits + bias, -1), float32.
Tensor log_softmax_rows(const Tensor& logits_, const Tensor& bias_) {
  const Tensor logits = logits_.contiguous(), bias = bias_.contiguous().to(at::kFloat);
  TORCH_CHECK(logits.dim() == 2 && bias.numel() == logits.size(1), "log_softmax_rows: logits (N, V), bias (V)");
  Tensor lp = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  CHARLM_FLOAT_OR_BF16(logits.scalar_type(), "log_softmax_rows", [&] {
    log_softmax_rows_<scalar_t>(logits.const_data_ptr<scalar_t>(), bias.const_data_ptr<float>(),
                                lp.data_ptr<float>(), logits.size(0), logits.size(1));
  });
  return lp;
}

template <typename M>
void log_softmax_rows_backward_(const float* g, const float* l, M* d, float* all_sums, int64_t N, int64_t V) {
  at::parallel_for(0, N, std::max<int64_t>(1, kGrain / V), [&](int64_t r0, int64_t r1) {
    float* my_sums = all_sums + at::get_thread_num() * V;
    for (int64_t r = r0; r < r1; ++r) {
      const float* gr = g + r * V;
      const float* lr = l + r * V;
      M* dr = d + r * V;
      float part[kLanes] = {};
      const int64_t whole = V - V % kLanes;
      for (int64_t j = 0; j < whole; j += kLanes)
        for (int k = 0; k < kLanes; ++k) part[k] += gr[j + k];
      for (int64_t j = whole; j < V; ++j) part[0] += gr[j];
      float total = 0.f;
      for (int k = 0; k < kLanes; ++k) total += part[k];
#pragma GCC ivdep
      for (int64_t j = 0; j < V; ++j) {
        const float v = gr[j] - fast_exp(lr[j]) * total;
        put(dr, j, v);
        my_sums[j] += v;
      }
    }
  });
}

// Its backward: d_lp, lp (N, V) float32 -> d_logits = d_lp - softmax * rowsum(d_lp) in the dtype
// of `like` (the matmul's), and the bias gradient, d_logits summed over the rows (float32).
std::tuple<Tensor, Tensor> log_softmax_rows_backward(const Tensor& d_lp_, const Tensor& lp_, const Tensor& like) {
  const Tensor d_lp = d_lp_.contiguous().to(at::kFloat), lp = lp_.contiguous();
  const int64_t N = lp.size(0), V = lp.size(1);
  Tensor d_logits = at::empty({N, V}, lp.options().dtype(like.scalar_type()));
  Tensor sums = at::zeros({at::get_num_threads(), V}, lp.options());
  CHARLM_FLOAT_OR_BF16(like.scalar_type(), "log_softmax_rows_backward", [&] {
    log_softmax_rows_backward_<scalar_t>(d_lp.const_data_ptr<float>(), lp.const_data_ptr<float>(),
                                         d_logits.data_ptr<scalar_t>(), sums.data_ptr<float>(), N, V);
  });
  return {d_logits, sums.sum(0)};
}

// How many threads the parallel loops above run on: at::parallel_for is compiled into this file, and
// without OpenMP (-fopenmp) it would run every loop on one thread.
int64_t threads() {
  std::atomic<int64_t> most{1};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const int64_t mine = at::get_thread_num() + 1;
    int64_t seen = most.load();
    while (mine > seen && !most.compare_exchange_weak(seen, mine)) {
    }
  });
  return most.load();
}

}  // namespace

TORCH_LIBRARY(charlm, m) {
  m.def("gru_forward", &gru_forward);
  m.def("gru_backward", &gru_backward);
  m.def("mm_tn", &mm_tn);
  m.def("tn_kernel", &tn_kernel);
  m.def("gru_decode", &gru_decode);
  m.def("gemv_layout", &gemv_layout);
  m.def("draw", &draw);
  m.def("gru_write", &gru_write);
  m.def("dropout_mask", &dropout_mask);
  m.def("log_softmax_rows", &log_softmax_rows);
  m.def("log_softmax_rows_backward", &log_softmax_rows_backward);
  m.def("threads", &threads);
  m.def("recurrent_matmul", &recurrent_matmul);
}

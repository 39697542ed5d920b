// Shared by every file of charlm's C++ kernels: the instruction sets a build has, the scalar
// helpers the gate loops inline (bfloat16 rounding, exp), the row split over threads, and the ops
// each file defines (ops.cpp registers them with PyTorch).
//
// A build is one set of compiler flags (charlm/cpu.py's BUILDS: portable, avx2, avx512,
// avx512bf16, amx); each file tests the macros below, so that one source compiles for all of them.
// charlm/model/native.py compiles the files in this folder for the build a run's plan names.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
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

namespace charlm {

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
// [-20, 20], Cephes' bound for this polynomial; NaN stays NaN, and large arguments saturate to 0
// and 1 (or -1 and 1).
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

// --- the ops, one file each (ops.cpp registers them) ---------------------------------------------

// gru_loops.cpp: the training time loops
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gru_forward(const Tensor& gi, const Tensor& h0,
                                                               const Tensor& w_hh_t, const Tensor& b_hh,
                                                               const std::optional<Tensor>& b_ih);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward(const Tensor& d_out, const Tensor& h0, const Tensor& out,
                                                                const Tensor& rz, const Tensor& n, const Tensor& ghn,
                                                                const Tensor& w_hh);
std::string recurrent_matmul(const std::string& mm_type);
// weight_grads.cpp: a^T b for the weight gradients
bool tn_kernel(const std::string& dtype, int64_t M, int64_t N);
Tensor mm_tn(const Tensor& a, const Tensor& b);
// decoding.cpp: one byte at a time
Tensor gemv_layout(const Tensor& w_t);
std::tuple<Tensor, Tensor> gru_decode(const Tensor& byte, const Tensor& h, const Tensor& table,
                                      const std::vector<Tensor>& w_ih_t, const std::vector<Tensor>& b_ih,
                                      const std::vector<Tensor>& w_hh_t, const std::vector<Tensor>& b_hh,
                                      const Tensor& head_w_t, const Tensor& head_b,
                                      const std::vector<Tensor>& blocked);
Tensor draw(const Tensor& log_probs, double temperature, std::optional<at::Generator> generator);
std::tuple<Tensor, Tensor, Tensor> gru_write(const Tensor& log_probs, const Tensor& h, const Tensor& table,
                                             const std::vector<Tensor>& w_ih_t, const std::vector<Tensor>& b_ih,
                                             const std::vector<Tensor>& w_hh_t, const std::vector<Tensor>& b_hh,
                                             const Tensor& head_w_t, const Tensor& head_b,
                                             const std::vector<Tensor>& blocked, double temperature,
                                             int64_t steps, const Tensor& stop, const Tensor& tail,
                                             std::optional<at::Generator> generator);
// dropout.cpp
Tensor dropout_mask(const Tensor& like, double p, int64_t seed);
// log_softmax.cpp: the output layer's log-softmax in training
Tensor log_softmax_rows(const Tensor& logits, const Tensor& bias);
std::tuple<Tensor, Tensor> log_softmax_rows_backward(const Tensor& d_lp, const Tensor& lp, const Tensor& like);

}  // namespace charlm

// charlm's fused GRU kernels for the CPU: nn.GRU's equations (reset gate after the recurrent
// matmul), one time step's elementwise work in one pass over the batch, the time loop in C++.
// Built on first use by charlm/model/native.py; where it cannot be built, charlm/model/fused_gru.py
// runs the same loops with PyTorch's operations, with the same results (tests/test_native.py).
//
//   r = sigmoid(gi_r + W_hr h + b_hr)        gi = W_i x + b_i, for all steps at once (caller)
//   z = sigmoid(gi_z + W_hz h + b_hz)
//   n = tanh(gi_n + r * (W_hn h + b_hn))
//   h' = n + z * (h - n)
//
// The matmuls run in the dtype of the weights given (float32, or bfloat16 under bf16 autocast);
// the gates, the state and everything saved for the backward pass stay float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

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
// writes the gates, the new state (float32) and its copy in the matmul dtype.
template <typename M>
void forward_step(int64_t b0, int64_t b1, int64_t H, const M* gi, const M* gh, const float* b_hh,
                  const float* h_prev, float* rz, float* n_out, float* ghn_out, float* h_out, M* h_mm) {
  for (int64_t b = b0; b < b1; ++b) {
    const M* gib = gi + b * 3 * H;
    const M* ghb = gh + b * 3 * H;
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
      float n = tanh_(f32(gib[2 * H + j]) + r * ghn);
      float h = n + z * (hp[j] - n);
      r_[j] = r;
      z_[j] = z;
      n_[j] = n;
      g_[j] = ghn;
      ho[j] = h;
      hm[j] = static_cast<M>(h);
    }
  }
}

// gi (T, B, 3H) and w_hh_t (H, 3H) in the matmul dtype, h0 (B, H) and b_hh (3H) float32
// -> out (T, B, H) float32, out in the matmul dtype (the same tensor in float32), and the saved
// gates rz (T, B, 2H), n (T, B, H), ghn = W_hn h + b_hn (T, B, H).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gru_forward(const Tensor& gi_, const Tensor& h0_,
                                                               const Tensor& w_hh_t, const Tensor& b_hh_) {
  TORCH_CHECK(gi_.dim() == 3 && h0_.dim() == 2, "gru_forward: gi (T, B, 3H) and h0 (B, H)");
  const Tensor gi = gi_.contiguous(), h0 = h0_.contiguous().to(at::kFloat), b_hh = b_hh_.contiguous().to(at::kFloat);
  const int64_t T = gi.size(0), B = gi.size(1), H = h0.size(1);
  const auto mm_type = gi.scalar_type();
  TORCH_CHECK(w_hh_t.scalar_type() == mm_type, "gru_forward: gi and w_hh_t must share a dtype");
  auto f = h0.options();
  Tensor out = at::empty({T, B, H}, f), rz = at::empty({T, B, 2 * H}, f);
  Tensor n = at::empty({T, B, H}, f), ghn = at::empty({T, B, H}, f);
  Tensor out_mm = mm_type == at::kFloat ? out : at::empty({T, B, H}, gi.options());
  Tensor gh = at::empty({B, 3 * H}, gi.options());
  Tensor h_mm0 = h0.to(mm_type);
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
        forward_step<scalar_t>(b0, b1, H, gi_t, gh_p, b_hh.const_data_ptr<float>(), h_prev, rz_t, n_t, ghn_t,
                               out_t, mm_t);
      });
    }
  });
  return {out, out_mm, rz, n, ghn};
}

// One backward step for rows [b0, b1). dh = d_out + dhz + back, where back = d_gh(t+1) @ W_h
// and dhz = dh(t+1) * z(t+1); writes d_gi = dL/d(W_i x + b_i) and d_gh = dL/d(W_h h + b_h),
// each (B, 3H) in the matmul dtype, and the new dhz; adds the rows' d_r, d_z, d_n and d_n * r
// (float32, before rounding) to sums (4H): the bias gradients.
template <typename M>
void backward_step(int64_t b0, int64_t b1, int64_t H, const float* d_out, const M* back, float* dhz,
                   const float* rz, const float* n_, const float* ghn, const float* h_prev, M* d_gi, M* d_gh,
                   float* sums) {
  for (int64_t b = b0; b < b1; ++b) {
    const float* dob = d_out + b * H;
    const M* bb = back ? back + b * H : nullptr;
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
      di[j] = dg[j] = static_cast<M>(d_r);
      di[H + j] = dg[H + j] = static_cast<M>(d_z);
      di[2 * H + j] = static_cast<M>(d_pre_n);
      dg[2 * H + j] = static_cast<M>(d_hn);
      dz_[j] = dh * z;
      sums[j] += d_r;
      sums[H + j] += d_z;
      sums[2 * H + j] += d_pre_n;
      sums[3 * H + j] += d_hn;
    }
  }
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
  Tensor back = at::empty({B, H}, m);
  Tensor dhz = at::zeros({B, H}, h0.options());
  // each thread sums its own rows (at::parallel_for gives a thread one block of rows a call)
  Tensor sums = at::zeros({at::get_num_threads(), 4 * H}, h0.options());
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
  Tensor d_h0 = dhz + back.to(at::kFloat);
  Tensor total = sums.sum(0);  // d_r, d_z, d_n, d_n * r
  Tensor d_b_ih = total.narrow(0, 0, 3 * H).clone();
  Tensor d_b_hh = at::cat({total.narrow(0, 0, 2 * H), total.narrow(0, 3 * H, H)});
  return {d_gi, d_gh, d_h0, d_b_ih, d_b_hh};
}

// y (M) = b + x (K) @ w_t (K, M), float32, both threads over blocks of columns: batch-1 decoding,
// where a matmul library call costs more than the arithmetic.
void gemv(const float* x, const float* w_t, const float* bias, float* y, int64_t K, int64_t M) {
  at::parallel_for(0, M, 256, [&](int64_t m0, int64_t m1) {
    for (int64_t j = m0; j < m1; ++j) y[j] = bias ? bias[j] : 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float xk = x[k];
      const float* row = w_t + k * M;
#pragma GCC ivdep
      for (int64_t j = m0; j < m1; ++j) y[j] += xk * row[j];
    }
  });
}

// x (N, K) @ w_t (K, M) (+ b (M) where given)
Tensor linear_rows(const Tensor& x, const Tensor& w_t, const Tensor* b) {
  if (x.size(0) == 1) {
    Tensor y = at::empty({1, w_t.size(1)}, x.options());
    gemv(x.const_data_ptr<float>(), w_t.const_data_ptr<float>(), b ? b->const_data_ptr<float>() : nullptr,
         y.data_ptr<float>(), w_t.size(0), w_t.size(1));
    return y;
  }
  return b ? at::addmm(*b, x, w_t) : at::mm(x, w_t);
}

// One step of the stacked GRU and the output layer, float32: byte (N,) and h (L, N, H) ->
// log-probabilities of the next byte (N, V) and the new state (L, N, H). table (V, 3H) is the
// embedding folded into layer 0's input projection; w_ih_t, w_hh_t are transposed (in, 3H).
std::tuple<Tensor, Tensor> gru_decode(const Tensor& byte, const Tensor& h, const Tensor& table,
                                      const std::vector<Tensor>& w_ih_t, const std::vector<Tensor>& b_ih,
                                      const std::vector<Tensor>& w_hh_t, const std::vector<Tensor>& b_hh,
                                      const Tensor& head_w_t, const Tensor& head_b) {
  const int64_t L = h.size(0), N = h.size(1), H = h.size(2);
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous(), "gru_decode: h float32, contiguous");
  Tensor h_new = at::empty_like(h);
  Tensor x;
  Tensor rz = at::empty({N, 2 * H}, h.options()), n = at::empty({N, H}, h.options()), g = at::empty({N, H}, h.options());
  for (int64_t k = 0; k < L; ++k) {
    Tensor hk = h[k];
    Tensor gi = k == 0 ? table.index_select(0, byte) : linear_rows(x, w_ih_t[k], &b_ih[k]);
    Tensor gh = linear_rows(hk, w_hh_t[k], nullptr);
    Tensor out = h_new[k];
    forward_step<float>(0, N, H, gi.const_data_ptr<float>(), gh.const_data_ptr<float>(),
                        b_hh[k].const_data_ptr<float>(), hk.const_data_ptr<float>(), rz.data_ptr<float>(),
                        n.data_ptr<float>(), g.data_ptr<float>(), out.data_ptr<float>(), out.data_ptr<float>());
    x = out;
  }
  Tensor logits = linear_rows(x, head_w_t, &head_b);
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
  std::vector<float> cdf(V);
  for (int64_t i = 0; i < N; ++i) {
    const float* row = lp.const_data_ptr<float>() + i * V;
    float top = -INFINITY;
    for (int64_t j = 0; j < V; ++j) top = std::max(top, row[j] * inv_t);
    for (int64_t j = 0; j < V; ++j) cdf[j] = fast_exp(row[j] * inv_t - top);
    float total = 0.f;
    for (int64_t j = 0; j < V; ++j) cdf[j] = total += cdf[j];
    // strictly below the total, so that the draw lands on a byte with probability above zero
    const float target = std::min(u.const_data_ptr<float>()[i] * total, std::nextafter(total, 0.f));
    int64_t pick = V - 1;
    for (int64_t j = 0; j < V; ++j) {
      if (cdf[j] > target) {
        pick = j;
        break;
      }
    }
    out.data_ptr<int64_t>()[i] = pick;
  }
  return out;
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
    for (int64_t i = b; i < e; ++i) {
      const uint32_t h = mix32(mix32(static_cast<uint32_t>(i) ^ s0) + s1);
      m[i] = h >= threshold ? scale : 0.f;
    }
  });
  return mask;
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
  m.def("gru_decode", &gru_decode);
  m.def("draw", &draw);
  m.def("dropout_mask", &dropout_mask);
  m.def("threads", &threads);
}

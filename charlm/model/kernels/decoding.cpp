// Decoding: one byte at a time through the stacked GRU and the output layer (gru_decode), the next
// byte drawn from its log-probabilities (draw), and many bytes in one call (gru_write), so that
// sampling runs no Python between bytes.
//
// Reference: charlm/model/stepping.py's Stepper and charlm/inference/sampling.py's loop compute the
// same in PyTorch's operations (tests/model/test_kernels.py compares them for every build).
// Why it is fast: batch-1 decoding is bound by reading the weights, so gemv_layout lays each
// matrix out once in blocks of kCols columns that the loop reads in order with kCols sums held
// in registers; more rows take tiles.h's micro-kernel.
// Constants: kCols (64: four AVX-512 or eight AVX2 vectors of sums) and kDrawBlock (the CDF's
// block, so that its sums are independent of each other).
#include "gates.h"
#include "tiles.h"

namespace charlm {
namespace {

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

}  // namespace

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

namespace {

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

}  // namespace

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

}  // namespace charlm

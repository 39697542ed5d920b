// The output layer's log-softmax in training, forward and backward, one pass each over the
// (N, 256) logits: log_softmax_rows adds the bias and normalises each row, reading bfloat16
// logits straight into float32; its backward gives the logits' gradient in the matmul dtype and
// the bias gradient.
//
// Reference: torch.log_softmax(x @ W.T + b) and its autograd backward (charlm/model/head.py;
// tests/model/test_kernels.py). Constants: kLanes (16), so that the row sums vectorise.
#include "kernels.h"

namespace charlm {
namespace {

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

}  // namespace

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

}  // namespace charlm

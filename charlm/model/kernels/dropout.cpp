// Inverted dropout's mask, drawn by hashing each element's index with a seed: dropout_mask.
//
// Reference: F.dropout's semantics (each element zeroed with probability p, the rest scaled by
// 1 / (1 - p)); charlm/model/dropout.py draws the seed from PyTorch's generator, so that
// manual_seed and a restored generator state repeat the masks. Why: F.dropout on the CPU draws
// every element from one mt19937 stream in turn; a counter-based hash vectorises on every thread.
// tests/model/test_kernels.py checks the kept fraction and the repeat under a seed.
#include "kernels.h"

namespace charlm {
namespace {

// A 32-bit integer hash (lowbias32): the dropout mask's random bits, by element index.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

}  // namespace

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

}  // namespace charlm

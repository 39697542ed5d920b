// One time step of the GRU's gates, forward and backward, for a block of rows of the batch: the
// elementwise work between the recurrent matmuls, shared by the training loops (gru_loops.cpp)
// and decoding (decoding.cpp). nn.GRU's equations (reset gate after the recurrent matmul):
//
//   r = sigmoid(gi_r + W_hr h + b_hr)        gi = W_i x (+ b_i)
//   z = sigmoid(gi_z + W_hz h + b_hz)
//   n = tanh(gi_n + r * (W_hn h + b_hn))
//   h' = n + z * (h - n)
//
// Reference: charlm/model/fused_gru.py's forward_loop and backward_loop compute the same in
// PyTorch's operations (tests/model/test_kernels.py holds every build to them).
#pragma once
#include "kernels.h"

namespace charlm {

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
}  // namespace charlm

// The GRU's training time loops: gru_forward and gru_backward, one call per layer and pass.
//
// Computes what charlm/model/fused_gru.py's forward_loop and backward_loop compute in PyTorch's
// operations (the reference; tests/model/test_kernels.py compares them for every build). Two ways
// through: the row path, where tiles.h's micro-kernel does the recurrent matmuls and each thread
// runs every step for its own rows of the batch (no hand-over between threads a step), and one
// at::mm a step with the gates split over the threads, where no micro-kernel is built (the
// portable build) or H is not a whole number of its tiles (rows_path says which).
//
// Constants: kRows and U come from the registers of each instruction set (tiles.h); the layer's
// bias gradients are summed per thread, then over the threads, in a fixed order, so that the
// same thread count gives the same bits.
#include "gates.h"
#include "tiles.h"

namespace charlm {
namespace {

#ifdef CHARLM_ROWS_F32
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

}  // namespace

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

}  // namespace charlm

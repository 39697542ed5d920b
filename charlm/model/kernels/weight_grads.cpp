// Weight gradients, a^T b for a (K, M) and b (K, N) with both operands positions x features:
// mm_tn, and tn_kernel to say which shapes and dtypes it takes through charlm's own code.
//
//   float32, AVX-512 builds: a tile that reads a row of each operand a step down K, kTnfChunk rows
//     of K at a time so that the thread's part of a and all of b stay in cache.
//   bfloat16, avx512bf16 build (AVX-512 BF16 without AMX): the pair kernel, which packs pairs of
//     rows of both operands side by side as vdpbf16ps reads them; float32 sums to the end.
//   elsewhere: at::mm(a.t(), b) (the library's).
//
// Why: oneDNN takes a product whose first operand is transposed markedly slower than the same
// product laid out plainly, at the GRU's and the head's shapes (benchmarks/records/ has the rows,
// and `python benchmarks/kernels.py` times these against the library's).
// Reference: the float32 product of the same operands (tests/model/test_kernels.py).
// Constants: kTnfRows and kTnRows fill the 32 vector registers with sums; kTnfChunk and kTnPairs
// keep a thread's panels inside a 1 MiB L2.
#include "kernels.h"
#include "tiles.h"

namespace charlm {
namespace {

#ifdef __AVX512F__
// float32 weight gradients, a^T b for a (K, M) and b (K, N): no pairs to pack in float32, so the
// tile reads both operands where they lie, a row of each a step down K (kTnfRows numbers of a's
// row broadcast, 2U of b's as vectors), kTnfChunk rows of K at a time so that the thread's part
// of a and all of b stay in cache while its rows of the result are carried from chunk to chunk.
constexpr int64_t kTnfChunk = 128;
constexpr int kTnfRows = 8;  // 16 sums, 2 weights and a broadcast of 32 registers

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
    case 8: return tnf_tile<8>(a, lda, b, ldb, kc, c, ldc, first);
    case 7: return tnf_tile<7>(a, lda, b, ldb, kc, c, ldc, first);
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

#ifdef CHARLM_ROWS_BF16
// Weight gradients, a^T b for a (K, M) and b (K, N) bfloat16, both positions x features: the
// pair dot product wants pairs of rows of K side by side in both operands, so each thread packs
// kTnPairs pairs of rows at a time (its own rows of the result from a, all of b) into panels in
// cache and runs the micro-kernel over them, its rows of the float32 result carried from chunk to
// chunk. oneDNN's matmul takes this product (its first operand transposed) markedly longer at the
// GRU's and the head's shapes: the `mm_tn bf16` row of `python benchmarks/kernels.py --build
// avx512bf16` times both, on a machine that runs this build.
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

}  // namespace

// Whether mm_tn takes a (K, M) and b (K, N) of this dtype ("float32", "bfloat16") through
// charlm's kernels: bfloat16's pair kernel (AVX-512 BF16 without AMX; M a multiple of 8, N of
// 32) or float32's tile (the AVX-512 builds; N a multiple of 2U).
bool tn_kernel(const std::string& dtype, int64_t M, int64_t N) {
#ifdef CHARLM_ROWS_BF16
  if (dtype == "bfloat16") return M % kTnRows == 0 && N % kTnCols == 0;
#endif
#ifdef __AVX512F__
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
#ifdef __AVX512F__
    if (dtype == "float32") return tn_f32(a_.contiguous(), b_.contiguous());
#endif
  }
  return at::mm(a_.t(), b_).to(at::kFloat);
}

}  // namespace charlm

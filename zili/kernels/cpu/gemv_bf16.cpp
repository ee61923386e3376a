// bf16 weight x bf16 activation GEMV / small GEMM with AVX512-BF16 (vdpbf16ps), fp32 accumulation.
//
// A tile is R rows of W times MB rows of x: R * MB fp32 accumulators of 16 lanes; every step
// loads 32 bf16 of each W row once and uses it for all MB rows of x. W is read row-major as the
// checkpoint stores it, so no packed copy exists. The K tail (K % 32) uses masked loads.
#include <immintrin.h>

#include <algorithm>

#include "kernels.h"

namespace zili_cpu {
namespace {

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

template <int R, int MB>
void bf16_tile(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* w, int64_t n0, const Bias& bias,
               void* out, int64_t ldo, OutType out_type) {
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  const uint16_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = w + (n0 + r) * K;

  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      prefetch_ahead(rows[r] + k);
      wv[r] = as_bh(_mm512_loadu_si512(rows[r] + k));
    }
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = as_bh(_mm512_loadu_si512(x + m * ldx + k));
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
    }
  }
  if (k < K) {  // masked tail: the lanes past K load as zero
    const __mmask32 mask = tail_mask32(K - k);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = as_bh(_mm512_maskz_loadu_epi16(mask, rows[r] + k));
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = as_bh(_mm512_maskz_loadu_epi16(mask, x + m * ldx + k));
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float b = bias.at(n0 + r);
    for (int m = 0; m < MB; ++m) store(out, m * ldo + n0 + r, out_type, _mm512_reduce_add_ps(acc[r][m]) + b);
  }
}

// Rows of W per tile: enough independent streams for one row of x, within 32 vector registers.
template <int MB>
constexpr int tile_rows() { return MB == 1 ? 8 : MB == 2 ? 4 : MB <= 4 ? 2 : 1; }

template <int MB>
void bf16_rows(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* w, const Bias& bias, void* out,
               int64_t ldo, OutType out_type, int64_t n_begin, int64_t n_end) {
  constexpr int R = tile_rows<MB>();
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) bf16_tile<R, MB>(x, ldx, K, w, n, bias, out, ldo, out_type);
  for (; n < n_end; ++n) bf16_tile<1, MB>(x, ldx, K, w, n, bias, out, ldo, out_type);
}

}  // namespace

void gemv_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* w, Bias bias, void* out,
               int64_t ldo, OutType out_type, int64_t n_begin, int64_t n_end) {
  // Beyond 8 rows of x, each panel of W rows is used for every group of 8 rows while it is in cache.
  const int64_t panel = M > 8 ? kPanelRows : n_end - n_begin;
  for (int64_t p = n_begin; p < n_end; p += panel) {
    const int64_t p_end = std::min(p + panel, n_end);
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const uint16_t* xs = x + m0 * ldx;
      char* os = static_cast<char*>(out) + m0 * ldo * (out_type == OutType::kBFloat16 ? 2 : 4);
      switch (std::min<int64_t>(8, M - m0)) {
        case 1: bf16_rows<1>(xs, ldx, K, w, bias, os, ldo, out_type, p, p_end); break;
        case 2: bf16_rows<2>(xs, ldx, K, w, bias, os, ldo, out_type, p, p_end); break;
        case 3: bf16_rows<3>(xs, ldx, K, w, bias, os, ldo, out_type, p, p_end); break;
        case 4: bf16_rows<4>(xs, ldx, K, w, bias, os, ldo, out_type, p, p_end); break;
        case 5: bf16_rows<5>(xs, ldx, K, w, bias, os, ldo, out_type, p, p_end); break;
        case 6: bf16_rows<6>(xs, ldx, K, w, bias, os, ldo, out_type, p, p_end); break;
        case 7: bf16_rows<7>(xs, ldx, K, w, bias, os, ldo, out_type, p, p_end); break;
        default: bf16_rows<8>(xs, ldx, K, w, bias, os, ldo, out_type, p, p_end); break;
      }
    }
  }
}

}  // namespace zili_cpu

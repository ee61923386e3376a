// int8 / int4 weight x int8 activation GEMV / small GEMM with AVX512-VNNI (vpdpbusd).
//
// Activations are quantized per block of 32, 64 or 128 inputs (the largest that divides the weight
// group): x ~= scale_b * q, q in [-127, 127].
// Weights keep their unsigned codes (0..255 or 0..15), so vpdpbusd multiplies u8 codes by s8
// activations exactly in int32, and the zero point comes out as one correction per group:
//   y[m, n] = sum_g s[n, g] * (sum_{b in g} scale_b * sum_k codes * q  -  z[n, g] * sum_{b in g} scale_b * sum_k q)
//           = sum_b s[n, g(b)] * scale_b * isum_b  -  sum_g zero_scales[n, g] * group_terms[m, g].
// The int32 block sums are converted to fp32 once per activation block (blocks of 32: once per 64
// inputs, with a per-lane scale vector, since lanes 0-7 and 8-15 of a vpdpbusd sum cover 32 inputs each).
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"

namespace zili_cpu {
namespace {

inline __m512 load16_as_float(const void* x, bool is_bf16, int64_t i) {
  return is_bf16 ? load_bf16(static_cast<const uint16_t*>(x) + i) : _mm512_loadu_ps(static_cast<const float*>(x) + i);
}

// One output less its bias, as a vector whose 16 lanes sum to it: the row's accumulated products acc
// (times its channel scale, per channel) minus its zero-point term sum_g zero_scales[g] * group_terms[g],
// both before the one horizontal sum (a separate sum for the zero-point term cost ~10% of a short-row
// int8 matmul).
// zero_scales nullptr: s * zero_point in their place (scales: the row's s), the same fp32 product.
inline __m512 output_lanes(__m512 acc, bool per_channel, const float* scales, const float* zero_scales,
                           float zero_point, const float* group_terms, int64_t G) {
  if (per_channel) {
    const float zero_scale = zero_scales != nullptr ? zero_scales[0] : scales[0] * zero_point;
    return _mm512_fmadd_ps(acc, _mm512_set1_ps(scales[0]),
                           _mm512_zextps128_ps512(_mm_set_ss(-zero_scale * group_terms[0])));
  }
  __m512 v = acc;
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 mask = tail_mask(G - g);
    const __m512 zs = zero_scales != nullptr
                          ? _mm512_maskz_loadu_ps(mask, zero_scales + g)
                          : _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, scales + g), _mm512_set1_ps(zero_point));
    v = _mm512_fnmadd_ps(zs, _mm512_maskz_loadu_ps(mask, group_terms + g), v);
  }
  return v;
}

// The horizontal sums of a, b, c and d, in that order: two rounds of unpack-and-add leave each 128-bit
// lane with partial sums of all four, then the lanes are added.
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d ab2 = _mm512_castps_pd(ab), cd2 = _mm512_castps_pd(cd);
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab2, cd2)),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(ab2, cd2)));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

inline void store4(void* out, int64_t index, OutType type, __m128 values) {
  if (type == OutType::kBFloat16)
    _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + index),
                     reinterpret_cast<__m128i>(_mm_cvtneps_pbh(values)));
  else
    _mm_storeu_ps(static_cast<float*>(out) + index, values);
}

// Software prefetch into L2 (prefetcht1) one or more tiles ahead: the line at the same place of a later
// tile's row, at least kTilePrefetchBytes ahead. Every line of W is prefetched once, each row's stream
// starts prefetched (a fixed distance ahead of each row ran into the next row of the same tile instead),
// and L1 fill buffers stay free for the loads. Measured against 1024 bytes ahead into L1 (kernels.h):
// 5-25% less time per call on the benchmark shapes, one thread, weights from DRAM.
constexpr int64_t kTilePrefetchBytes = 2048;

inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

// Scale factors of one 64-input chunk at k, lane-wise as vpdpbusd sums it (lane j: inputs k + 4j .. k + 4j + 3).
// Blocks of 64/128: one scale for all lanes. Blocks of 32: lanes 0-7 hold block k/32, lanes 8-15 the next one
// (its group index is clamped at the end of K, where the codes are zero).
template <int BLOCK>
inline __m512 chunk_scale(const float* p, int64_t i0, int64_t i1) {
  if (BLOCK != 32) return _mm512_set1_ps(p[i0]);
  return _mm512_mask_broadcastss_ps(_mm512_set1_ps(p[i0]), 0xff00, _mm_set_ss(p[i1]));
}

// R rows of W x MB rows of x, activation blocks of BLOCK (32, 64 or 128) inputs.
template <int R, int MB, int BLOCK, int BITS>
void quant_tile(const QuantizedRows& xq, int64_t K, const uint8_t* w, const float* scales,
                const float* zero_scales, float zero_point, int64_t group_size, const Bias& bias, int64_t n0,
                void* out, int64_t ldo, OutType out_type, int64_t pf) {  // pf: prefetch distance in bytes
  const int64_t G = xq.num_groups;
  const bool per_channel = G == 1;  // s[n] is applied once, at the end, instead of at every block
  const int64_t row_bytes = BITS == 8 ? K : xq.ld / 2;
  __m512 acc[R][MB];
  __m512i iacc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps(), iacc[r][m] = _mm512_setzero_si512();
  const uint8_t* rows[R];
  const float* row_scales[R];
  for (int r = 0; r < R; ++r) rows[r] = w + (n0 + r) * row_bytes, row_scales[r] = scales + (n0 + r) * G;

  // int32 sums of the activation block(s) ending at k + 64 -> fp32 accumulators, times s[n, g] * scale_b.
  auto flush = [&](int64_t k) {
    const int64_t k0 = BLOCK == 128 ? k - 64 : k;      // first input of the block (of the chunk for 32)
    const int64_t k1 = k + 32 < K ? k + 32 : k;         // the second 32-block of a chunk (BLOCK 32)
    const int64_t b0 = k0 / BLOCK, b1 = k1 / 32;
    const int64_t g0 = k0 / group_size, g1 = k1 / group_size;
    __m512 xs[MB];
    for (int m = 0; m < MB; ++m) xs[m] = chunk_scale<BLOCK>(xq.scales + m * xq.scales_ld, b0, b1);
    for (int r = 0; r < R; ++r) {
      const __m512 ws = per_channel ? _mm512_set1_ps(1.0f) : chunk_scale<BLOCK>(row_scales[r], g0, g1);
      for (int m = 0; m < MB; ++m) {
        const __m512 scale = per_channel ? xs[m] : _mm512_mul_ps(ws, xs[m]);
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][m]), scale, acc[r][m]);
        iacc[r][m] = _mm512_setzero_si512();
      }
    }
  };
  auto accumulate = [&](const __m512i (&wv)[R], int64_t k) {  // 64 inputs starting at k
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = _mm512_loadu_si512(xq.codes + m * xq.ld + k);
      for (int r = 0; r < R; ++r) iacc[r][m] = _mm512_dpbusd_epi32(iacc[r][m], wv[r], xv);
    }
  };

  if (BITS == 8) {
    constexpr int kChunks = BLOCK == 128 ? 2 : 1;  // 64-input chunks per activation block
    int64_t k = 0;
    for (; k + 64 * kChunks <= K; k += 64 * kChunks) {
      for (int c = 0; c < kChunks; ++c) {
        __m512i wv[R];
        for (int r = 0; r < R; ++r) {
          prefetch_l2(rows[r] + k + 64 * c + pf);
          wv[r] = _mm512_loadu_si512(rows[r] + k + 64 * c);
        }
        accumulate(wv, k + 64 * c);
      }
      flush(k + 64 * (kChunks - 1));
    }
    if (k < K) {  // 32 inputs left (blocks of 32 only): masked loads, x codes are zero past K
      __m512i wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi8(0xffffffffull, rows[r] + k);
      accumulate(wv, k);
      flush(k);
    }
  } else {
    const __m512i low_nibbles = _mm512_set1_epi8(0x0f);
    for (int64_t k = 0; k < K; k += 128) {  // 64 bytes = 128 inputs per row (zero codes past K)
      __m512i lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        prefetch_l2(rows[r] + k / 2 + pf);
        const __m512i v = _mm512_loadu_si512(rows[r] + k / 2);
        lo[r] = _mm512_and_si512(v, low_nibbles);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles);
      }
      accumulate(lo, k);
      if (BLOCK != 128) flush(k);
      if (k + 64 < K) {
        accumulate(hi, k + 64);
        flush(k + 64);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m)
      acc[r][m] = output_lanes(acc[r][m], per_channel, row_scales[r],
                               zero_scales != nullptr ? zero_scales + (n0 + r) * G : nullptr, zero_point,
                               xq.group_terms + m * G, G);
  if constexpr (R == 4) {
    const __m128 b = _mm512_castps512_ps128(bias.lanes(n0, 0xf));
    for (int m = 0; m < MB; ++m)
      store4(out, m * ldo + n0, out_type, _mm_add_ps(sum4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]), b));
  } else {
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m)
        store(out, m * ldo + n0 + r, out_type, _mm512_reduce_add_ps(acc[r][m]) + bias.at(n0 + r));
  }
}

template <int MB>
constexpr int tile_rows() { return MB <= 2 ? 4 : MB <= 4 ? 2 : 1; }

template <int MB, int BLOCK, int BITS>
void quant_rows(const QuantizedRows& xq, int64_t K, const uint8_t* w, const float* scales,
                const float* zero_scales, float zero_point, int64_t group_size, const Bias& bias, void* out,
                int64_t ldo, OutType out_type, int64_t n_begin, int64_t n_end) {
  constexpr int R = tile_rows<MB>();
  const int64_t row_bytes = BITS == 8 ? K : xq.ld / 2;
  const int64_t tile_bytes = R * row_bytes;  // prefetch distances: whole tiles (of R rows, then of 1 row)
  const int64_t pf = (kTilePrefetchBytes + tile_bytes - 1) / tile_bytes * tile_bytes;
  const int64_t pf1 = (kTilePrefetchBytes + row_bytes - 1) / row_bytes * row_bytes;
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R)
    quant_tile<R, MB, BLOCK, BITS>(xq, K, w, scales, zero_scales, zero_point, group_size, bias, n, out, ldo, out_type,
                                   pf);
  for (; n < n_end; ++n)
    quant_tile<1, MB, BLOCK, BITS>(xq, K, w, scales, zero_scales, zero_point, group_size, bias, n, out, ldo, out_type,
                                   pf1);
}

template <int BLOCK, int BITS>
void quant_dispatch(const QuantizedRows& xq, int64_t M, int64_t K, const uint8_t* w, const float* scales,
                    const float* zero_scales, float zero_point, int64_t group_size, const Bias& bias, void* out,
                    int64_t ldo, OutType out_type, int64_t n_begin, int64_t n_end) {
  // Beyond 8 rows of x, each panel of W rows is used for every group of 8 rows while it is in cache.
  const int64_t panel = M > 8 ? kPanelRows : n_end - n_begin;
  for (int64_t p = n_begin; p < n_end; p += panel) {
    const int64_t p_end = std::min(p + panel, n_end);
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      QuantizedRows part = xq;
      part.codes += m0 * xq.ld, part.scales += m0 * xq.scales_ld, part.group_terms += m0 * xq.num_groups;
      char* o = static_cast<char*>(out) + m0 * ldo * (out_type == OutType::kBFloat16 ? 2 : 4);
#define ZILI_ROWS(MB) quant_rows<MB, BLOCK, BITS>(part, K, w, scales, zero_scales, zero_point, group_size, bias, o, \
                                                   ldo, out_type, p, p_end)
      switch (std::min<int64_t>(8, M - m0)) {
        case 1: ZILI_ROWS(1); break;
        case 2: ZILI_ROWS(2); break;
        case 3: ZILI_ROWS(3); break;
        case 4: ZILI_ROWS(4); break;
        case 5: ZILI_ROWS(5); break;
        case 6: ZILI_ROWS(6); break;
        case 7: ZILI_ROWS(7); break;
        default: ZILI_ROWS(8); break;
      }
#undef ZILI_ROWS
    }
  }
}

template <int BITS>
void quant_blocks(const QuantizedRows& xq, int64_t M, int64_t K, const uint8_t* w, const float* scales,
                  const float* zero_scales, float zero_point, int64_t group_size, const Bias& bias, void* out,
                  int64_t ldo, OutType out_type, int64_t n_begin, int64_t n_end) {
#define ZILI_BLOCK(B) quant_dispatch<B, BITS>(xq, M, K, w, scales, zero_scales, zero_point, group_size, bias, out, \
                                              ldo, out_type, n_begin, n_end)
  switch (xq.block) {
    case 128: ZILI_BLOCK(128); break;
    case 64: ZILI_BLOCK(64); break;
    default: ZILI_BLOCK(32); break;
  }
#undef ZILI_BLOCK
}

}  // namespace

void quantize_rows(const void* x, bool x_is_bf16, int64_t ldx, int64_t M, int64_t K, int64_t group_size,
                   int64_t block, int8_t* codes, int64_t ld, float* scales, int64_t scales_ld,
                   float* group_terms) {
  const int64_t num_blocks = K / block, num_groups = K / group_size;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t row = m * ldx;
    int8_t* row_codes = codes + m * ld;
    float* row_terms = group_terms + m * num_groups;
    std::fill(row_terms, row_terms + num_groups, 0.0f);
    for (int64_t b = 0; b < num_blocks; ++b) {
      const int64_t k0 = row + b * block;
      __m512 amax = _mm512_setzero_ps();
      for (int64_t i = 0; i < block; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16_as_float(x, x_is_bf16, k0 + i)));
      const float max_abs = _mm512_reduce_max_ps(amax);
      const float scale = max_abs / 127.0f;
      const __m512 inverse = _mm512_set1_ps(max_abs > 0.0f ? 127.0f / max_abs : 0.0f);
      __m512i sum = _mm512_setzero_si512();
      for (int64_t i = 0; i < block; i += 16) {
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16_as_float(x, x_is_bf16, k0 + i), inverse));
        sum = _mm512_add_epi32(sum, q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row_codes + b * block + i), _mm512_cvtsepi32_epi8(q));
      }
      scales[m * scales_ld + b] = scale;
      row_terms[b * block / group_size] += scale * static_cast<float>(_mm512_reduce_add_epi32(sum));
    }
    std::fill(row_codes + K, row_codes + ld, 0);
    std::fill(scales + m * scales_ld + num_blocks, scales + (m + 1) * scales_ld, 0.0f);
  }
}

void gemv_quant(const QuantizedRows& xq, int64_t M, int64_t K, const uint8_t* w, int bits, const float* scales,
                const float* zero_scales, float zero_point, int64_t group_size, Bias bias, void* out, int64_t ldo,
                OutType out_type, int64_t n_begin, int64_t n_end) {
  if (bits == 8) {
    quant_blocks<8>(xq, M, K, w, scales, zero_scales, zero_point, group_size, bias, out, ldo, out_type, n_begin, n_end);
  } else {
    quant_blocks<4>(xq, M, K, w, scales, zero_scales, zero_point, group_size, bias, out, ldo, out_type, n_begin, n_end);
  }
}

}  // namespace zili_cpu

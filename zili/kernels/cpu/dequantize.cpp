// Dequantize rows of an int8 / int4 weight in the kernels' layout (kernels.h) to fp32 or bf16:
// w = codes * s - s * z (zero_scales = s * z, or s * zero_point where it is nullptr), 16 inputs at a time
// (a group, a multiple of 32 inputs, never splits them).
// Used for inputs too large for the GEMV kernels: slices of the weight feed PyTorch's GEMM.
#include <immintrin.h>

#include <utility>

#include "kernels.h"

namespace zili_cpu {
namespace {

// 16 codes (uint8 in an __m128i) -> 16 dequantized values stored at out[0..16).
inline void store16(__m128i codes, __m512 scale, __m512 zero_scale, void* out, int64_t index, OutType type) {
  const __m512 w = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes)), scale, zero_scale);
  if (type == OutType::kBFloat16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + index),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(w)));
  } else {
    _mm512_storeu_ps(static_cast<float*>(out) + index, w);
  }
}

}  // namespace

void dequantize_rows(const uint8_t* w, int bits, int64_t K, const float* scales, const float* zero_scales,
                     float zero_point, int64_t group_size, int64_t n_begin, int64_t n_end, void* out,
                     OutType out_type) {
  const int64_t G = K / group_size;
  const int64_t padded_k = (K + 127) / 128 * 128;
  const int64_t row_bytes = bits == 8 ? K : padded_k / 2;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = w + n * row_bytes;
    const int64_t out_row = (n - n_begin) * K;
    auto group_scales = [&](int64_t k) {
      const int64_t g = k / group_size;
      const float s = scales[n * G + g], zs = zero_scales != nullptr ? zero_scales[n * G + g] : s * zero_point;
      return std::pair<__m512, __m512>(_mm512_set1_ps(s), _mm512_set1_ps(zs));
    };
    if (bits == 8) {
      for (int64_t k = 0; k < K; k += 16) {
        const auto [s, zs] = group_scales(k);
        store16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)), s, zs, out, out_row + k, out_type);
      }
      continue;
    }
    const __m512i low_nibbles = _mm512_set1_epi8(0x0f);
    for (int64_t k = 0; k < K; k += 128) {  // 64 bytes: inputs k..k+63 (low nibbles), k+64..k+127 (high)
      const __m512i v = _mm512_loadu_si512(row + k / 2);
      const __m512i halves[2] = {_mm512_and_si512(v, low_nibbles),
                                 _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles)};
      for (int half = 0; half < 2; ++half) {
        for (int j = 0; j < 4 && k + 64 * half + 16 * j < K; ++j) {  // K is a multiple of 32
          const int64_t k0 = k + 64 * half + 16 * j;
          const auto [s, zs] = group_scales(k0);
          const __m128i codes = j == 0 ? _mm512_extracti32x4_epi32(halves[half], 0)
                                : j == 1 ? _mm512_extracti32x4_epi32(halves[half], 1)
                                : j == 2 ? _mm512_extracti32x4_epi32(halves[half], 2)
                                         : _mm512_extracti32x4_epi32(halves[half], 3);
          store16(codes, s, zs, out, out_row + k0, out_type);
        }
      }
    }
  }
}

}  // namespace zili_cpu

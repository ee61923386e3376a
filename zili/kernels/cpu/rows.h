// Row-wise bf16 helpers of the Llama-family layers, shared by the fused decode layers
// (decode_layer.cpp) and the row ops of row_ops.cpp: RMSNorm, rotary and the gated MLP activation,
// with the roundings of zili/models/llama.py (bf16 activations, fp32 arithmetic, a rounding wherever
// the PyTorch expression produces a bf16 tensor).
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace zili_cpu {

inline float round_bf16(float v) { return bf16_to_float(float_to_bf16(v)); }

// 16 fp32 lanes -> bf16, round to nearest even (vcvtneps2bf16), and back.
inline __m256i to_bf16(__m512 v) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)); }
inline __m512 round_bf16(__m512 v) { return widen_bf16(to_bf16(v)); }
inline void store_bf16(uint16_t* p, __m512 v, __mmask16 mask) { _mm256_mask_storeu_epi16(p, mask, to_bf16(v)); }

// exp(x) to ~1 ulp: x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' expf polynomial, scaled by 2^n.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// out = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))) for each of `rows` rows of `size` values.
inline void rms_norm(const uint16_t* x, int64_t ldx, int64_t rows, int64_t size, const uint16_t* w, float eps,
                     uint16_t* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* xr = x + r * ldx;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < size; i += 16) {
      const __m512 v = load_bf16(xr + i, tail_mask(size - i));
      sum = _mm512_fmadd_ps(v, v, sum);
    }
    const float inverse = 1.0f / std::sqrt(_mm512_reduce_add_ps(sum) / static_cast<float>(size) + eps);
    const __m512 inv = _mm512_set1_ps(inverse);
    for (int64_t i = 0; i < size; i += 16) {
      const __mmask16 mask = tail_mask(size - i);
      const __m512 normed = round_bf16(_mm512_mul_ps(load_bf16(xr + i, mask), inv));
      store_bf16(out + r * ldo + i, _mm512_mul_ps(load_bf16(w + i, mask), normed), mask);
    }
  }
}

// Rotate-half rotary on the first 2 * half channels of one head vector: out[i] = bf16(bf16(x1 c1) +
// bf16(-x2 s1)) and out[half + i] = bf16(bf16(x2 c2) + bf16(x1 s2)) for x1 = x[i], x2 = x[half + i], as
// zili.layers.rotary.apply_rotary rounds in bf16. out may be x.
inline void rotary_row(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t half, uint16_t* out) {
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 mask = tail_mask(half - i);
    const __m512 x1 = load_bf16(x + i, mask), x2 = load_bf16(x + half + i, mask);
    const __m512 c1 = load_bf16(cos + i, mask), s1 = load_bf16(sin + i, mask);
    const __m512 c2 = load_bf16(cos + half + i, mask), s2 = load_bf16(sin + half + i, mask);
    const __m512 minus_x2 = _mm512_sub_ps(_mm512_setzero_ps(), x2);
    store_bf16(out + i, _mm512_add_ps(round_bf16(_mm512_mul_ps(x1, c1)), round_bf16(_mm512_mul_ps(minus_x2, s1))), mask);
    store_bf16(out + half + i, _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, c2)), round_bf16(_mm512_mul_ps(x1, s2))),
               mask);
  }
}

enum class Activation : int64_t { kSilu = 0, kGeluTanh = 1, kGelu = 2, kRelu = 3 };

// The activations in forms that do not cancel: GELU's 1 + erf(x) and 1 + tanh(x) lose most of their
// digits for x < -2 in fp32, erfc(-x) and 2 / (1 + exp(-2x)) do not.
inline float activate(Activation act, float g) {
  switch (act) {
    case Activation::kSilu: return g / (1.0f + std::exp(-g));
    case Activation::kGeluTanh: {  // 0.5 g (1 + tanh(u)) = g / (1 + exp(-2u))
      const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
      return g / (1.0f + std::exp(-2.0f * inner));
    }
    case Activation::kGelu: return 0.5f * g * std::erfc(g * -0.7071067811865476f);
    case Activation::kRelu: return g > 0.0f ? g : 0.0f;
  }
  return g;
}

// bf16(silu(g)) * up for 16 lanes of bf16 values g, up (widened): silu(g) = g / (1 + exp(-g)).
inline __m512 silu_gate(__m512 g, __m512 up) {
  const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
  const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  return _mm512_mul_ps(round_bf16(silu), up);
}

// out (I) = bf16(bf16(act(gate)) * up) for one row gate_up (2I) = [gate | up]; SiLU vectorized.
inline void gate_row(Activation act, const uint16_t* gate_up, int64_t I, uint16_t* out) {
  if (act != Activation::kSilu) {
    for (int64_t i = 0; i < I; ++i) {
      out[i] = float_to_bf16(round_bf16(activate(act, bf16_to_float(gate_up[i]))) * bf16_to_float(gate_up[I + i]));
    }
    return;
  }
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 mask = tail_mask(I - i);
    store_bf16(out + i, silu_gate(load_bf16(gate_up + i, mask), load_bf16(gate_up + I + i, mask)), mask);
  }
}

}  // namespace zili_cpu

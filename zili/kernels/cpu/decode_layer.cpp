// torch.classes.zili_cpu.DecodeLayers: a Llama-family model's decoder layers for a batch of decode
// tokens (one new token per sequence), all layers in one call.
//
// Batch-1 decode spends most of its time reading weights, and the kernels of kernels.h read them
// near the bandwidth bound; what the Python layer added on top was ~50 small PyTorch ops per layer
// (norms, rotary, cache writes, gathers, attention, activation, residual adds), each costing more
// in dispatch than in arithmetic. Here they are plain loops over a few thousand values, and the
// attention reads the paged cache in place (no gathered copy of the context).
//
// The numerics follow zili/models/llama.py with bf16 activations: RMSNorm in fp32 rounded to bf16
// then scaled by the bf16 weight, linears with bf16 outputs, act(gate) rounded before the product
// with up, residual adds rounded to bf16; rotary rounds each product and their sum (rows.h);
// attention computes in fp32 and rounds once (the AMX path multiplies the values by bf16 numerators, as
// PyTorch's CPU flash attention does).
// zili/engine/fused_decode.py decides when this path applies; the Python model is its oracle.
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <immintrin.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"
#include "pool.h"
#include "rows.h"
#include "threads.h"

namespace zili_cpu {
namespace {

// --- linear layers ------------------------------------------------------------------------------

// One linear layer's tensors: a bf16 (N, K) weight, or quantized codes with their group scales
// in the layout of zili/kernels/quant_kernels.py (bits 8 or 4).
struct Linear {
  const at::Tensor* weight = nullptr;
  const at::Tensor* scales = nullptr;
  const at::Tensor* zero_scales = nullptr;  // nullptr: every group's zero point is zero_point
  float zero_point = 0.0f;
  const at::Tensor* bias = nullptr;
  int64_t bits = 16;
  int64_t group_size = 0;
  int64_t out_features = 0;
};

Bias bias_of(const Linear& linear) {
  Bias b;
  if (linear.bias != nullptr) {
    b.data = linear.bias->data_ptr();
    b.is_bf16 = linear.bias->scalar_type() == at::kBFloat16;
  }
  return b;
}

// out (M, N) bf16 = x (M, K) bf16 @ W.T (+ bias), N split across threads.
void run_linear(const Linear& linear, const uint16_t* x, int64_t M, int64_t K, uint16_t* out) {
  const int64_t N = linear.out_features;
  const Bias bias = bias_of(linear);
  if (linear.bits == 16) {
    linear_bf16_threads(x, M, K, static_cast<const uint16_t*>(linear.weight->data_ptr()), bias, out,
                        OutType::kBFloat16, N);
    return;
  }
  linear_quant_threads(x, true, M, K, linear.weight->data_ptr<uint8_t>(), static_cast<int>(linear.bits),
                       linear.scales->data_ptr<float>(),
                       linear.zero_scales != nullptr ? linear.zero_scales->data_ptr<float>() : nullptr,
                       linear.zero_point, linear.group_size, bias, out, OutType::kBFloat16, N);
}

// out (B, I) = bf16(bf16(act(gate)) * up) for gate_up (B, 2I) = [gate | up], vectorized. Rows go to the
// pool from kThreadedGateRows rows on: 16 x 4864 values take tens of microseconds on one thread, and the
// pool's workers are still spinning from the gate_up matmul, so handing them rows costs about one.
constexpr int64_t kThreadedGateRows = 4;

void gate(Activation act, const uint16_t* gate_up, int64_t B, int64_t I, uint16_t* out) {
  parallel_chunks(B, B < kThreadedGateRows ? B : 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) gate_row(act, gate_up + b * 2 * I, I, out + b * I);
  });
}

// --- attention ----------------------------------------------------------------------------------

// The paged cache of zili/engine/paged_attention.py: (layers, 2 [k, v], kv_heads, slots, head_dim)
// in bf16, or int8 with one fp16 scale per (layer, k|v, head, slot) (zili/layers/kv_quant.py).
struct PagedCache {
  void* data;
  const at::Half* scales;  // nullptr for a bf16 cache
  int64_t kv_heads, slots, head_dim, block_size;
  int64_t layer;

  int64_t vector_index(int which, int64_t head, int64_t slot) const {  // in units of vectors
    return ((layer * 2 + which) * kv_heads + head) * slots + slot;
  }
  const uint16_t* bf16_vector(int which, int64_t head, int64_t slot) const {
    return static_cast<const uint16_t*>(data) + vector_index(which, head, slot) * head_dim;
  }
  const int8_t* int8_vector(int which, int64_t head, int64_t slot) const {
    return static_cast<const int8_t*>(data) + vector_index(which, head, slot) * head_dim;
  }
  float scale(int which, int64_t head, int64_t slot) const {
    return static_cast<float>(scales[vector_index(which, head, slot)]);
  }

  // Store one bf16 vector (int8 cache: quantized as zili/layers/kv_quant.py does).
  void store(int which, int64_t head, int64_t slot, const uint16_t* v) const {
    const int64_t index = vector_index(which, head, slot);
    if (scales == nullptr) {
      std::copy(v, v + head_dim, static_cast<uint16_t*>(data) + index * head_dim);
      return;
    }
    float amax = 0.0f;
    for (int64_t d = 0; d < head_dim; ++d) amax = std::max(amax, std::fabs(bf16_to_float(v[d])));
    constexpr float kScaleMin = 6.103515625e-05f, kScaleMax = 65504.0f;  // fp16 smallest normal, largest
    const at::Half stored(std::min(std::max(amax / 127.0f, kScaleMin), kScaleMax));
    const float s = static_cast<float>(stored);
    int8_t* q = static_cast<int8_t*>(data) + index * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) {
      const float r = std::nearbyint(bf16_to_float(v[d]) / s);  // round half to even, as torch.round
      q[d] = static_cast<int8_t>(std::min(std::max(r, -127.0f), 127.0f));
    }
    const_cast<at::Half*>(scales)[index] = stored;
  }
};

// 16 channels of a cached k or v vector from channel d on, as fp32; an int8 cache gives the codes,
// which the caller multiplies by the vector's scale.
inline __m512 load_cached(const PagedCache& cache, int which, int64_t head, int64_t slot, int64_t d, __mmask16 mask) {
  if (cache.scales == nullptr) return load_bf16(cache.bf16_vector(which, head, slot) + d, mask);
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, cache.int8_vector(which, head, slot) + d)));
}

// Positions the attention takes per pass: their keys / values are widened once for all query heads.
constexpr int64_t kRun = 16;

// Up to kRun cached k or v vectors of one head (positions `first`.. of a sequence), dequantized to fp32
// rows of `ld` floats (ld: head_dim rounded up to 16; the padding and rows from n on are 0).
template <typename SlotOf>
void widen_run(const PagedCache& cache, int which, int64_t head, int64_t first, int64_t n, const SlotOf& slot_of,
               float* rows, int64_t ld) {
  const int64_t D = cache.head_dim;
  for (int64_t j = 0; j < kRun; ++j) {
    float* row = rows + j * ld;
    if (j >= n) {
      std::fill(row, row + ld, 0.0f);
      continue;
    }
    const int64_t slot = slot_of(first + j);
    const __m512 scale = _mm512_set1_ps(cache.scales == nullptr ? 1.0f : cache.scale(which, head, slot));
    for (int64_t d = 0; d < ld; d += 16) {
      _mm512_storeu_ps(row + d, _mm512_mul_ps(load_cached(cache, which, head, slot, d, tail_mask(D - d)), scale));
    }
  }
}

// One vector whose lane j is the sum of the lanes of v[j] (a 16 x 16 transpose folded into the adds).
inline __m512 sum_lanes(__m512 v[16]) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [a, b, c, d], each a sum over that lane
    const __m512d x = _mm512_castps_pd(pairs[2 * i]), y = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // across the four 128-bit lanes
  const __m512 q01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], 0xdd));
  const __m512 q23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                   _mm512_shuffle_f32x4(quads[2], quads[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(q01, q23, 0x88), _mm512_shuffle_f32x4(q01, q23, 0xdd));
}

// Lane j: dot(q, keys row j) for the kRun rows of a widened run; q and the rows have ld floats.
inline __m512 dot_run(const float* q, const float* keys, int64_t ld) {
  __m512 partial[kRun];
  for (int j = 0; j < kRun; ++j) partial[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < ld; d += 16) {
    const __m512 qv = _mm512_loadu_ps(q + d);
    for (int j = 0; j < kRun; ++j) partial[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(keys + j * ld + d), partial[j]);
  }
  return sum_lanes(partial);
}

// acc (G rows of ld floats, columns [d, d + 16 NV)) += sum over j < n of p[g * p_g + j * p_j] * values row j
// (fp32 rows `ld` apart, zero-padded past the head size: widen_run), with the G x NV accumulators in registers.
template <int G, int NV>
void accumulate_values(float* acc, int64_t ld, int64_t d, const float* p, int64_t p_g, int64_t p_j, const float* values,
                       int64_t n) {
  __m512 a[G][NV];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < NV; ++c) a[g][c] = _mm512_loadu_ps(acc + g * ld + d + 16 * c);
  for (int64_t j = 0; j < n; ++j) {
    __m512 v[NV];
    for (int c = 0; c < NV; ++c) v[c] = _mm512_loadu_ps(values + j * ld + d + 16 * c);
    for (int g = 0; g < G; ++g) {
      const __m512 pg = _mm512_set1_ps(p[g * p_g + j * p_j]);
      for (int c = 0; c < NV; ++c) a[g][c] = _mm512_fmadd_ps(pg, v[c], a[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + g * ld + d + 16 * c, a[g][c]);
}

using AccumulateValues = void (*)(float*, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t);

template <int G>
constexpr AccumulateValues kAccumulateByWidth[4] = {accumulate_values<G, 1>, accumulate_values<G, 2>,
                                                    accumulate_values<G, 3>, accumulate_values<G, 4>};

// acc (groups rows of ld floats) += p @ values over n widened rows, up to 4 groups x 64 channels in registers at a
// time.
void add_weighted_values(float* acc, int64_t ld, int64_t groups, const float* p, int64_t p_g, int64_t p_j,
                         const float* values, int64_t n) {
  static constexpr const AccumulateValues* kByGroups[4] = {kAccumulateByWidth<1>, kAccumulateByWidth<2>,
                                                           kAccumulateByWidth<3>, kAccumulateByWidth<4>};
  for (int64_t g = 0; g < groups; g += 4) {
    const int64_t G = std::min<int64_t>(4, groups - g);
    for (int64_t d = 0; d < ld; d += 64) {
      const int64_t width = std::min<int64_t>(4, (ld - d) / 16);
      kByGroups[G - 1][width - 1](acc + g * ld, ld, d, p + g * p_g, p_g, p_j, values, n);
    }
  }
}

// Element 2g <- element g, 2g + 1 <- element 16 + g: two rows of 16 bf16 into 16 pairs, the first row's
// value in each pair's low half.
const __m512i kPairUp = [] {
  alignas(64) uint16_t order[32];
  for (int g = 0; g < 16; ++g) {
    order[2 * g] = static_cast<uint16_t>(g);
    order[2 * g + 1] = static_cast<uint16_t>(16 + g);
  }
  return _mm512_load_si512(order);
}();

// acc rows g < G (ld floats), channels [d, d + 32 NB) (within ld) = sum over the n positions of
// p[g][j] * values[j][channel], two positions a vdpbf16ps: the values of positions 2i and 2i + 1 interleave
// channel by channel (unpacklo / unpackhi within 128-bit lanes, which orders the lanes 0-3, 8-11, .. and
// 4-7, 12-15, ..; the stores put the channels back in order).
template <int G, int NB>
void weighted_values_bf16(float* acc, int64_t ld, int64_t d, const uint32_t* pairs, int64_t pairs_ld,
                          const uint16_t* const* values, int64_t n, int64_t D) {
  __m512 a[G][2 * NB];
  __mmask32 masks[NB];
  for (int b = 0; b < NB; ++b) {
    masks[b] = tail_mask32(D - d - 32 * b);
    for (int g = 0; g < G; ++g) a[g][2 * b] = a[g][2 * b + 1] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; 2 * i < n; ++i) {
    const uint16_t* first = values[2 * i];
    const uint16_t* second = 2 * i + 1 < n ? values[2 * i + 1] : first;
    __m512i lo[NB], hi[NB];
    for (int b = 0; b < NB; ++b) {
      const __m512i x = _mm512_maskz_loadu_epi16(masks[b], first + d + 32 * b);
      const __m512i y = _mm512_maskz_loadu_epi16(2 * i + 1 < n ? masks[b] : 0, second + d + 32 * b);  // 0: odd tail
      lo[b] = _mm512_unpacklo_epi16(x, y);
      hi[b] = _mm512_unpackhi_epi16(x, y);
    }
    for (int g = 0; g < G; ++g) {
      const __m512bh pair = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pairs[i * pairs_ld + g])));
      for (int b = 0; b < NB; ++b) {
        a[g][2 * b] = _mm512_dpbf16_ps(a[g][2 * b], reinterpret_cast<__m512bh>(lo[b]), pair);
        a[g][2 * b + 1] = _mm512_dpbf16_ps(a[g][2 * b + 1], reinterpret_cast<__m512bh>(hi[b]), pair);
      }
    }
  }
  const __m512i first16 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second16 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int g = 0; g < G; ++g) {
    for (int b = 0; b < NB; ++b) {
      float* out = acc + g * ld + d + 32 * b;
      const __m512 lo = a[g][2 * b], hi = a[g][2 * b + 1];
      _mm512_storeu_ps(out, _mm512_permutex2var_ps(lo, first16, hi));
      if (d + 32 * b + 16 < ld) _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(lo, second16, hi));
    }
  }
}

using WeightedValuesBf16 = void (*)(float*, int64_t, int64_t, const uint32_t*, int64_t, const uint16_t* const*, int64_t,
                                    int64_t);
constexpr WeightedValuesBf16 kWeightedValuesBf16[4][2] = {
    {weighted_values_bf16<1, 1>, weighted_values_bf16<1, 2>}, {weighted_values_bf16<2, 1>, weighted_values_bf16<2, 2>},
    {weighted_values_bf16<3, 1>, weighted_values_bf16<3, 2>}, {weighted_values_bf16<4, 1>, weighted_values_bf16<4, 2>}};

// acc (groups rows of ld floats, all written) = p @ values over n positions read in place (bf16 rows of D
// channels), p given as bf16 pairs of positions (pair i of head g at pairs[i * pairs_ld + g]); up to 4 heads x
// 64 channels in registers at a time.
void add_values_bf16(float* acc, int64_t ld, int64_t groups, const uint32_t* pairs, int64_t pairs_ld,
                     const uint16_t* const* values, int64_t n, int64_t D) {
  for (int64_t g = 0; g < groups; g += 4) {
    const int64_t G = std::min<int64_t>(4, groups - g);
    for (int64_t d = 0; d < D; d += 64) {
      kWeightedValuesBf16[G - 1][D - d > 32 ? 1 : 0](acc + g * ld, ld, d, pairs + g, pairs_ld, values, n, D);
    }
  }
}

// Which attention decode steps run: 0 = the AMX scores where they apply (bf16 cache, AMX usable), 1 = the
// vector path always (for tests and benchmarks: set_attention_path).
std::atomic<int> g_attention_mode{0};

// Whether decode attention takes the AMX scores for this cache (int8 or bf16) and head size.
bool amx_attention(bool int8_cache, int64_t head_dim) {
  return !int8_cache && head_dim % 2 == 0 && g_attention_mode.load(std::memory_order_relaxed) == 0 && amx_usable();
}

// One (sequence, KV head)'s attention with the scores on AMX (attention_amx.cpp): the `groups` rotated query
// heads q (rows of D bf16) over positions [start, length) of the sequence whose block table is `table`, bf16
// cache. Fills acc (groups rows of ld floats: the softmax numerators times the values) and sums (the
// numerators' sums), as the vector path does. The scores come in runs of 16 positions aligned to multiples
// of 16, which lie in one cache block when the block size is a multiple of 16 and are then read in place;
// otherwise their keys are gathered first. The values are read in place, two positions per bf16 dot product
// (the numerators rounded to bf16 for it; the vector path keeps them in fp32).
void attend_amx(const uint16_t* q, int64_t groups, int64_t D, int64_t ld, const PagedCache& cache, int64_t h,
                const int64_t* table, int64_t start, int64_t length, float scale, float* acc, float* sums) {
  thread_local std::vector<const uint16_t*> keys, values;
  thread_local std::vector<uint16_t> gathered;
  thread_local std::vector<float> scores;
  thread_local std::vector<uint32_t> pairs;
  const int64_t bs = cache.block_size, count = length - start, first = start / 16 * 16;
  const int64_t runs = (length - first + 15) / 16, scores_ld = (groups + 15) / 16 * 16;
  values.resize(count);
  for (int64_t i = 0, block = start / bs, offset = start % bs; i < count; ++i) {
    values[i] = cache.bf16_vector(1, h, table[block] * bs + offset);
    if (++offset == bs) {
      offset = 0;
      ++block;
    }
  }
  keys.resize(runs);
  if (bs % 16 == 0) {
    for (int64_t r = 0; r < runs; ++r) {
      const int64_t p = first + 16 * r;
      keys[r] = cache.bf16_vector(0, h, table[p / bs] * bs + p % bs);
    }
  } else {
    gathered.assign(runs * 16 * D, 0);
    for (int64_t i = 0; i < count; ++i) {  // the key beside each value: same slot, k half of the cache
      const int64_t row = start + i - first;
      const uint16_t* key = values[i] - (cache.vector_index(1, h, 0) - cache.vector_index(0, h, 0)) * D;
      std::copy(key, key + D, gathered.data() + row * D);
    }
    for (int64_t r = 0; r < runs; ++r) keys[r] = gathered.data() + r * 16 * D;
  }
  scores.resize(runs * 16 * scores_ld);
  amx_attention_scores(q, D, groups, D, keys.data(), D, runs, scores.data(), scores_ld);
  // Softmax numerators over the context's rows, 16 heads a vector, summed in fp32 and kept as bf16 pairs of
  // positions for the values' dot products: rounded to bf16 as PyTorch's CPU flash attention rounds them
  // before its p @ v.
  const float* s = scores.data() + (start - first) * scores_ld;
  const __m512 scale_v = _mm512_set1_ps(scale);
  pairs.resize(static_cast<size_t>((count + 1) / 2 * scores_ld));
  for (int64_t h0 = 0; h0 < groups; h0 += 16) {
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < count; ++i) top = _mm512_max_ps(top, _mm512_loadu_ps(s + i * scores_ld + h0));
    auto numerator = [&](int64_t i) {  // exp(scale (score - top)); scale > 0, so this is exp(x - max x)
      return exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + i * scores_ld + h0), top), scale_v));
    };
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < count; i += 2) {
      const __m512 p0 = numerator(i), p1 = i + 1 < count ? numerator(i + 1) : _mm512_setzero_ps();
      sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
      const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p1, p0));  // [p0 | p1] as bf16
      _mm512_storeu_si512(pairs.data() + i / 2 * scores_ld + h0, _mm512_permutexvar_epi16(kPairUp, both));
    }
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, sum);
    for (int64_t g = h0; g < std::min<int64_t>(groups, h0 + 16); ++g) sums[g] = lanes[g - h0];
  }
  add_values_bf16(acc, ld, groups, pairs.data(), scores_ld, values.data(), count, D);
}

struct AttentionShape {
  int64_t q_heads, kv_heads, head_dim, rotary_dim, sliding_window;  // sliding_window 0: none
  float scale;
};

// For every sequence b and KV head h: rotate q / k, store k / v at the sequence's new slot, then
// attend its query heads over the sequence's context (read from the cache in place).
// qkv: (B, (Hq + 2 Hkv) * D) bf16, modified (rotated, normed); out: (B, Hq * D) bf16.
void attention(uint16_t* qkv, int64_t B, const AttentionShape& shape, const PagedCache& cache,
               const uint16_t* q_norm, const uint16_t* k_norm, float eps, const at::Tensor& cos,
               const at::Tensor& sin, const int64_t* tables, int64_t table_width, const int64_t* lens,
               uint16_t* out) {
  const int64_t D = shape.head_dim, Hq = shape.q_heads, Hkv = shape.kv_heads, groups = Hq / Hkv;
  const int64_t row = (Hq + 2 * Hkv) * D, half = shape.rotary_dim / 2;
  const auto* cos_data = static_cast<const uint16_t*>(cos.data_ptr());
  const auto* sin_data = static_cast<const uint16_t*>(sin.data_ptr());
  const int64_t cos_ld = cos.stride(0), sin_ld = sin.stride(0);
  const int64_t ld = (D + 15) / 16 * 16;  // fp32 rows of q, widened k / v and acc, padded with 0
  const bool amx = amx_attention(cache.scales != nullptr, D);
  parallel_chunks(B * Hkv, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> q, acc, scores, run, sums;
    q.assign(groups * ld, 0.0f);
    acc.resize(groups * ld);
    run.resize(kRun * ld);
    sums.resize(groups);
    auto write_output = [&](int64_t b, int64_t h) {  // out = acc / sums, rounded to bf16
      for (int64_t g = 0; g < groups; ++g) {
        uint16_t* o = out + b * Hq * D + (h * groups + g) * D;
        const __m512 inverse = _mm512_set1_ps(1.0f / sums[g]);
        for (int64_t d = 0; d < D; d += 16) {
          store_bf16(o + d, _mm512_mul_ps(_mm512_loadu_ps(&acc[g * ld + d]), inverse), tail_mask(D - d));
        }
      }
    };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      uint16_t* base = qkv + b * row;
      const uint16_t* cs = cos_data + b * cos_ld;
      const uint16_t* sn = sin_data + b * sin_ld;
      auto rotate = [&](uint16_t* v) { rotary_row(v, cs, sn, half, v); };  // in place
      uint16_t* k = base + (Hq + h) * D;
      uint16_t* v = base + (Hq + Hkv + h) * D;
      if (k_norm != nullptr) rms_norm(k, D, 1, D, k_norm, eps, k, D);
      rotate(k);
      const int64_t length = lens[b], position = length - 1;
      const int64_t* table = tables + b * table_width;
      auto slot_of = [&](int64_t p) { return table[p / cache.block_size] * cache.block_size + p % cache.block_size; };
      cache.store(0, h, slot_of(position), k);
      cache.store(1, h, slot_of(position), v);
      for (int64_t g = 0; g < groups; ++g) {
        uint16_t* qh = base + (h * groups + g) * D;
        if (q_norm != nullptr) rms_norm(qh, D, 1, D, q_norm, eps, qh, D);
        rotate(qh);
        if (amx) continue;  // the AMX scores read the bf16 heads in place
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(&q[g * ld + d], load_bf16(qh + d, tail_mask(D - d)));
      }
      const int64_t start = shape.sliding_window > 0 ? std::max<int64_t>(0, length - shape.sliding_window) : 0;
      if (amx) {
        attend_amx(base + h * groups * D, groups, D, ld, cache, h, table, start, length, shape.scale, acc.data(),
                   sums.data());
        write_output(b, h);
        continue;
      }
      const int64_t count = length - start, padded = (count + kRun - 1) / kRun * kRun;
      // scores (groups rows of `padded`), kRun positions at a time: each key is widened once for all groups
      scores.resize(groups * padded);
      const __m512 scale = _mm512_set1_ps(shape.scale);
      for (int64_t r = 0; r < count; r += kRun) {
        widen_run(cache, 0, h, start + r, std::min(kRun, count - r), slot_of, run.data(), ld);
        for (int64_t g = 0; g < groups; ++g) {
          _mm512_storeu_ps(scores.data() + g * padded + r, _mm512_mul_ps(dot_run(q.data() + g * ld, run.data(), ld), scale));
        }
      }
      // softmax numerators in place (0 past `count`), and their sums
      for (int64_t g = 0; g < groups; ++g) {
        float* s = scores.data() + g * padded;
        __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int64_t r = 0; r < count; r += kRun) top = _mm512_mask_max_ps(top, tail_mask(count - r), top, _mm512_loadu_ps(s + r));
        const __m512 maximum = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t r = 0; r < count; r += kRun) {
          const __m512 p = _mm512_maskz_mov_ps(tail_mask(count - r), exp16(_mm512_sub_ps(_mm512_loadu_ps(s + r), maximum)));
          _mm512_storeu_ps(s + r, p);
          sum = _mm512_add_ps(sum, p);
        }
        sums[g] = _mm512_reduce_add_ps(sum);
      }
      // acc = p @ values, kRun positions at a time, up to 4 groups x 64 channels in registers
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t r = 0; r < count; r += kRun) {
        const int64_t n = std::min(kRun, count - r);
        widen_run(cache, 1, h, start + r, n, slot_of, run.data(), ld);
        add_weighted_values(acc.data(), ld, groups, scores.data() + r, padded, 1, run.data(), n);
      }
      write_output(b, h);
    }
  });
}

// The index of the first largest of n floats, a NaN counting as larger than any number (torch.argmax):
// the largest value in one vectorized pass, then the first lane that holds it.
int64_t argmax(const float* v, int64_t n) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 x = _mm512_maskz_loadu_ps(mask, v + i);
    if (_mm512_mask_cmp_ps_mask(mask, x, x, _CMP_UNORD_Q) != 0) {
      for (int64_t j = i;; ++j) {
        if (std::isnan(v[j])) return j;
      }
    }
    top = _mm512_mask_max_ps(top, mask, top, x);
  }
  const __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n - i);
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(mask, _mm512_maskz_loadu_ps(mask, v + i), best, _CMP_EQ_OQ);
    if (hit != 0) return i + __builtin_ctz(hit);
  }
  return 0;
}

// --- the layers ---------------------------------------------------------------------------------

const at::Tensor* optional_at(const c10::List<std::optional<at::Tensor>>& list, size_t i, std::vector<at::Tensor>& keep) {
  const std::optional<at::Tensor> t = list.get(i);
  if (!t.has_value()) return nullptr;
  keep[i] = *t;
  return &keep[i];
}

void check_bf16(const at::Tensor* t, const char* what, int64_t size) {
  TORCH_CHECK(t != nullptr && t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->numel() == size,
              what, " must be a contiguous bf16 tensor of ", size, " values");
}

// One linear layer from tensors[first .. first + 3] = weight, scales?, zero_scales?, bias?, checked.
Linear make_linear(const c10::List<std::optional<at::Tensor>>& tensors, size_t first, int64_t bits, int64_t group_size,
                   double zero_point, std::vector<at::Tensor>& keep, const char* name) {
  Linear lin;
  lin.weight = optional_at(tensors, first, keep);
  lin.scales = optional_at(tensors, first + 1, keep);
  lin.zero_scales = optional_at(tensors, first + 2, keep);
  lin.bias = optional_at(tensors, first + 3, keep);
  lin.bits = bits;
  lin.group_size = group_size;
  lin.zero_point = static_cast<float>(zero_point);
  TORCH_CHECK(lin.weight != nullptr && lin.weight->is_contiguous() && lin.weight->dim() == 2 &&
              lin.weight->device().is_cpu(), name, ": weight must be a contiguous 2-D CPU tensor");
  lin.out_features = lin.weight->size(0);
  if (lin.bits == 16) {
    TORCH_CHECK(lin.weight->scalar_type() == at::kBFloat16, name, ": bf16 weight expected");
  } else {
    TORCH_CHECK((lin.bits == 8 || lin.bits == 4) && lin.weight->scalar_type() == at::kByte && lin.scales != nullptr &&
                lin.group_size > 0 && lin.group_size % 32 == 0,
                name, ": quantized weights need uint8 codes, scales and a group size of 32k");
    check_quant_scales(*lin.scales, lin.zero_scales, lin.out_features, -1, name);  // G: checked by check_in_features
  }
  if (lin.bias != nullptr) {
    TORCH_CHECK(lin.bias->is_contiguous() && lin.bias->numel() == lin.out_features &&
                (lin.bias->scalar_type() == at::kBFloat16 || lin.bias->scalar_type() == at::kFloat),
                name, ": bias must be a contiguous fp32 / bf16 (N,) tensor");
  }
  return lin;
}

// The weight of `lin` takes K inputs.
void check_in_features(const Linear& lin, int64_t K, const char* name) {
  const int64_t stored = lin.bits == 4 ? quant_layout(K, 4, lin.group_size).padded_k / 2 : K;
  TORCH_CHECK(lin.weight->size(1) == stored && (lin.bits == 16 || (K % lin.group_size == 0 &&
              lin.scales->size(1) == K / lin.group_size)), name, ": the weight's input size does not match");
}

constexpr const char* kLinearNames[4] = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"};

// One decoder layer's weights and shapes, checked once when the layer is added. Never moves (its
// pointers point into `keep`, which holds the tensors).
struct Layer {
  std::vector<at::Tensor> keep;
  const at::Tensor *input_norm, *post_norm, *q_norm, *k_norm;
  Linear linears[4];
  int64_t index, q_heads, kv_heads, head_dim, sliding_window, block_size, hidden, intermediate;
  Activation activation;
  float eps, scale;
};

// tensors: [input_norm, post_norm, q_norm?, k_norm?, then for qkv, o, gate_up, down: weight, scales?,
//           zero_scales?, bias?]
// ints: [layer, q_heads, kv_heads, head_dim, sliding_window (0 none), block_size, activation,
//        then bits (16 = bf16) and group_size for qkv, o, gate_up, down]
// floats: [rms_norm_eps, attention scale, then the zero point for qkv, o, gate_up, down (used without zero_scales)]
std::unique_ptr<Layer> make_layer(const c10::List<std::optional<at::Tensor>>& tensors, const std::vector<int64_t>& ints,
                                  const std::vector<double>& floats) {
  TORCH_CHECK(tensors.size() == 20 && ints.size() == 15 && floats.size() == 6, "DecodeLayers.add: malformed arguments");
  auto layer = std::make_unique<Layer>();
  Layer& l = *layer;
  l.keep.resize(tensors.size());
  l.index = ints[0];
  l.q_heads = ints[1];
  l.kv_heads = ints[2];
  l.head_dim = ints[3];
  l.sliding_window = ints[4];
  l.block_size = ints[5];
  TORCH_CHECK(ints[6] >= 0 && ints[6] <= 3, "unknown activation");
  l.activation = static_cast<Activation>(ints[6]);
  l.eps = static_cast<float>(floats[0]);
  l.scale = static_cast<float>(floats[1]);
  const int64_t D = l.head_dim, Hq = l.q_heads, Hkv = l.kv_heads;
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && D > 0 && l.block_size > 0 && l.index >= 0, "bad attention shape");
  l.input_norm = optional_at(tensors, 0, l.keep);
  l.post_norm = optional_at(tensors, 1, l.keep);
  l.q_norm = optional_at(tensors, 2, l.keep);
  l.k_norm = optional_at(tensors, 3, l.keep);
  TORCH_CHECK(l.input_norm != nullptr, "input_norm is required");
  l.hidden = l.input_norm->numel();
  const int64_t H = l.hidden;
  check_bf16(l.input_norm, "input_norm", H);
  check_bf16(l.post_norm, "post_norm", H);
  if (l.q_norm != nullptr) check_bf16(l.q_norm, "q_norm", D);
  if (l.k_norm != nullptr) check_bf16(l.k_norm, "k_norm", D);
  for (int i = 0; i < 4; ++i) {
    l.linears[i] = make_linear(tensors, 4 + 4 * i, ints[7 + 2 * i], ints[8 + 2 * i], floats[2 + i], l.keep,
                               kLinearNames[i]);
  }
  l.intermediate = l.linears[2].out_features / 2;
  TORCH_CHECK(l.linears[0].out_features == (Hq + 2 * Hkv) * D && l.linears[1].out_features == H &&
              l.linears[3].out_features == H && l.linears[2].out_features == 2 * l.intermediate,
              "DecodeLayers.add: linear shapes do not match the attention / hidden sizes");
  const int64_t in_features[4] = {H, Hq * D, H, l.intermediate};
  for (int i = 0; i < 4; ++i) check_in_features(l.linears[i], in_features[i], kLinearNames[i]);
  return layer;
}

// Buffers for one layer's (or the head's) intermediate rows: carved from this thread's scratch, which
// grows to the largest step seen and is then reused by every layer and step (nothing is zeroed: each
// buffer is written before it is read). At 16 rows, vectors allocated and zeroed per layer cost
// ~0.6 ms a step (gate_up alone is 311 KB, past malloc's mmap threshold).
template <size_t N>
std::array<uint16_t*, N> scratch_rows(const std::array<int64_t, N>& sizes) {
  thread_local std::unique_ptr<uint16_t[]> storage;
  thread_local size_t capacity = 0;
  size_t total = 32;  // alignment slack
  for (int64_t size : sizes) total += (static_cast<size_t>(size) + 31) / 32 * 32;  // 64-byte steps
  if (capacity < total) {
    storage.reset(new uint16_t[total]);
    capacity = total;
  }
  auto address = (reinterpret_cast<uintptr_t>(storage.get()) + 63) & ~uintptr_t{63};
  std::array<uint16_t*, N> buffers;
  for (size_t i = 0; i < N; ++i) {
    buffers[i] = reinterpret_cast<uint16_t*>(address);
    address += (static_cast<size_t>(sizes[i]) + 31) / 32 * 64;
  }
  return buffers;
}

// One layer on x (B, H) bf16, the residual stream, in place.
void run_layer(const Layer& l, uint16_t* x, int64_t B, const PagedCache& cache, const at::Tensor& cos,
               const at::Tensor& sin, const int64_t* tables, int64_t width, const int64_t* lens) {
  const int64_t H = l.hidden, D = l.head_dim, Hq = l.q_heads, intermediate = l.intermediate;
  const AttentionShape shape{Hq, l.kv_heads, D, cos.size(1), l.sliding_window, l.scale};
  const auto buffers = scratch_rows<6>(
      {B * H, B * l.linears[0].out_features, B * Hq * D, B * H, B * 2 * intermediate, B * intermediate});
  uint16_t *normed = buffers[0], *qkv = buffers[1], *attn = buffers[2], *projected = buffers[3],
           *gate_up = buffers[4], *gated = buffers[5];
  auto add_residual = [&](const uint16_t* y) {  // x = bf16(x + y)
    for (int64_t i = 0; i < B * H; i += 16) {
      const __mmask16 mask = tail_mask(B * H - i);
      store_bf16(x + i, _mm512_add_ps(load_bf16(x + i, mask), load_bf16(y + i, mask)), mask);
    }
  };
  auto data = [](const at::Tensor* t) { return t ? static_cast<const uint16_t*>(t->data_ptr()) : nullptr; };

  // Each part is an op to torch.profiler (benchmarks/profile_decode.py reports them); without a profiler a
  // scope costs a thread-local check.
  {
    RECORD_FUNCTION("zili_cpu::rms_norm", std::vector<c10::IValue>());
    rms_norm(x, H, B, H, data(l.input_norm), l.eps, normed, H);
  }
  {
    RECORD_FUNCTION("zili_cpu::qkv_proj", std::vector<c10::IValue>());
    run_linear(l.linears[0], normed, B, H, qkv);
  }
  {
    RECORD_FUNCTION("zili_cpu::attention", std::vector<c10::IValue>());
    attention(qkv, B, shape, cache, data(l.q_norm), data(l.k_norm), l.eps, cos, sin, tables, width, lens, attn);
  }
  {
    RECORD_FUNCTION("zili_cpu::o_proj", std::vector<c10::IValue>());
    run_linear(l.linears[1], attn, B, Hq * D, projected);
    add_residual(projected);
  }
  {
    RECORD_FUNCTION("zili_cpu::rms_norm", std::vector<c10::IValue>());
    rms_norm(x, H, B, H, data(l.post_norm), l.eps, normed, H);
  }
  const Linear& gate_up_linear = l.linears[2];
  if (l.activation == Activation::kSilu && gate_up_linear.bits == 16 && silu_gate_fusable(B, H, intermediate)) {
    RECORD_FUNCTION("zili_cpu::gate_up", std::vector<c10::IValue>());  // the activation included
    linear_bf16_silu_gated_threads(normed, B, H, static_cast<const uint16_t*>(gate_up_linear.weight->data_ptr()),
                                   intermediate, bias_of(gate_up_linear), gated);
  } else {
    {
      RECORD_FUNCTION("zili_cpu::gate_up", std::vector<c10::IValue>());
      run_linear(gate_up_linear, normed, B, H, gate_up);
    }
    RECORD_FUNCTION("zili_cpu::activation", std::vector<c10::IValue>());
    gate(l.activation, gate_up, B, intermediate, gated);
  }
  RECORD_FUNCTION("zili_cpu::down_proj", std::vector<c10::IValue>());
  run_linear(l.linears[3], gated, B, intermediate, projected);
  add_residual(projected);
}

// torch.classes.zili_cpu.DecodeLayers: a model's decoder layers, added once (`add`, checked then), and
// `forward`, which runs all of them on a batch of decode tokens in one call: the per-step arguments
// cross from Python once per step, not once per layer.
struct DecodeLayers : torch::CustomClassHolder {
  std::vector<std::unique_ptr<Layer>> layers;

  // The model's final norm and lm_head (set_head), which step applies after the layers, and its token
  // embedding (bf16 (vocab, H)), which step reads.
  struct Head {
    std::vector<at::Tensor> keep;
    const at::Tensor *norm = nullptr, *embedding = nullptr;
    float eps = 0.0f;
    Linear linear;
  };
  std::unique_ptr<Head> head;

  void add(const c10::List<std::optional<at::Tensor>>& tensors, const std::vector<int64_t>& ints,
           const std::vector<double>& floats) {
    auto layer = make_layer(tensors, ints, floats);
    TORCH_CHECK(layers.empty() || (layer->hidden == layers[0]->hidden && layer->kv_heads == layers[0]->kv_heads &&
                                   layer->head_dim == layers[0]->head_dim && layer->block_size == layers[0]->block_size),
                "DecodeLayers.add: every layer must share the hidden size and the cache's shape");
    layers.push_back(std::move(layer));
  }

  int64_t size() const { return static_cast<int64_t>(layers.size()); }

  // tensors: [embedding, norm, lm_head weight, scales?, zero_scales?, bias?]; ints: [bits (16 = bf16), group_size];
  // floats: [eps, the lm_head's zero point (used without zero_scales)].
  void set_head(const c10::List<std::optional<at::Tensor>>& tensors, const std::vector<int64_t>& ints,
                const std::vector<double>& floats) {
    TORCH_CHECK(tensors.size() == 6 && ints.size() == 2 && floats.size() == 2,
                "DecodeLayers.set_head: malformed arguments");
    TORCH_CHECK(!layers.empty(), "DecodeLayers.set_head: add the layers first");
    const int64_t H = layers[0]->hidden;
    auto h = std::make_unique<Head>();
    h->keep.resize(tensors.size());
    h->embedding = optional_at(tensors, 0, h->keep);
    TORCH_CHECK(h->embedding != nullptr && h->embedding->scalar_type() == at::kBFloat16 && h->embedding->is_contiguous() &&
                h->embedding->dim() == 2 && h->embedding->size(1) == H, "the embedding must be a contiguous bf16 (vocab, ", H,
                ") tensor");
    h->norm = optional_at(tensors, 1, h->keep);
    check_bf16(h->norm, "the final norm", H);
    h->eps = static_cast<float>(floats[0]);
    h->linear = make_linear(tensors, 2, ints[0], ints[1], floats[1], h->keep, "lm_head");
    check_in_features(h->linear, H, "lm_head");
    head = std::move(h);
  }

  // hidden (B, H) bf16, the residual stream, updated in place by every layer in turn.
  // cos, sin: (B, rotary_dim) bf16; kv: the paged cache (layers, 2, kv_heads, slots, head_dim); kv_scales:
  // its fp16 scales (int8 cache); block_tables (B, W) int64; context_lens (B,) int64 (new token included).
  void forward(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kv,
               const std::optional<at::Tensor>& kv_scales, const at::Tensor& block_tables,
               const at::Tensor& context_lens) const {
    RECORD_FUNCTION("zili_cpu::decode_layers", std::vector<c10::IValue>());  // an op to torch.profiler
    TORCH_CHECK(!layers.empty(), "DecodeLayers.forward: no layers added");
    const Layer& first = *layers[0];
    const int64_t H = first.hidden, D = first.head_dim, Hkv = first.kv_heads, block_size = first.block_size;
    TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == at::kBFloat16 && hidden.is_contiguous() &&
                hidden.device().is_cpu() && hidden.size(1) == H, "hidden must be a contiguous (B, ", H,
                ") bf16 CPU tensor");
    const int64_t B = hidden.size(0);
    for (const at::Tensor* t : {&cos, &sin}) {
      TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->dim() == 2 && t->size(0) == B && t->stride(1) == 1 &&
                  t->size(1) % 2 == 0 && t->size(1) <= D && t->size(1) == cos.size(1),
                  "cos / sin must be (B, rotary_dim) bf16 with unit inner stride, rotary_dim even and <= head_dim");
    }
    TORCH_CHECK(kv.dim() == 5 && kv.is_contiguous() && kv.size(1) == 2 && kv.size(2) == Hkv && kv.size(4) == D,
                "kv cache must be a contiguous (layers, 2, kv_heads, slots, head_dim) tensor");
    const bool int8_cache = kv_scales.has_value();
    TORCH_CHECK(int8_cache ? kv.scalar_type() == at::kChar && kv_scales->scalar_type() == at::kHalf &&
                                 kv_scales->is_contiguous() && kv_scales->numel() == kv.numel() / D
                           : kv.scalar_type() == at::kBFloat16, "kv cache must be bf16, or int8 with fp16 scales");
    for (const auto& layer : layers) TORCH_CHECK(layer->index < kv.size(0), "layer index out of the cache's range");
    TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.size(0) == B &&
                block_tables.is_contiguous() && context_lens.scalar_type() == at::kLong &&
                context_lens.numel() == B && context_lens.is_contiguous(),
                "block_tables (B, W) and context_lens (B,) must be contiguous int64");
    const int64_t slots = kv.size(3), width = block_tables.size(1);
    const int64_t* tables = block_tables.data_ptr<int64_t>();
    const int64_t* lens = context_lens.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {  // every slot the attention will touch lies in the cache
      TORCH_CHECK(lens[b] >= 1 && lens[b] <= width * block_size, "context length out of range of the block table");
      for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i) {
        TORCH_CHECK(0 <= tables[b * width + i] && (tables[b * width + i] + 1) * block_size <= slots,
                    "block id out of range");
      }
    }
    auto* x = static_cast<uint16_t*>(hidden.data_ptr());
    for (const auto& layer : layers) {
      const PagedCache cache{kv.data_ptr(), int8_cache ? kv_scales->data_ptr<at::Half>() : nullptr, Hkv, slots, D,
                             block_size, layer->index};
      run_layer(*layer, x, B, cache, cos, sin, tables, width, lens);
    }
  }

  // step's second half, with the head set: forward, then logits (B, vocab) fp32 =
  // float(bf16(lm_head(norm(hidden)))), rounded to bf16 as the Python model's lm_head output is before
  // compute_logits widens it.
  void forward_logits(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kv,
                      const std::optional<at::Tensor>& kv_scales, const at::Tensor& block_tables,
                      const at::Tensor& context_lens, const at::Tensor& logits) const {
    RECORD_FUNCTION("zili_cpu::decode_step", std::vector<c10::IValue>());  // the layers nest inside, as decode_layers
    const int64_t B = hidden.size(0), H = layers[0]->hidden, V = head->linear.out_features;
    TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.device().is_cpu() &&
                logits.dim() == 2 && logits.size(0) == B && logits.size(1) == V,
                "logits must be a contiguous (B, ", V, ") fp32 CPU tensor");
    forward(hidden, cos, sin, kv, kv_scales, block_tables, context_lens);
    const auto* x = static_cast<const uint16_t*>(hidden.data_ptr());
    const auto buffers = scratch_rows<2>({B * H, B * V});
    uint16_t *normed = buffers[0], *rounded = buffers[1];
    {
      RECORD_FUNCTION("zili_cpu::lm_head", std::vector<c10::IValue>());  // the final norm included
      rms_norm(x, H, B, H, static_cast<const uint16_t*>(head->norm->data_ptr()), head->eps, normed, H);
      run_linear(head->linear, normed, B, H, rounded);
    }
    float* out = logits.data_ptr<float>();
    parallel_chunks(B * V, 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; i += 16) {
        const __mmask16 mask = tail_mask(end - i);
        _mm512_mask_storeu_ps(out + i, mask, load_bf16(rounded + i, mask));
      }
    });
  }

  // A whole decode step from token ids: input_ids, positions (B,) int64; rope: RotaryEmbedding's fp32 table
  // (positions, 2 [cos, sin], rotary_dim), rows past every position; the rest as forward_logits. One call
  // per step: every return to Python after the weights have streamed through the caches finds its own code
  // and data cold (~0.3 ms on the benchmark machine for the first op). The embedding rows and the rotary
  // rows rounded to bf16 are what embed_tokens and cos_sin give. Returns each
  // row's argmax over its logits (the first largest, NaN counting as largest, as torch.argmax), the greedy
  // token: a greedy batch then needs no op on the logits at all (each would start cold, and at 16 rows
  // torch.argmax is an OpenMP region whose spinning workers then compete with the next step's threads).
  std::vector<int64_t> step(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& rope,
                            const at::Tensor& kv, const std::optional<at::Tensor>& kv_scales,
                            const at::Tensor& block_tables, const at::Tensor& logits) const {
    TORCH_CHECK(head != nullptr, "DecodeLayers.step: no head set");
    for (const at::Tensor* t : {&input_ids, &positions}) {
      TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous() && t->numel() > 0 &&
                  t->numel() == input_ids.numel(), "input_ids and positions must be contiguous non-empty (B,) int64");
    }
    TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.is_contiguous() && rope.dim() == 3 && rope.size(1) == 2,
                "rope must be a contiguous (positions, 2, rotary_dim) fp32 table");
    const int64_t B = input_ids.numel(), H = layers[0]->hidden, R = rope.size(2), vocab = head->embedding->size(0);
    const int64_t* ids = input_ids.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(ids[b] >= 0 && ids[b] < vocab, "token id ", ids[b], " out of the embedding's range");
      TORCH_CHECK(pos[b] >= 0 && pos[b] < rope.size(0), "position ", pos[b], " out of the rotary table's range");
    }
    const auto bf16 = at::TensorOptions().dtype(at::kBFloat16);
    at::Tensor hidden = at::empty({B, H}, bf16), cos = at::empty({B, R}, bf16), sin = at::empty({B, R}, bf16);
    at::Tensor context_lens = at::empty({B}, at::TensorOptions().dtype(at::kLong));
    const auto* embedding = static_cast<const uint16_t*>(head->embedding->data_ptr());
    const float* table = rope.data_ptr<float>();
    auto* x = static_cast<uint16_t*>(hidden.data_ptr());
    auto* c = static_cast<uint16_t*>(cos.data_ptr());
    auto* s = static_cast<uint16_t*>(sin.data_ptr());
    int64_t* lens = context_lens.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      std::copy(embedding + ids[b] * H, embedding + (ids[b] + 1) * H, x + b * H);
      const float* row = table + pos[b] * 2 * R;
      for (int64_t r = 0; r < R; ++r) {
        c[b * R + r] = float_to_bf16(row[r]);
        s[b * R + r] = float_to_bf16(row[R + r]);
      }
      lens[b] = pos[b] + 1;
    }
    forward_logits(hidden, cos, sin, kv, kv_scales, block_tables, context_lens, logits);
    const int64_t V = logits.size(1);
    const float* out = logits.data_ptr<float>();
    std::vector<int64_t> tokens(B);
    parallel_chunks(B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) tokens[b] = argmax(out + b * V, V);
    });
    return tokens;
  }

  // Up to `count` greedy decode steps in one call: after each step, each row's argmax is its next input, at the
  // next position. block_tables must hold positions through positions + count - 1 and rope must reach them (each
  // step checks). stop_ids (B, S) int64: row b's stop tokens, padded with -1 (S may be 0); the call ends after
  // the first step in which any row produced one of its own, so no step runs past a finished sequence and its
  // slot is free for the next group. Returns the tokens of the steps run (B per step), step by step; `logits`
  // holds the last step's.
  std::vector<int64_t> steps(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& rope,
                             const at::Tensor& kv, const std::optional<at::Tensor>& kv_scales,
                             const at::Tensor& block_tables, const at::Tensor& logits, int64_t count,
                             const at::Tensor& stop_ids) const {
    TORCH_CHECK(count >= 1, "DecodeLayers.steps: count must be at least 1, not ", count);
    TORCH_CHECK(input_ids.scalar_type() == at::kLong && positions.scalar_type() == at::kLong,
                "input_ids and positions must be int64");
    TORCH_CHECK(stop_ids.scalar_type() == at::kLong && stop_ids.dim() == 2 && stop_ids.size(0) == input_ids.numel(),
                "stop_ids must be an int64 (B, S) tensor");
    at::Tensor ids = input_ids.contiguous().clone(), where = positions.contiguous().clone();
    const at::Tensor stops = stop_ids.contiguous();
    const int64_t* stop = stops.data_ptr<int64_t>();
    const int64_t width = stops.size(1);
    std::vector<int64_t> all;
    all.reserve(static_cast<size_t>(count * ids.numel()));
    for (int64_t s = 0; s < count; ++s) {
      const std::vector<int64_t> tokens = step(ids, where, rope, kv, kv_scales, block_tables, logits);
      all.insert(all.end(), tokens.begin(), tokens.end());
      int64_t* id = ids.data_ptr<int64_t>();
      int64_t* position = where.data_ptr<int64_t>();
      bool stopped = false;
      for (size_t b = 0; b < tokens.size(); ++b) {
        id[b] = tokens[b];
        position[b] += 1;
        const int64_t* row = stop + static_cast<int64_t>(b) * width;
        stopped = stopped || std::find(row, row + width, tokens[b]) != row + width;
      }
      if (stopped) break;
    }
    return all;
  }
};

}  // namespace

// "auto" (the AMX scores where they apply) or "vector" (the vector path always); returns the previous setting.
std::string set_attention_path(const std::string& path) {
  static const char* names[] = {"auto", "vector"};
  int mode = -1;
  for (int i = 0; i < 2; ++i) {
    if (path == names[i]) mode = i;
  }
  TORCH_CHECK(mode >= 0, "attention path must be auto or vector, not ", path);
  return names[g_attention_mode.exchange(mode)];
}

// The path decode attention takes ("amx" or "vector") for this cache and head size, under the current setting.
std::string attention_path(bool int8_cache, int64_t head_dim) {
  return amx_attention(int8_cache, head_dim) ? "amx" : "vector";
}

TORCH_LIBRARY_FRAGMENT(zili_cpu, m) {
  m.def("set_attention_path(str path) -> str", &set_attention_path);
  m.def("attention_path(bool int8_cache, int head_dim) -> str", &attention_path);
  m.class_<DecodeLayers>("DecodeLayers")
      .def(torch::init<>())
      .def("add", &DecodeLayers::add)
      .def("size", &DecodeLayers::size)
      .def("forward", &DecodeLayers::forward)
      .def("set_head", &DecodeLayers::set_head)
      .def("step", &DecodeLayers::step)
      .def("steps", &DecodeLayers::steps);
}

}  // namespace zili_cpu

// Raw-pointer CPU kernels for small-M matmuls (decode): y (M, N) = x (M, K) @ W.T.
//
// Each function computes the output columns [n_begin, n_end) for all M rows of x, streaming those
// rows of W from memory once (in panels reused from cache for each group of 8 rows of x); the
// caller splits N across threads.
// Requires AVX512F/BW/VL + AVX512-BF16 (bf16) or AVX512-VNNI (int8/int4).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace zili_cpu {

// Software prefetch distance per weight-row stream. The hardware prefetcher alone left the
// int4 kernel ~20% short on this machine kind; 512-2048 bytes measured alike, 1024 best.
constexpr int64_t kPrefetchBytes = 1024;

// Rows of W per panel when x has more than 8 rows: the panel stays in L1/L2 across the passes over
// each group of 8 rows of x (16 rows x K = 4864 bf16 = 152 KB at most for the benchmark shapes).
constexpr int64_t kPanelRows = 16;

// Prefetch the line kPrefetchBytes after p (address arithmetic: p + distance may lie past the buffer).
inline void prefetch_ahead(const void* p) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes), 0, 3);
}

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// The lanes of a 16-lane vector that hold the `remaining` values left (all 16 from 16 on).
inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << remaining) - 1);
}

// The same for 32 lanes (32 bf16 values a vector).
inline __mmask32 tail_mask32(int64_t remaining) {
  return remaining >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << remaining) - 1);
}

// 16 bf16 values as fp32 lanes (exact: bf16 is the high half of an fp32).
inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// 16 bf16 values from memory as fp32 lanes; lanes outside `mask` are 0.
inline __m512 load_bf16(const uint16_t* p, __mmask16 mask = 0xffff) {
  return widen_bf16(_mm256_maskz_loadu_epi16(mask, p));
}

// Output element types of the kernels: fp32 or bf16 (round to nearest even).
enum class OutType { kFloat32, kBFloat16 };

struct Bias {
  const void* data = nullptr;  // (N,) fp32 or bf16, or nullptr
  bool is_bf16 = false;
  float at(int64_t n) const {
    if (data == nullptr) return 0.0f;
    return is_bf16 ? bf16_to_float(static_cast<const uint16_t*>(data)[n]) : static_cast<const float*>(data)[n];
  }
  // bias[n .. n + 15] as fp32 lanes; lanes outside `mask`, and all of them without a bias, are 0.
  __m512 lanes(int64_t n, __mmask16 mask = 0xffff) const {
    if (data == nullptr) return _mm512_setzero_ps();
    return is_bf16 ? load_bf16(static_cast<const uint16_t*>(data) + n, mask)
                   : _mm512_maskz_loadu_ps(mask, static_cast<const float*>(data) + n);
  }
};

inline void store(void* out, int64_t index, OutType type, float value) {
  if (type == OutType::kBFloat16) {
    static_cast<uint16_t*>(out)[index] = float_to_bf16(value);
  } else {
    static_cast<float*>(out)[index] = value;
  }
}

// x: (M, K) bf16, row stride ldx; w: (N, K) bf16 row-major, any K (tail masked).
void gemv_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* w,
               Bias bias, void* out, int64_t ldo, OutType out_type, int64_t n_begin, int64_t n_end);

// x (M, K) bf16 as matmul_bf16 reads it, prepared once per call for any number of slices of N. Where
// the AMX path applies, `packed` is x in the tile layout (gemm_amx_bf16.cpp), in the preparing thread's
// scratch: valid until that thread prepares again. nullptr: gemv_bf16 reads x as it is.
struct Bf16Rows {
  const uint16_t* x;
  int64_t ldx, M, K;
  const uint32_t* packed;
};
Bf16Rows prepare_bf16_rows(const uint16_t* x, int64_t ldx, int64_t M, int64_t K);

// gemv_bf16's contract for prepared rows; the path (gemv_bf16 or an AMX tdpbf16ps kernel, which reads W
// as stored too) is picked by M and K in prepare_bf16_rows. The AMX path runs where the CPU has
// AMX-BF16, the OS granted the tile state and ZILI_CPU_AMX is not 0 at first use; otherwise gemv_bf16
// does all the work.
void matmul_bf16(const Bf16Rows& rows, const uint16_t* w, Bias bias, void* out, int64_t ldo, OutType out_type,
                 int64_t n_begin, int64_t n_end);

// The gate_up matmul and the SiLU gate in one pass, for W = [gate (I rows) | up (I rows)] (2I, K) bf16:
// out (M, I) bf16 (row stride ldo), columns [n_begin, n_end) (multiples of 16), = bf16(bf16(silu(g)) * u)
// with g, u the gate and up outputs rounded to bf16, bit for bit what matmul_bf16 into a bf16 gate_up
// and gate_row (rows.h) give. Runs on the AMX kernel only: where silu_gate_fusable(M, K, I), which
// holds when prepare_bf16_rows packs x for AMX, I is a multiple of 16 and M is at most 8
// (gemm_amx_bf16.cpp: kFusedGateMaxRows).
bool silu_gate_fusable(int64_t M, int64_t K, int64_t I);
void matmul_bf16_silu_gated(const Bf16Rows& rows, const uint16_t* w, int64_t I, Bias bias, uint16_t* out,
                            int64_t ldo, int64_t n_begin, int64_t n_end);

// True where the AMX kernels may run: the CPU has AMX-BF16, the OS granted this process the tile state,
// and ZILI_CPU_AMX was not 0 at first use (gemm_amx_bf16.cpp).
bool amx_usable();

// Decode attention scores (attention_amx.cpp), on AMX (amx_usable()): for `runs` runs of 16 cached
// positions, scores[(16 r + i) * scores_ld + g] = q[g] . keys[r][i] (fp32; no scale) for the `heads`
// query heads q (rows of D bf16, q_ld apart) and the 16 key rows of run r (D bf16, key_ld apart, read
// whatever they hold: a row past the context only fills its own row of scores). D even; scores_ld:
// heads rounded up to 16.
void amx_attention_scores(const uint16_t* q, int64_t q_ld, int64_t heads, int64_t D, const uint16_t* const* keys,
                          int64_t key_ld, int64_t runs, float* scores, int64_t scores_ld);

// Activations quantized to signed int8 per block of `block` (32, 64 or 128) inputs, as the int kernels read them.
struct QuantizedRows {
  const int8_t* codes;       // (M, K_padded) x / scale rounded, zero past K
  int64_t ld;                // K_padded
  const float* scales;       // (M, num_blocks_padded) per-block scale, zero past K
  int64_t scales_ld;
  const float* group_terms;  // (M, G): sum over the group's blocks of scale * sum(codes)
  int64_t num_groups;
  int64_t block;             // 32, 64 or 128 inputs per activation block; divides the weight group
};

// Sizes of the QuantizedRows buffers for a weight of K inputs, `bits` 8 / 4, groups of `group_size`
// (a multiple of 32 dividing K): codes (M, padded_k), scales (M, scales_ld), group_terms (M, num_groups).
struct QuantLayout {
  int64_t block, padded_k, scales_ld, num_groups;
};
inline QuantLayout quant_layout(int64_t K, int bits, int64_t group_size) {
  QuantLayout l;
  l.block = group_size % 128 == 0 ? 128 : group_size % 64 == 0 ? 64 : 32;
  const int64_t chunk = bits == 4 ? 128 : 64;  // K = 32 mod 64 (blocks of 32) pads int8 codes to 64
  l.padded_k = (K + chunk - 1) / chunk * chunk;
  l.scales_ld = l.padded_k / (l.block == 32 ? 32 : 64);
  l.num_groups = K / group_size;
  return l;
}

// x (M, K) fp32 or bf16 -> int8 codes, block scales, group terms (buffers sized as QuantizedRows says).
void quantize_rows(const void* x, bool x_is_bf16, int64_t ldx, int64_t M, int64_t K, int64_t group_size,
                   int64_t block, int8_t* codes, int64_t ld, float* scales, int64_t scales_ld,
                   float* group_terms);

// Weight (N, K) of unsigned codes with group scales s and zero points z: W = (codes - z) * s.
// group_size: a multiple of 32 that divides K (and of the activation block, quant_layout).
//   bits 8: codes (N, K) uint8 row-major.
//   bits 4: (N, K_padded / 2) uint8; in every 128-input chunk, byte j holds input j in its low
//           nibble and input j + 64 in its high nibble (K_padded = K rounded up to 128).
// scales, zero_scales (= s * z): (N, G) fp32; zero_scales nullptr: every group's zero point is zero_point
// (symmetric quantization), and s * zero_point is computed where s is read (half the bytes per group).
void gemv_quant(const QuantizedRows& xq, int64_t M, int64_t K, const uint8_t* w, int bits,
                const float* scales, const float* zero_scales, float zero_point, int64_t group_size, Bias bias,
                void* out, int64_t ldo, OutType out_type, int64_t n_begin, int64_t n_end);

// Rows [n_begin, n_end) of such a weight, dequantized: out (n_end - n_begin, K) fp32 or bf16, row-major.
void dequantize_rows(const uint8_t* w, int bits, int64_t K, const float* scales, const float* zero_scales,
                     float zero_point, int64_t group_size, int64_t n_begin, int64_t n_end, void* out, OutType out_type);

}  // namespace zili_cpu

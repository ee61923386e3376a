// See threads.h.
#include "threads.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "pool.h"

namespace zili_cpu {

int64_t chunk_rows(int64_t N, int64_t multiple) {
  const int64_t pieces = int64_t{at::get_num_threads()} * kChunksPerThread;
  const int64_t rows = (N + pieces - 1) / pieces;
  return std::max(kGrainRows, (rows + multiple - 1) / multiple * multiple);
}

void linear_bf16_threads(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, Bias bias, void* out,
                         OutType out_type, int64_t N) {
  const Bf16Rows rows = prepare_bf16_rows(x, K, M, K);
  parallel_chunks(N, chunk_rows(N, 32), [&](int64_t begin, int64_t end) {
    matmul_bf16(rows, w, bias, out, N, out_type, begin, end);
  }, 32);
}

void linear_bf16_silu_gated_threads(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t I, Bias bias,
                                    uint16_t* out) {
  const Bf16Rows rows = prepare_bf16_rows(x, K, M, K);
  parallel_chunks(I, chunk_rows(I, 16), [&](int64_t begin, int64_t end) {
    matmul_bf16_silu_gated(rows, w, I, bias, out, I, begin, end);
  }, 16);
}

const float* check_quant_scales(const at::Tensor& scales, const at::Tensor* zero_scales, int64_t N, int64_t G,
                                const char* what) {
  for (const at::Tensor* t : {&scales, zero_scales != nullptr ? zero_scales : &scales}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                t->size(1) == (G < 0 ? scales.size(1) : G),
                what, *what ? ": " : "", "scales and zero_scales must be contiguous fp32 (N, G)");
  }
  return zero_scales != nullptr ? zero_scales->data_ptr<float>() : nullptr;
}

void linear_quant_threads(const void* x, bool x_is_bf16, int64_t M, int64_t K, const uint8_t* w, int bits,
                          const float* scales, const float* zero_scales, float zero_point, int64_t group_size,
                          Bias bias, void* out, OutType out_type, int64_t N) {
  const QuantLayout layout = quant_layout(K, bits, group_size);
  const int64_t G = layout.num_groups, padded_k = layout.padded_k;
  // The quantized activations of decode-sized x live in this thread's scratch buffers, reused across
  // calls (no allocation per call); a larger x gets buffers of its own, so the scratch stays small.
  thread_local std::vector<int8_t> scratch_codes;
  thread_local std::vector<float> scratch_floats;
  std::vector<int8_t> own_codes;
  std::vector<float> own_floats;
  const bool small = M * padded_k <= (int64_t{1} << 20);
  std::vector<int8_t>& codes = small ? scratch_codes : own_codes;
  std::vector<float>& floats = small ? scratch_floats : own_floats;
  codes.resize(std::max<size_t>(codes.size(), M * padded_k));
  floats.resize(std::max<size_t>(floats.size(), M * (layout.scales_ld + G)));
  float* x_scales = floats.data();
  float* group_terms = x_scales + M * layout.scales_ld;
  quantize_rows(x, x_is_bf16, K, M, K, group_size, layout.block, codes.data(), padded_k, x_scales, layout.scales_ld,
                group_terms);
  const QuantizedRows rows{codes.data(), padded_k, x_scales, layout.scales_ld, group_terms, G, layout.block};
  parallel_chunks(N, chunk_rows(N, 1), [&](int64_t begin, int64_t end) {
    gemv_quant(rows, M, K, w, bits, scales, zero_scales, zero_point, group_size, bias, out, N, out_type, begin, end);
  }, kGrainRows);
}

}  // namespace zili_cpu

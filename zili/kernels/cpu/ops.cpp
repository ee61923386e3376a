// torch.ops.zili_cpu.*: argument checks, output allocation and the split of N across threads
// (pool.h; OpenMP for dequantize) around the raw kernels of kernels.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>

#include "kernels.h"
#include "rows.h"
#include "threads.h"

namespace zili_cpu {
namespace {

Bias bias_of(const std::optional<at::Tensor>& bias, int64_t N) {
  Bias result;
  if (!bias.has_value()) return result;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(), "bias must be a contiguous (N,) tensor");
  TORCH_CHECK(bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16, "bias must be fp32 or bf16");
  result.data = bias->data_ptr();
  result.is_bf16 = bias->scalar_type() == at::kBFloat16;
  return result;
}

void check_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "x must be a 2-D CPU tensor (M, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
}

OutType out_type_of(const at::Tensor& out) {
  return out.scalar_type() == at::kBFloat16 ? OutType::kBFloat16 : OutType::kFloat32;
}

// (M, K) @ (N, K).T with bf16 weights; fp32 x is rounded to bf16. Output in x's dtype.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_rows(x);
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() &&
              weight.device().is_cpu(), "weight must be a contiguous (N, K) bf16 CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "x has ", K, " features, weight expects ", weight.size(1));
  const at::Tensor xb = x.to(at::kBFloat16).contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  const Bias b = bias_of(bias, N);
  linear_bf16_threads(static_cast<const uint16_t*>(xb.data_ptr()), M, K,
                      static_cast<const uint16_t*>(weight.data_ptr()), b, out.data_ptr(), out_type_of(out), N);
  return out;
}

// bf16(bf16(silu(gate)) * up) (M, I) for [gate | up] = x (M, K) @ weight (2I, K).T + bias, bf16, the
// matmul and the gate in one pass where silu_gate_fusable (the fused decode layers' path); elsewhere
// linear_bf16 and the gated_activation row op, which give the same bits.
at::Tensor linear_bf16_silu_gated(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias) {
  check_rows(x);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x must be bf16");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) % 2 == 0, "weight must be (2I, K): the gate rows, then the up rows");
  const int64_t M = x.size(0), K = x.size(1), I = weight.size(0) / 2;
  if (!silu_gate_fusable(M, K, I)) {
    const at::Tensor gate_up = linear_bf16(x, weight, bias);
    at::Tensor out = at::empty({M, I}, x.options());
    const auto* gp = static_cast<const uint16_t*>(gate_up.data_ptr());
    for (int64_t m = 0; m < M; ++m) {
      gate_row(Activation::kSilu, gp + m * 2 * I, I, static_cast<uint16_t*>(out.data_ptr()) + m * I);
    }
    return out;
  }
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.device().is_cpu() &&
              weight.size(1) == K, "weight must be a contiguous (2I, K) bf16 CPU tensor, K = ", K);
  const at::Tensor xb = x.contiguous();
  at::Tensor out = at::empty({M, I}, x.options());
  linear_bf16_silu_gated_threads(static_cast<const uint16_t*>(xb.data_ptr()), M, K,
                                 static_cast<const uint16_t*>(weight.data_ptr()), I, bias_of(bias, 2 * I),
                                 static_cast<uint16_t*>(out.data_ptr()));
  return out;
}

// (M, K) @ W.T with W = (codes - z) * s stored as kernels.h describes (bits 8 or 4).
at::Tensor linear_quant(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zero_scales, double zero_point, int64_t bits,
                        int64_t group_size, const std::optional<at::Tensor>& bias) {
  check_rows(x);
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0, "group size must be a multiple of 32");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(K % group_size == 0, "group size ", group_size, " does not divide K = ", K);
  const QuantLayout layout = quant_layout(K, static_cast<int>(bits), group_size);
  const int64_t G = layout.num_groups, padded_k = layout.padded_k;
  const int64_t row_bytes = bits == 8 ? K : padded_k / 2;
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.is_contiguous() && weight.dim() == 2 &&
              weight.size(1) == row_bytes, "weight must be contiguous uint8 (N, ", row_bytes, ")");
  const float* zs = check_quant_scales(scales, zero_scales ? &*zero_scales : nullptr, N, G, "");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  linear_quant_threads(xc.data_ptr(), xc.scalar_type() == at::kBFloat16, M, K, weight.data_ptr<uint8_t>(),
                       static_cast<int>(bits), scales.data_ptr<float>(), zs, static_cast<float>(zero_point),
                       group_size, bias_of(bias, N), out.data_ptr(), out_type_of(out), N);
  return out;
}

// Rows [row_begin, row_end) of a weight in linear_quant's layout, dequantized to `dtype` (fp32 / bf16).
at::Tensor dequantize(const at::Tensor& weight, const at::Tensor& scales, const std::optional<at::Tensor>& zero_scales,
                      double zero_point, int64_t bits, int64_t group_size, int64_t row_begin, int64_t row_end,
                      at::ScalarType dtype) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize to fp32 or bf16");
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0, "group size must be a multiple of 32");
  const int64_t N = weight.size(0), G = scales.size(1), K = G * group_size;
  const int64_t padded_k = bits == 4 ? (K + 127) / 128 * 128 : K;
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.is_contiguous() && weight.dim() == 2 &&
              weight.size(1) == (bits == 8 ? K : padded_k / 2), "weight does not match the scales' groups");
  const float* zp = check_quant_scales(scales, zero_scales ? &*zero_scales : nullptr, N, G, "");
  TORCH_CHECK(0 <= row_begin && row_begin <= row_end && row_end <= N, "row range out of bounds");
  at::Tensor out = at::empty({row_end - row_begin, K}, weight.options().dtype(dtype));
  const auto* wp = weight.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  char* op = static_cast<char*>(out.data_ptr());
  const OutType type = out_type_of(out);
  const int64_t row_size = K * out.element_size();
  // OpenMP, not pool.h: the slices alternate with oneDNN GEMMs on OpenMP's threads (prefill), and the
  // pool's workers spinning after each slice would take a core from them.
  at::parallel_for(row_begin, row_end, kGrainRows, [&](int64_t begin, int64_t end) {
    dequantize_rows(wp, static_cast<int>(bits), K, sp, zp, static_cast<float>(zero_point), group_size, begin, end,
                    op + (begin - row_begin) * row_size, type);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(zili_cpu, m) {
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_bf16_silu_gated(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_quant(Tensor x, Tensor weight, Tensor scales, Tensor? zero_scales, float zero_point, int bits, "
        "int group_size, Tensor? bias) -> Tensor");
  m.def("dequantize(Tensor weight, Tensor scales, Tensor? zero_scales, float zero_point, int bits, int group_size, "
        "int row_begin, int row_end, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(zili_cpu, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_bf16_silu_gated", &linear_bf16_silu_gated);
  m.impl("linear_quant", &linear_quant);
  m.impl("dequantize", &dequantize);
}

}  // namespace zili_cpu

// torch.ops.zili_cpu.rms_norm / gated_activation: the row-wise ops of a Llama-family layer on bf16
// rows, for the Python model's prefill (the fused decode layers run the same code per token).
// PyTorch's bf16 elementwise ops spend ~2.5 ms on one 512 x 896 RMSNorm (five ops, each a round
// trip through memory in fp32) and ~6 ms on act(gate) * up for 512 x 4864 on this machine kind.
//
// Rows are split with OpenMP (at::parallel_for), not pool.h: these ops alternate with oneDNN GEMMs
// on OpenMP's threads, and the pool's workers spinning after each op would take a core from them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "rows.h"

namespace zili_cpu {
namespace {

// Rows per task: about 32 K values, so small inputs (decode) stay on the calling thread.
int64_t grain_rows(int64_t row_size) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(row_size, 1)); }

void check_bf16_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.is_contiguous() && t.dim() >= 1,
              what, " must be a contiguous bf16 CPU tensor");
}

// x (..., H) -> bf16(w * bf16(x * rsqrt(mean(x^2) + eps))), as zili.layers.norm.RMSNorm.
at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_bf16_rows(x, "x");
  check_bf16_rows(weight, "weight");
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H, "weight has ", weight.numel(), " values, x rows have ", H);
  at::Tensor out = at::empty_like(x);
  const int64_t rows = H == 0 ? 0 : x.numel() / H;
  const auto* xp = static_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = static_cast<const uint16_t*>(weight.data_ptr());
  auto* op = static_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, rows, grain_rows(H), [&](int64_t begin, int64_t end) {
    rms_norm(xp + begin * H, H, end - begin, H, wp, static_cast<float>(eps), op + begin * H, H);
  });
  return out;
}

// gate_up (..., 2I) = [gate | up] -> bf16(bf16(act(gate)) * up) (..., I); activation codes as rows.h.
at::Tensor gated_activation_op(const at::Tensor& gate_up, int64_t activation) {
  check_bf16_rows(gate_up, "gate_up");
  TORCH_CHECK(activation >= 0 && activation <= static_cast<int64_t>(Activation::kRelu), "unknown activation code ",
              activation);
  const int64_t width = gate_up.size(-1), I = width / 2;
  TORCH_CHECK(width % 2 == 0, "gate_up's last dimension must be even (gate and up halves), got ", width);
  std::vector<int64_t> shape = gate_up.sizes().vec();
  shape.back() = I;
  at::Tensor out = at::empty(shape, gate_up.options());
  const int64_t rows = I == 0 ? 0 : gate_up.numel() / width;
  const auto* gp = static_cast<const uint16_t*>(gate_up.data_ptr());
  auto* op = static_cast<uint16_t*>(out.data_ptr());
  const auto act = static_cast<Activation>(activation);
  at::parallel_for(0, rows, grain_rows(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) gate_row(act, gp + r * width, I, op + r * I);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zili_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("gated_activation(Tensor gate_up, int activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(zili_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm_op);
  m.impl("gated_activation", &gated_activation_op);
}

}  // namespace zili_cpu

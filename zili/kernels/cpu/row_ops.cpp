// torch.ops.zili_cpu.rms_norm / gated_activation / rotary: the row-wise ops of a Llama-family layer on
// bf16 rows, for the Python model's prefill (the fused decode layers run the same code per token).
// PyTorch's bf16 elementwise ops spend ~2.5 ms on one 512 x 896 RMSNorm (five ops, each a round
// trip through memory in fp32), ~6 ms on act(gate) * up for 512 x 4864 and ~0.5 ms on the rotary of
// 512 x 14 query heads (six ops) on this machine kind.
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

// x (T, H, D) bf16 with contiguous channels (a view into a fused qkv output will do); cos / sin (T, R)
// -> contiguous (T, H, D): the first R channels rotated as rows.h's rotary_row, the rest copied.
at::Tensor rotary_op(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 3 && x.stride(2) == 1,
              "x must be a bf16 CPU tensor (tokens, heads, head_dim) with contiguous channels");
  check_bf16_rows(cos, "cos");
  check_bf16_rows(sin, "sin");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), R = cos.size(-1);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && sin.sizes() == cos.sizes(), "cos and sin must be (", T,
              ", rotary_dim), got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(R % 2 == 0 && R <= D, "rotary_dim ", R, " must be even and at most head_dim ", D);
  at::Tensor out = at::empty({T, H, D}, x.options());
  const auto* xp = static_cast<const uint16_t*>(x.data_ptr());
  const auto* cp = static_cast<const uint16_t*>(cos.data_ptr());
  const auto* sp = static_cast<const uint16_t*>(sin.data_ptr());
  auto* op = static_cast<uint16_t*>(out.data_ptr());
  const int64_t token_stride = x.stride(0), head_stride = x.stride(1);
  at::parallel_for(0, T * H, grain_rows(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / H;
      const uint16_t* src = xp + t * token_stride + (r % H) * head_stride;
      uint16_t* dst = op + r * D;
      rotary_row(src, cp + t * R, sp + t * R, R / 2, dst);
      std::copy(src + R, src + D, dst + R);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zili_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("gated_activation(Tensor gate_up, int activation) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(zili_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm_op);
  m.impl("gated_activation", &gated_activation_op);
  m.impl("rotary", &rotary_op);
}

}  // namespace zili_cpu

"""Quantized-weight matmul kernels on zili's AVX512-VNNI CPU kernels (torch.ops.zili_cpu).

Same interface as zili.layers.quantized.kernels (built once from a `QuantizedWeight`, `supports`,
`name`, forward x (..., K) -> (..., N)); `select_kernel` prefers them on the CPU when the
extension is available. Layout, packed once at construction:
- weight: the unsigned codes, (N, K) uint8 for int8; for int4 two codes per byte, (N, K_pad/2)
  with K_pad = K rounded up to 128: in every 128-input chunk, byte j holds input j in its low
  nibble and input j + 64 in its high nibble (one 64-byte load feeds two vpdpbusd).
- scales (N, G) fp32 and, where the zero points differ between groups, zero_scales = scales * zeros
  (N, G) fp32; with one zero point for all (symmetric quantization: 8 for int4, 128 for int8) only that
  number is kept (`zero_point`), and the kernels compute s * zero_point where they read s: decode
  streams 4 bytes less per group (11 MB a token for the benchmark model's int4 at groups of 128).
Groups: any multiple of 32 inputs (per channel = one group of K). Decode-sized inputs
(cpu_ext.MAX_KERNEL_ROWS) quantize x to int8 per block of 32/64/128 inputs (the largest dividing the group) and
run the VNNI kernel; larger inputs (prefill) dequantize slices of the weight to x's dtype and use
F.linear (oneDNN/AMX), which is compute-rich there. No dequantized copy is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from zili.kernels import cpu_ext

if TYPE_CHECKING:  # zili.layers.quantized imports this module to register the kernels
    from zili.layers.quantized.weight import QuantizedWeight

INT4_CHUNK = 128            # inputs per 64-byte packed int4 chunk
DEQUANT_SLICE_ELEMENTS = 1 << 20  # weight elements dequantized at a time on the large-M path (2 MB in bf16)
COMPUTE_DTYPES = (torch.float32, torch.bfloat16)  # what the ops take; other inputs compute in fp32


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 16) -> (N, K_pad / 2) uint8 in the kernel's interleaved layout."""
    n, k = codes.shape
    padded = F.pad(codes.to(torch.uint8), (0, -k % INT4_CHUNK))            # (N, K_pad), zero codes past K
    chunks = padded.view(n, -1, 2, INT4_CHUNK // 2)                       # (N, K_pad/128, lo|hi, 64)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, -1).contiguous()


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_int4`: (N, K_pad / 2) -> (N, K) uint8 codes."""
    chunks = packed.view(packed.shape[0], -1, INT4_CHUNK // 2)
    return torch.stack([chunks & 0x0F, chunks >> 4], dim=2).reshape(packed.shape[0], -1)[:, :in_features]


class VnniKernel(nn.Module):
    bits: int

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        codes = weight.codes.to(torch.uint8).contiguous()
        self.register_buffer("weight", pack_int4(codes) if self.bits == 4 else codes)
        scales = weight.scales.float()
        zeros = weight.zeros.float()
        self.register_buffer("scales", scales.contiguous())                                  # (N, G)
        self.zero_point: float | None = zeros.flatten()[0].item() if bool((zeros == zeros.flatten()[0]).all()) else None
        """Every group's zero point where they are all equal (then zero_scales is None)."""
        self.register_buffer("zero_scales", None if self.zero_point is not None
                             else (scales * zeros).contiguous())                             # (N, G)
        self.register_buffer("perm", weight.perm)
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.group_size = weight.group_size

    @classmethod
    def supports(cls, weight: QuantizedWeight, device: torch.device) -> bool:
        return (torch.device(device).type == "cpu" and weight.bits == cls.bits and weight.group_size % 32 == 0
                and cpu_ext.available())

    def codes(self, rows: slice) -> torch.Tensor:
        """(rows, K) uint8 codes of some output rows."""
        if self.bits == 4:
            return unpack_int4(self.weight[rows], self.in_features)
        return self.weight[rows]

    def dequantized(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """(rows, K) weight in `dtype`: codes * s - s * z per group (PyTorch ops; the C++ op's oracle)."""
        codes = self.codes(rows).float().view(-1, self.scales.shape[1], self.group_size)        # (n, G, g)
        scales = self.scales[rows, :, None]
        zero_scales = scales * self.zero_point if self.zero_scales is None else self.zero_scales[rows, :, None]
        weight = codes * scales - zero_scales
        return weight.view(-1, self.in_features).to(dtype)

    @property
    def zeros(self) -> torch.Tensor | float:
        """What the ops take for the zero points: zero_scales, or the one zero point."""
        return self.zero_point if self.zero_scales is None else self.zero_scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(-1, self.perm)
        if x2.dtype not in COMPUTE_DTYPES:
            x2 = x2.float()
        matmul = self.kernel_matmul if cpu_ext.use_kernel("quant", x2.shape[0]) else self.dequantized_matmul
        return matmul(x2).to(x.dtype).reshape(*lead, self.out_features)

    def kernel_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K), small M -> (M, N): int8 activations, VNNI dot products."""
        return cpu_ext.linear_quant(x, self.weight, self.scales, self.zeros, self.bits, self.group_size)

    def dequantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K), any M -> (M, N): F.linear over slices of the weight dequantized to x's dtype."""
        step = max(DEQUANT_SLICE_ELEMENTS // self.in_features, 1)
        return torch.cat([F.linear(x, cpu_ext.dequantize(self.weight, self.scales, self.zeros, self.bits,
                                                         self.group_size, slice(n, n + step), x.dtype))
                          for n in range(0, self.out_features, step)], dim=-1)


class CpuVnniInt8Kernel(VnniKernel):
    """int8 codes (any zero points, groups of a multiple of 32 or per channel), int8 activations."""

    name = "cpu-vnni-int8"
    bits = 8


class CpuVnniInt4Kernel(VnniKernel):
    """int4 codes packed two per byte (groups of a multiple of 32 or per channel), int8 activations."""

    name = "cpu-vnni-int4"
    bits = 4

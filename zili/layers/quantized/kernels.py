"""Weight-only quantized matmul kernels, chosen per device in one place (`select_kernel`).

A kernel is an nn.Module built once from a `QuantizedWeight`: it packs the weight into its own
layout at construction (buffers, so `.to(device)` moves them) and computes y = x @ W.T for
x: (..., in_features) -> (..., out_features). No dequantized copy of the weight is kept.

- `ReferenceKernel`: dequantize-then-matmul. Runs on every device; the test oracle and fallback.
- `CpuInt8Kernel`: torch.ops.aten._weight_int8pack_mm (int8 weight, per-output-channel scale).
- `CpuInt4Kernel`: torch.ops.aten._weight_int4pack_mm_for_cpu (groups of 32/64/128/256).
- `CpuVnniInt8Kernel`, `CpuVnniInt4Kernel` (zili.kernels.quant_kernels): zili's AVX512-VNNI kernels.

PyTorch's CPU kernels are fast only with bf16 activations (fp32 inputs take a slow generic
path, 10-100x slower at prefill sizes), so on the CPU they compute in bf16 and cast back.
Setting ZILI_QUANT_KERNEL=reference (or another kernel name) forces one kernel everywhere,
for debugging and exact comparisons.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from zili.kernels.quant_kernels import CpuVnniInt4Kernel, CpuVnniInt8Kernel
from zili.layers.quantized.weight import QuantizedWeight

CPU_INT4_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts, largest first
CPU_COMPUTE_DTYPE = torch.bfloat16


class ReferenceKernel(nn.Module):
    """y = x[..., perm] @ dequantize(W).T, dequantizing the layer on every call (slow, exact)."""

    name = "reference"

    def __init__(self, weight: QuantizedWeight, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.bits, self.group_size = weight.bits, weight.group_size
        self.register_buffer("codes", weight.codes.to(torch.uint8).contiguous())  # (N, K)
        self.register_buffer("scales", weight.scales.float().contiguous())        # (N, G)
        self.register_buffer("zeros", weight.zeros.to(torch.uint8).contiguous())  # (N, G)
        self.register_buffer("perm", weight.perm)
        self.compute_dtype = compute_dtype

    @classmethod
    def supports(cls, weight: QuantizedWeight, device: torch.device) -> bool:
        return True

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scales, self.zeros, self.bits, self.group_size, self.perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return F.linear(x.to(dtype), self.quantized_weight().dequantize(dtype)).to(x.dtype)


def _rows_2d(x: torch.Tensor, perm: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(..., K) -> (M, K) contiguous in `dtype`, input columns permuted for act-order weights."""
    x = x.reshape(-1, x.shape[-1])
    if perm is not None:
        x = x.index_select(-1, perm)
    return x.to(dtype).contiguous()


class CpuInt8Kernel(nn.Module):
    """int8 weights with PyTorch's CPU int8 x float kernel.

    The kernel takes signed int8 W and one scale per output row. With codes c and zero point z,
    W = (c - z) * s = ((c - 128) - (z - 128)) * s, so per group g:
    y += int8mm(x_g, c_g - 128, s_g) - sum(x_g) * (z_g - 128) * s_g. Group-wise weights take one
    kernel call per group; the zero-point term (asymmetric only) is one small (M, G) @ (G, N) matmul.
    """

    name = "cpu-int8"

    def __init__(self, weight: QuantizedWeight, compute_dtype: torch.dtype = CPU_COMPUTE_DTYPE):
        super().__init__()
        n, k = weight.codes.shape
        groups = weight.num_groups
        signed = (weight.codes.to(torch.int16) - 128).to(torch.int8)
        # (G, N, group_size): each group's slice contiguous, as the kernel needs
        self.register_buffer("weight_int8", signed.view(n, groups, -1).transpose(0, 1).contiguous())
        self.register_buffer("scales", weight.scales.t().to(compute_dtype).contiguous())      # (G, N)
        zero_term = (weight.zeros.float() - 128) * weight.scales.float()                       # (N, G)
        self.register_buffer("zero_term", None if weight.symmetric else zero_term.t().contiguous())
        self.register_buffer("perm", weight.perm)
        self.group_size, self.out_features, self.compute_dtype = weight.group_size, n, compute_dtype

    @classmethod
    def supports(cls, weight: QuantizedWeight, device: torch.device) -> bool:
        return device.type == "cpu" and weight.bits == 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = _rows_2d(x, self.perm, self.compute_dtype)                   # (M, K)
        groups = self.weight_int8.shape[0]
        if groups == 1:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8[0], self.scales[0])
        else:
            y = sum(torch.ops.aten._weight_int8pack_mm(
                        x2[:, g * self.group_size:(g + 1) * self.group_size].contiguous(),
                        self.weight_int8[g], self.scales[g]).float()
                    for g in range(groups))
        if self.zero_term is not None:
            group_sums = x2.float().view(x2.shape[0], groups, self.group_size).sum(-1)   # (M, G)
            y = y.float() - group_sums @ self.zero_term
        return y.to(x.dtype).reshape(*lead, self.out_features)


def _cpu_int4_group_size(weight: QuantizedWeight) -> int | None:
    """The kernel group size that represents this weight's groups exactly (scales repeated)."""
    return next((g for g in CPU_INT4_GROUP_SIZES if weight.group_size % g == 0), None)


class CpuInt4Kernel(nn.Module):
    """int4 weights with PyTorch's CPU tinygemm-style kernel.

    The kernel dequantizes w = (c - 8) * scale + offset per group, so the zero point becomes
    offset = (8 - z) * scale. Per-channel or large groups are expressed as repeated groups of
    the largest size the kernel accepts that divides the group size.
    """

    name = "cpu-int4"

    def __init__(self, weight: QuantizedWeight, compute_dtype: torch.dtype = CPU_COMPUTE_DTYPE):
        super().__init__()
        kernel_group = _cpu_int4_group_size(weight)
        repeat = weight.group_size // kernel_group
        scales = weight.scales.float()
        offsets = (8 - weight.zeros.float()) * scales
        scales_and_zeros = torch.stack([scales, offsets], dim=-1).repeat_interleave(repeat, dim=1)  # (N, K/g, 2)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            weight.codes.to(torch.int32).contiguous(), 2))                                    # (N, K/2) uint8
        self.register_buffer("scales_and_zeros", scales_and_zeros.transpose(0, 1).to(compute_dtype).contiguous())
        self.register_buffer("perm", weight.perm)
        self.kernel_group, self.out_features, self.compute_dtype = kernel_group, weight.out_features, compute_dtype

    @classmethod
    def supports(cls, weight: QuantizedWeight, device: torch.device) -> bool:
        return (device.type == "cpu" and weight.bits == 4 and weight.out_features % 16 == 0
                and _cpu_int4_group_size(weight) is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = _rows_2d(x, self.perm, self.compute_dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.kernel_group, self.scales_and_zeros)
        return y.to(x.dtype).reshape(*lead, self.out_features)


# Preference order; the first kernel that supports a weight on a device wins. zili's VNNI kernels
# (zili/kernels, used when their C++ extension builds on this CPU) come before PyTorch's.
KERNELS: list[type[nn.Module]] = [CpuVnniInt4Kernel, CpuVnniInt8Kernel, CpuInt4Kernel, CpuInt8Kernel]
KERNELS_BY_NAME = {k.name: k for k in [*KERNELS, ReferenceKernel]}


def select_kernel(weight: QuantizedWeight, device: torch.device | str, name: str | None = None) -> nn.Module:
    """Build the fastest kernel for `weight` on `device` (or the one called `name`), on that device."""
    device = torch.device(device)
    name = name or os.environ.get("ZILI_QUANT_KERNEL") or None
    weight = QuantizedWeight(weight.codes.to(device), weight.scales.to(device), weight.zeros.to(device),
                             weight.bits, weight.group_size, None if weight.perm is None else weight.perm.to(device))
    if name is not None:
        if name not in KERNELS_BY_NAME:
            raise ValueError(f"unknown quantized kernel {name!r}; choose one of {', '.join(KERNELS_BY_NAME)}")
        kernel = KERNELS_BY_NAME[name]
        if not kernel.supports(weight, device):
            raise ValueError(f"kernel {name!r} does not support {weight.bits}-bit weights "
                             f"of shape {tuple(weight.codes.shape)} on {device}")
        return kernel(weight)
    kernel = next((k for k in KERNELS if k.supports(weight, device)), ReferenceKernel)
    return kernel(weight)

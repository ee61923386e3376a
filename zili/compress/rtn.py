"""Round-to-nearest quantization and the primitives every method shares.

Scales and zero points follow the compressed-tensors / GPTQ conventions exactly (so packed
output matches those implementations bit for bit):

- symmetric:  s = max|w| / ((2**b - 1) / 2),  z = 2**(b-1)
- asymmetric: s = (max(w, 0) - min(w, 0)) / (2**b - 1),  z = round(-min(w, 0) / s)
- codes:      c = clamp(round(w / s + (z - 2**(b-1))) + 2**(b-1), 0, 2**b - 1)

Scales are rounded up to the dtype they are stored in (`scale_dtype`) before the codes are
computed: the stored scale is the one the codes were made for, and rounding up keeps every weight
within half a step of the grid (rounding down could push max|w| past the top code).
"""

from __future__ import annotations

import torch

from zili.compress.scheme import QuantScheme
from zili.layers.quantized.weight import QuantizedWeight


def _round_up_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values -> the nearest `dtype` values >= them, returned as fp32."""
    stored = values.to(dtype)
    stored = torch.where(stored.float() < values, torch.nextafter(stored, torch.full_like(stored, float("inf"))),
                         stored)
    return stored.float()


def compute_qparams(weight: torch.Tensor, scheme: QuantScheme,
                    scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: (N, K) -> (scales (N, G) fp32 holding `scale_dtype` values, zeros (N, G) uint8)."""
    n, k = weight.shape
    group_size = scheme.group_size_for(k)
    w = weight.float().reshape(n, k // group_size, group_size)
    w_min = w.amin(-1).clamp(max=0)  # zero must be representable
    w_max = w.amax(-1).clamp(min=0)
    if scheme.symmetric:
        scales = torch.maximum(-w_min, w_max) / (scheme.max_code / 2)
    else:
        scales = (w_max - w_min) / scheme.max_code
    scales = _round_up_to(torch.where(scales == 0, torch.finfo(scale_dtype).eps, scales), scale_dtype)
    if scheme.symmetric:
        zeros = torch.full_like(scales, scheme.mid_code)
    else:
        zeros = torch.round(-w_min / scales).clamp(0, scheme.max_code)
    return scales, zeros.to(torch.uint8)


def quantize_codes(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """weight: (N, K); scales, zeros: (N, G) -> codes (N, K) uint8."""
    n, k = weight.shape
    groups = scales.shape[1]
    mid, max_code = 1 << (bits - 1), (1 << bits) - 1
    w = weight.float().reshape(n, groups, k // groups)
    shift = (zeros.float() - mid)[..., None]
    signed = torch.round(w / scales[..., None] + shift)
    return (signed + mid).clamp(0, max_code).reshape(n, k).to(torch.uint8)


def rtn_quantize(weight: torch.Tensor, scheme: QuantScheme,
                 scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Round-to-nearest: weight (N, K) -> QuantizedWeight."""
    scales, zeros = compute_qparams(weight, scheme, scale_dtype)
    codes = quantize_codes(weight, scales, zeros, scheme.bits)
    return QuantizedWeight(codes, scales, zeros, scheme.bits, scheme.group_size_for(weight.shape[1]))


def fake_quantize(weight: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """quantize-dequantize, (N, K) -> (N, K) fp32: the weight the quantized layer will compute with."""
    return rtn_quantize(weight, scheme, scale_dtype).dequantize()


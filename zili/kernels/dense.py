"""Dense (unquantized) linear layers on zili's CPU kernels.

`dense_linear` is what `zili.layers.linear.Linear` calls first: it takes decode-sized bf16
inputs on the CPU (cpu_ext.MAX_KERNEL_ROWS) through the AVX512-BF16 GEMV, which reads the
layer's own row-major (N, K) weight, so no copy is kept. Everything else returns None and the
caller uses F.linear (oneDNN / AMX for prefill, autograd for training).
"""

from __future__ import annotations

import torch

from zili.kernels import cpu_ext


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x (..., K) @ weight (N, K).T + bias -> (..., N) through the bf16 kernel, or None where it does not apply."""
    if (weight.dtype is not torch.bfloat16 or x.dtype is not torch.bfloat16 or weight.device.type != "cpu"
            or x.device.type != "cpu" or x.dim() == 0 or x.shape[-1] != weight.shape[-1] or weight.shape[-1] == 0):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None  # the kernel has no backward
    rows = x.numel() // x.shape[-1]
    if not cpu_ext.use_kernel("bf16", rows) or not weight.is_contiguous() or not (bias is None or bias.is_contiguous()):
        return None
    y = cpu_ext.linear_bf16(x.reshape(rows, x.shape[-1]), weight, bias)  # (rows, N)
    return y.view(*x.shape[:-1], weight.shape[0])

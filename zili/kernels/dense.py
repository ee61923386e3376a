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
    """x (..., K) @ weight (N, K).T + bias -> (..., N) through the bf16 kernel, or None where it does not apply.

    Runs for every linear layer of every step: the checks are ordered cheapest first (~1 us).
    """
    if not (weight.dtype is torch.bfloat16 and x.dtype is torch.bfloat16 and weight.is_cpu and x.is_cpu):
        return None
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1]) if x.dim() > 0 else None
    if flat is None or flat.shape[1] != weight.shape[1] or flat.shape[1] == 0:
        return None
    if not cpu_ext.use_kernel("bf16", flat.shape[0]):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None  # the kernel has no backward
    if not weight.is_contiguous() or not (bias is None or bias.is_contiguous()):
        return None
    y = cpu_ext.linear_bf16(flat, weight, bias)  # (rows, N)
    return y if flat is x else y.view(*x.shape[:-1], weight.shape[0])

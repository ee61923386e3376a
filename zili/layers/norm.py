"""RMSNorm, computed in fp32 and cast back, as the Llama family defines it.

bf16 inference on the CPU runs zili's C++ row op (zili/kernels/cpu/rows.h), which rounds where
this module's PyTorch expression does; the expression stays the fallback and the test oracle.
"""

import torch
from torch import nn

from zili.kernels import cpu_ext


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_ext.use_row_kernel(x, self.weight):
            return cpu_ext.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

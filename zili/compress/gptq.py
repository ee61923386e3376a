"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): quantize a weight column by column, feeding
each column's rounding error back into the not-yet-quantized columns through the inverse Hessian
of the layer's reconstruction loss ||W X - Q X||^2, H = 2 X X^T / n.

Steps, as in the paper's Algorithm 1:
  dead inputs (H_ii = 0) are zeroed; H += damp * mean(diag H) * I; U = chol(H^-1) upper;
  for each block of B columns: quantize column i, err = (w_i - q_i) / U_ii,
  w_j -= err * U_ij for the block's later columns, then one matmul updates all later blocks.
Act-order processes columns by decreasing H_ii. zili uses static groups there: every group's
scale / zero point is fixed from the original weight before the loop, so the output stays in
the plain group-contiguous layout (no g_idx) and runs on the fast kernels.
"""

from __future__ import annotations

import torch

from zili.compress.rtn import compute_qparams
from zili.compress.scheme import QuantScheme
from zili.layers.quantized.weight import QuantizedWeight


class HessianAccumulator:
    """Running H = 2 / n * sum(x x^T) over every input row a layer sees, in fp32."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_rows = 0

    def add(self, x: torch.Tensor) -> None:
        """x: (..., in_features), one batch of the layer's inputs."""
        x = x.reshape(-1, x.shape[-1]).float()
        rows = x.shape[0]
        self.hessian *= self.num_rows / (self.num_rows + rows)
        self.num_rows += rows
        x = x * (2.0 / self.num_rows) ** 0.5
        self.hessian.addmm_(x.t(), x)


def _inverse_hessian_cholesky(hessian: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, raising the dampening until H is positive definite."""
    damp = damp_percent * torch.mean(torch.diag(hessian))
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
        damp = damp * 10 if damp > 0 else 1e-6 * torch.mean(torch.diag(hessian)) + 1e-8
    raise RuntimeError("GPTQ: the calibration Hessian is not positive definite even after dampening")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme,
                  block_size: int = 128, damp_percent: float = 0.01, act_order: bool = False,
                  scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """weight: (N, K); hessian: (K, K) of the layer's inputs -> QuantizedWeight."""
    w = weight.float().clone()                                   # (N, K)
    h = hessian.float().clone()
    n, k = w.shape
    group_size = scheme.group_size_for(k)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    static = act_order or scheme.group_size is None
    if static:  # every group's parameters from the original weight, before any error feedback
        scales, zeros = compute_qparams(w, scheme, scale_dtype)
    else:
        scales = torch.empty(n, k // group_size)
        zeros = torch.empty(n, k // group_size, dtype=torch.uint8)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    h = h[perm][:, perm]
    group_of_column = (perm // group_size).tolist()             # group of each processed column
    upper = _inverse_hessian_cholesky(h, damp_percent)

    if not static:  # blocks never straddle a group: its parameters come from its current (updated) weights
        block_size = max(block_size // group_size, 1) * group_size
    # Work on the transpose so that each processed column is a contiguous row: (K, N).
    w_t = w[:, perm].t().contiguous()
    codes_t = torch.empty(k, n, dtype=torch.uint8)
    mid, max_code = scheme.mid_code, scheme.max_code
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = w_t[start:end].clone()                          # (B, N)
        errors = torch.empty_like(block)
        u_block = upper[start:end, start:end]
        for i in range(end - start):
            column = start + i
            group = group_of_column[column]
            if not static and column % group_size == 0:
                group_scales, group_zeros = compute_qparams(block[i:i + group_size].t(), scheme, scale_dtype)
                scales[:, group], zeros[:, group] = group_scales[:, 0], group_zeros[:, 0]
            if i == 0 or column % group_size == 0 or static:
                s, shift = scales[:, group], zeros[:, group].float() - mid
            row = block[i]
            q = (torch.round(row / s + shift) + mid).clamp_(0, max_code)
            codes_t[column] = q.to(torch.uint8)
            err = (row - (q - mid - shift) * s) / u_block[i, i]
            block[i + 1:].addr_(u_block[i, i + 1:], err, alpha=-1)  # feed the error into later columns
            errors[i] = err
        w_t[end:] -= upper[start:end, end:].t() @ errors

    codes = torch.empty(n, k, dtype=torch.uint8)
    codes[:, perm] = codes_t.t()
    return QuantizedWeight(codes, scales, zeros, scheme.bits, group_size)

"""GPTQ and AWQ checkpoint tensors packed the way AutoGPTQ and AutoAWQ pack them.

Written from those projects' documented packing loops (plain Python over ints), independently of
zili.compress.packing, so tests of zili's readers compare against a second implementation.
Inputs use zili's convention: codes (N, K), scales / zeros (N, G), g_idx (K,) group per column.
"""

from __future__ import annotations

import torch

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def _to_int32(words: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words], dtype=torch.int32)


def autogptq_tensors(codes, scales, zeros, bits, g_idx=None, v1=True) -> dict[str, torch.Tensor]:
    """qweight (K*bits/32, N), qzeros (G, N*bits/32) with v1's `zeros - 1`, scales (G, N), g_idx (K,)."""
    n, k = codes.shape
    per = 32 // bits
    intweight = codes.t().tolist()                          # (K, N)
    qweight = []
    for row in range(k // per):                             # AutoGPTQ: qweight[row] |= intweight[j] << bits*(j-i)
        words = [0] * n
        for j in range(row * per, row * per + per):
            for col in range(n):
                words[col] |= intweight[j][col] << (bits * (j - row * per))
        qweight.append(words)
    stored = (zeros.t().long() - (1 if v1 else 0)).tolist()  # (G, N)
    mask = (1 << bits) - 1
    qzeros = []
    for group_row in stored:
        words = []
        for col in range(n // per):
            word = 0
            for j in range(col * per, col * per + per):
                word |= (group_row[j] & mask) << (bits * (j - col * per))
            words.append(word)
        qzeros.append(words)
    group_size = k // scales.shape[1]
    g_idx = torch.arange(k) // group_size if g_idx is None else g_idx
    return {"qweight": _to_int32(qweight), "qzeros": _to_int32(qzeros),
            "scales": scales.t().contiguous().half(), "g_idx": g_idx.to(torch.int32)}


def autoawq_tensors(codes, scales, zeros) -> dict[str, torch.Tensor]:
    """qweight (K, N/8), qzeros (G, N/8), scales (G, N): AutoAWQ's WQLinear_GEMM.from_linear packing."""
    intweight = codes.t().tolist()                          # (K, N)
    zero_rows = zeros.t().tolist()                          # (G, N)
    n = codes.shape[0]

    def pack_rows(rows):
        out = []
        for values in rows:
            words = []
            for col in range(n // 8):
                word = 0
                for i in range(8):
                    word |= values[col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
                words.append(word)
            out.append(words)
        return _to_int32(out)

    return {"qweight": pack_rows(intweight), "qzeros": pack_rows(zero_rows), "scales": scales.t().contiguous().half()}


def random_quantized(out_features, in_features, group_size, bits=4, symmetric=False, seed=0):
    """Random codes / scales / zeros in zili's convention, scales exactly representable in fp16."""
    g = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=g).to(torch.uint8)
    scales = (torch.rand(out_features, groups, generator=g) * 0.02 + 0.005).half().float()
    if symmetric:
        zeros = torch.full((out_features, groups), 1 << (bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(1, 1 << bits, (out_features, groups), generator=g).to(torch.uint8)
    return codes, scales, zeros


def dequantize(codes, scales, zeros, g_idx):
    """w[n, k] = (codes[n, k] - zeros[n, g_idx[k]]) * scales[n, g_idx[k]], in fp32."""
    return (codes.float() - zeros.float()[:, g_idx]) * scales[:, g_idx]

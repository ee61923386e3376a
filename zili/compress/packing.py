"""Bit packing of 4- and 8-bit codes into int32 words, as the checkpoint layouts store them.

Element i of a run of 32 / bits consecutive values sits at bits [i*bits, (i+1)*bits) of its
word (little-endian nibble / byte order). This is the compressed-tensors "pack-quantized",
GPTQ and AWQ convention; AWQ additionally interleaves the 8 columns of each word (`AWQ_ORDER`).
A dimension that is not a multiple of 32 / bits is padded with zero codes (compressed-tensors).
"""

from __future__ import annotations

import torch

from zili.errors import CheckpointFormatError

# AutoAWQ's GEMM layout: word slot i holds column AWQ_ORDER[i] of each group of 8 columns.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def packed_length(length: int, bits: int) -> int:
    return -(-length * bits // 32)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """codes: 2-D, unsigned values in [0, 2**bits) -> int32, `dim` shrunk by 32 / bits (rounded up)."""
    if bits not in (4, 8):
        raise ValueError(f"can only pack 4- or 8-bit codes, got {bits}")
    values = codes.to(torch.int64)
    if dim == 0:
        values = values.t()
    per_word = 32 // bits
    rows, cols = values.shape
    padded = packed_length(cols, bits) * per_word
    if padded > cols:
        values = torch.nn.functional.pad(values, (0, padded - cols))
    shifts = torch.arange(per_word, dtype=torch.int64, device=values.device) * bits
    words = (values.view(rows, -1, per_word) << shifts).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # two's complement
    return (words.t() if dim == 0 else words).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1, name: str = "packed tensor") -> torch.Tensor:
    """Inverse of `pack_int32`: int32 words -> uint8 codes with `length` entries along `dim`."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise CheckpointFormatError(f"{name} must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    per_word = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        words = words.t()
    if words.shape[1] != packed_length(length, bits):
        raise CheckpointFormatError(
            f"{name} {tuple(packed.shape)} holds {words.shape[1]} words along dim {dim}, "
            f"expected {packed_length(length, bits)} for {length} {bits}-bit values")
    shifts = torch.arange(per_word, dtype=torch.int64, device=words.device) * bits
    values = ((words[..., None] >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1)[:, :length]
    values = values.to(torch.uint8)
    return (values.t() if dim == 0 else values).contiguous()


def awq_interleave(columns: torch.Tensor) -> torch.Tensor:
    """(R, C) codes in natural column order -> the order AWQ packs them in (C a multiple of 8)."""
    rows, cols = columns.shape
    return columns.view(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)].reshape(rows, cols)


def awq_deinterleave(slots: torch.Tensor) -> torch.Tensor:
    """Inverse of `awq_interleave`."""
    rows, cols = slots.shape
    out = torch.empty_like(slots).view(rows, cols // 8, 8)
    out[:, :, list(AWQ_ORDER)] = slots.view(rows, cols // 8, 8)
    return out.reshape(rows, cols)

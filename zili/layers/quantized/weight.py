"""The canonical in-memory form of a group-quantized weight matrix.

Every checkpoint layout (compressed-tensors, GPTQ, AWQ) decodes to a `QuantizedWeight`, every
quantization method (RTN, GPTQ, AWQ) produces one, and every matmul kernel packs one into its own
layout once at load time. Dequantization is

    w[n, k] = (codes[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]

with unsigned codes in [0, 2**bits). Symmetric schemes have zeros == 2**(bits - 1) everywhere.
Activation-ordered GPTQ checkpoints (a non-trivial g_idx) are stored with their input columns
permuted so that groups are contiguous: column j of `codes` multiplies input feature `perm[j]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zili.errors import CheckpointFormatError


@dataclass
class QuantizedWeight:
    codes: torch.Tensor
    """(out_features, in_features) uint8, values in [0, 2**bits)."""
    scales: torch.Tensor
    """(out_features, num_groups) float."""
    zeros: torch.Tensor
    """(out_features, num_groups) uint8 zero points, in the same unsigned domain as the codes."""
    bits: int
    group_size: int
    """Input columns per group; equals in_features for per-channel quantization."""
    perm: torch.Tensor | None = None
    """(in_features,) int64: column j of `codes` belongs to input feature perm[j]; None = identity."""

    def __post_init__(self):
        out_features, in_features = self.codes.shape
        if self.group_size <= 0 or in_features % self.group_size:
            raise CheckpointFormatError(
                f"group size {self.group_size} does not divide the input dimension {in_features}")
        groups = (out_features, in_features // self.group_size)
        if tuple(self.scales.shape) != groups or tuple(self.zeros.shape) != groups:
            raise CheckpointFormatError(
                f"scales {tuple(self.scales.shape)} / zeros {tuple(self.zeros.shape)} do not match "
                f"{groups} groups for a {out_features}x{in_features} weight")
        if self.perm is not None and tuple(self.perm.shape) != (in_features,):
            raise CheckpointFormatError(f"g_idx / permutation must have {in_features} entries")

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def symmetric(self) -> bool:
        return bool((self.zeros == 1 << (self.bits - 1)).all())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out_features, in_features) weight in `perm` column order (identity when perm is None)."""
        scales = self.scales.float().repeat_interleave(self.group_size, dim=1)
        zeros = self.zeros.float().repeat_interleave(self.group_size, dim=1)
        return ((self.codes.float() - zeros) * scales).to(dtype)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out_features, in_features) weight in the original input order."""
        weight = self.dequantize(dtype)
        if self.perm is None:
            return weight
        out = torch.empty_like(weight)
        out[:, self.perm] = weight
        return out

    def rows(self, start: int, end: int) -> "QuantizedWeight":
        """Output rows [start, end): the part of a fused weight that belongs to one shard."""
        return QuantizedWeight(self.codes[start:end], self.scales[start:end], self.zeros[start:end],
                               self.bits, self.group_size, self.perm)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack shards (q, k, v or gate, up) along the output dimension into one fused weight."""
    first = parts[0]
    for part in parts[1:]:
        if (part.bits, part.group_size, part.in_features) != (first.bits, first.group_size, first.in_features):
            raise CheckpointFormatError("the shards of a fused layer use different quantization schemes")
        if (part.perm is None) != (first.perm is None) or (
                part.perm is not None and not torch.equal(part.perm, first.perm)):
            raise CheckpointFormatError(
                "the shards of a fused layer (q/k/v or gate/up) have different act-order g_idx; "
                "zili needs one input order per fused layer")
    if len(parts) == 1:
        return first
    return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                           torch.cat([p.zeros for p in parts]), first.bits, first.group_size, first.perm)


def perm_from_g_idx(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """Input permutation making the groups of an act-order g_idx contiguous; None if already in order.

    g_idx: (in_features,) group index of each input feature. Every group must hold exactly
    `group_size` features (what GPTQ's act-order produces).
    """
    g_idx = g_idx.to(torch.int64)
    in_features = g_idx.numel()
    if in_features % group_size:
        raise CheckpointFormatError(f"group size {group_size} does not divide the input dimension {in_features}")
    natural = torch.arange(in_features) // group_size
    if torch.equal(g_idx, natural):
        return None
    counts = torch.bincount(g_idx, minlength=in_features // group_size) if g_idx.numel() else g_idx
    if g_idx.min() < 0 or counts.numel() != in_features // group_size or not (counts == group_size).all():
        raise CheckpointFormatError("g_idx does not assign exactly group_size input features to every group")
    return torch.argsort(g_idx, stable=True)

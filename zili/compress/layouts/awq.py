"""AWQ checkpoints in AutoAWQ's GEMM layout (quant_method "awq", version "gemm").

Per quantized Linear (N outputs, K inputs, G = K / group_size groups, 4-bit codes):
  qweight  (K, N/8) int32  codes packed along N, the 8 columns of a word in AWQ_ORDER
  qzeros   (G, N/8) int32  zero points, packed the same way (no offset)
  scales   (G, N)   float16
  bias     (N,)            optional
"""

from __future__ import annotations

from typing import Any

import torch

from zili.compress.packing import awq_deinterleave, unpack_int32
from zili.errors import CheckpointFormatError
from zili.layers.quantized.weight import QuantizedWeight

BITS = 4


class AwqDecoder:
    def __init__(self, group_size: int, zero_point: bool):
        self.group_size, self.zero_point = group_size, zero_point
        self.required_tensors = ("qweight", "scales", *(("qzeros",) if zero_point else ()))
        self.optional_tensors = () if zero_point else ("qzeros",)

    def decode(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int) -> QuantizedWeight:
        group_size = in_features if self.group_size == -1 else self.group_size
        groups = in_features // group_size
        if out_features % 8:
            raise CheckpointFormatError(f"AWQ GEMM layers need a multiple of 8 outputs, got {out_features}")
        codes = awq_deinterleave(unpack_int32(tensors["qweight"], BITS, out_features, 1, "qweight"))    # (K, N)
        if codes.shape[0] != in_features:
            raise CheckpointFormatError(f"qweight has {codes.shape[0]} rows, expected {in_features}")
        scales = tensors["scales"]
        if tuple(scales.shape) != (groups, out_features) or not scales.is_floating_point():
            raise CheckpointFormatError(f"scales has shape {tuple(scales.shape)}, expected ({groups}, {out_features})")
        if "qzeros" in tensors:
            zeros = awq_deinterleave(unpack_int32(tensors["qzeros"], BITS, out_features, 1, "qzeros"))  # (G, N)
            if zeros.shape[0] != groups:
                raise CheckpointFormatError(f"qzeros has {zeros.shape[0]} rows, expected {groups}")
        else:
            zeros = torch.full((groups, out_features), 1 << (BITS - 1), dtype=torch.uint8)
        return QuantizedWeight(codes.t().contiguous(), scales.t().float().contiguous(), zeros.t().contiguous(),
                               BITS, group_size)


class AwqLayout:
    """All Linear layers of the decoder stack are quantized except `modules_to_not_convert`."""

    name = "awq"

    def __init__(self, config: dict[str, Any]):
        bits = config.get("bits", config.get("w_bit"))
        if bits != BITS:
            raise CheckpointFormatError(f"AWQ checkpoints with {bits}-bit weights are not supported (4-bit only)")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointFormatError(f"AWQ version {version!r} is not supported; zili reads the GEMM layout")
        group_size = int(config.get("group_size", config.get("q_group_size", 128)))
        if group_size != -1 and group_size <= 0:
            raise CheckpointFormatError(f"AWQ group_size {group_size} is invalid")
        self.skip = list(config.get("modules_to_not_convert") or [])
        self.decoder = AwqDecoder(group_size, bool(config.get("zero_point", True)))

    def decoder_for(self, checkpoint_names: list[str]) -> AwqDecoder | None:
        name = checkpoint_names[0]
        if name == "lm_head" or any(s in name for s in self.skip):
            return None
        return self.decoder

"""GPTQ checkpoints as AutoGPTQ / GPTQModel write them (quant_method "gptq").

Per quantized Linear (N outputs, K inputs, G = K / group_size groups, b-bit codes):
  qweight  (K*b/32, N) int32  codes packed along K (the transposed weight)
  qzeros   (G, N*b/32) int32  zero points packed along N; format "gptq" (v1) stores z - 1
  scales   (G, N)      float16
  g_idx    (K,)        int32  group of each input column (non-trivial with desc_act / act-order)
  bias     (N,)               optional
group_size -1 means one group (per output channel).
"""

from __future__ import annotations

from typing import Any

import torch

from zili.compress.packing import unpack_int32
from zili.errors import CheckpointFormatError
from zili.layers.quantized.weight import QuantizedWeight, perm_from_g_idx


class GptqDecoder:
    def __init__(self, bits: int, group_size: int, zeros_minus_one: bool, desc_act: bool):
        self.bits, self.group_size, self.zeros_minus_one = bits, group_size, zeros_minus_one
        self.required_tensors = ("qweight", "qzeros", "scales", *(("g_idx",) if desc_act else ()))
        self.optional_tensors = () if desc_act else ("g_idx",)

    def decode(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int) -> QuantizedWeight:
        group_size = in_features if self.group_size == -1 else self.group_size
        groups = in_features // group_size
        codes = unpack_int32(tensors["qweight"], self.bits, in_features, 0, "qweight")         # (K, N)
        zeros = unpack_int32(tensors["qzeros"], self.bits, out_features, 1, "qzeros")         # (G, N)
        scales = tensors["scales"]
        if codes.shape[1] != out_features or tuple(zeros.shape) != (groups, out_features):
            raise CheckpointFormatError(
                f"qweight {tuple(tensors['qweight'].shape)} / qzeros {tuple(tensors['qzeros'].shape)} do not fit "
                f"a {out_features}x{in_features} layer with {groups} groups")
        if tuple(scales.shape) != (groups, out_features) or not scales.is_floating_point():
            raise CheckpointFormatError(f"scales has shape {tuple(scales.shape)}, expected ({groups}, {out_features})")
        if self.zeros_minus_one:  # v1 stores z - 1; AutoGPTQ's kernels add the 1 back unmasked
            zeros = zeros + 1
        codes, perm = codes.t(), None
        if "g_idx" in tensors:
            perm = perm_from_g_idx(tensors["g_idx"], group_size)
            if perm is not None:
                codes = codes[:, perm]
        return QuantizedWeight(codes.contiguous(), scales.t().float().contiguous(), zeros.t().contiguous(),
                               self.bits, group_size, perm)


class GptqLayout:
    """All Linear layers of the decoder stack are quantized; lm_head only with "lm_head": true."""

    name = "gptq"

    def __init__(self, config: dict[str, Any]):
        bits = config.get("bits")
        if bits not in (4, 8):
            raise CheckpointFormatError(f"GPTQ checkpoints with {bits}-bit weights are not supported (4 or 8)")
        group_size = int(config.get("group_size", -1))
        if group_size != -1 and group_size <= 0:
            raise CheckpointFormatError(f"GPTQ group_size {group_size} is invalid")
        fmt = config.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointFormatError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        self.quantize_lm_head = bool(config.get("lm_head", False))
        self.skip = list(config.get("modules_to_not_convert") or [])
        self.decoder = GptqDecoder(bits, group_size, zeros_minus_one=fmt == "gptq",
                                   desc_act=bool(config.get("desc_act", False)))

    def decoder_for(self, checkpoint_names: list[str]) -> GptqDecoder | None:
        name = checkpoint_names[0]
        if name == "lm_head":
            return self.decoder if self.quantize_lm_head else None
        if any(s in name for s in self.skip):
            return None
        return self.decoder

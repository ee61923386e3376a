"""The compressed-tensors "pack-quantized" layout (llm-compressor writes it, vLLM serves it).

Per quantized Linear (N outputs, K inputs, G groups), with b-bit codes:
  weight_packed      (N, ceil(K*b/32)) int32  codes packed along K (see zili.compress.packing)
  weight_scale       (N, G)            float  (G = 1 for the "channel" strategy)
  weight_shape       (2,)              int64  [N, K]
  weight_zero_point  (ceil(N*b/32), G) int32  asymmetric only, packed along N
  weight_g_idx       (K,)              int32  actorder "group" only: group of each input column
Codes and zero points are stored signed (c - 2**(b-1)) and offset back to unsigned when packed,
so the packed bits hold the unsigned values zili uses internally.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from zili.compress.packing import pack_int32, unpack_int32
from zili.compress.scheme import QuantizeOptions, QuantScheme
from zili.errors import CheckpointFormatError
from zili.layers.quantized.weight import QuantizedWeight, perm_from_g_idx

FORMAT = "pack-quantized"


class PackQuantizedDecoder:
    """Decodes one quantized Linear of a pack-quantized checkpoint."""

    def __init__(self, bits: int, group_size: int | None, symmetric: bool, act_order_groups: bool):
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.required_tensors = ("weight_packed", "weight_scale", "weight_shape",
                                 *(() if symmetric else ("weight_zero_point",)),
                                 *(("weight_g_idx",) if act_order_groups else ()))
        self.optional_tensors = () if act_order_groups else ("weight_g_idx",)

    def decode(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int) -> QuantizedWeight:
        shape = tuple(int(v) for v in tensors["weight_shape"].flatten().tolist())
        if shape != (out_features, in_features):
            raise CheckpointFormatError(f"weight_shape {shape} does not match the layer ({out_features}, {in_features})")
        group_size = in_features if self.group_size is None else self.group_size
        groups = in_features // group_size
        codes = unpack_int32(tensors["weight_packed"], self.bits, in_features, 1, "weight_packed")
        if codes.shape[0] != out_features:
            raise CheckpointFormatError(f"weight_packed has {codes.shape[0]} rows, expected {out_features}")
        scales = tensors["weight_scale"]
        if scales.dim() == 1 and groups == 1:
            scales = scales[:, None]
        if tuple(scales.shape) != (out_features, groups) or not scales.is_floating_point():
            raise CheckpointFormatError(
                f"weight_scale has shape {tuple(scales.shape)}, expected ({out_features}, {groups}) floats")
        if self.symmetric:
            zeros = torch.full((out_features, groups), 1 << (self.bits - 1), dtype=torch.uint8)
        else:
            zeros = unpack_int32(tensors["weight_zero_point"], self.bits, out_features, 0, "weight_zero_point")
        perm = None
        if "weight_g_idx" in tensors:
            perm = perm_from_g_idx(tensors["weight_g_idx"], group_size)
            if perm is not None:
                codes = codes[:, perm]
        return QuantizedWeight(codes, scales.float(), zeros, self.bits, group_size, perm)


def encode(weight: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One quantized Linear -> its pack-quantized tensors (local names, without the module prefix)."""
    if weight.perm is not None:
        raise ValueError("zili writes act-order weights with static groups (no g_idx)")
    tensors = {
        "weight_packed": pack_int32(weight.codes, weight.bits, dim=1),
        "weight_scale": weight.scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([weight.out_features, weight.in_features], dtype=torch.int64),
    }
    if not weight.symmetric:
        tensors["weight_zero_point"] = pack_int32(weight.zeros, weight.bits, dim=0)
    return tensors


def quantization_config(options: QuantizeOptions, ignore: list[str], calibration: dict[str, Any] | None) -> dict:
    """The config.json `quantization_config` of a zili-quantized model.

    Standard compressed-tensors fields (what vLLM and transformers read) plus a "zili" entry
    recording how the weights were made (method, calibration); readers ignore unknown keys.
    """
    scheme = options.scheme
    weights = {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "strategy": "channel" if scheme.group_size is None else "group",
        "group_size": scheme.group_size,
        "dynamic": False,
        "actorder": "static" if options.method == "gptq" and options.act_order else None,
        "observer": "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": FORMAT}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "zili": {"method": options.method, "act_order": options.act_order, **(calibration or {})},
    }


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or pattern == "Linear"


class CompressedTensorsLayout:
    """Which Linear layers a compressed-tensors checkpoint quantizes, and their decoders."""

    name = "compressed-tensors"

    def __init__(self, config: dict[str, Any]):
        fmt = config.get("format")
        if fmt != FORMAT:
            raise CheckpointFormatError(
                f"compressed-tensors format {fmt!r} is not supported; zili reads {FORMAT!r} (int4 / int8 weights)")
        status = config.get("quantization_status", "compressed")
        if status != "compressed":
            raise CheckpointFormatError(f"compressed-tensors checkpoint is {status!r}, not 'compressed'")
        self.ignore = list(config.get("ignore") or [])
        self.groups: list[tuple[list[str], PackQuantizedDecoder]] = []
        for name, group in (config.get("config_groups") or {}).items():
            self.groups.append((list(group.get("targets") or []), self._decoder(name, group)))
        if not self.groups:
            raise CheckpointFormatError("compressed-tensors quantization_config has no config_groups")

    @staticmethod
    def _decoder(name: str, group: dict[str, Any]) -> PackQuantizedDecoder:
        weights = group.get("weights") or {}
        if group.get("input_activations"):
            raise CheckpointFormatError(f"{name}: activation quantization is not supported (weight-only int4/int8)")
        if weights.get("type", "int") != "int" or weights.get("num_bits") not in (4, 8):
            raise CheckpointFormatError(
                f"{name}: only int4 / int8 weights are supported, got {weights.get('type')} {weights.get('num_bits')}-bit")
        strategy = weights.get("strategy")
        if strategy not in ("group", "channel"):
            raise CheckpointFormatError(f"{name}: weight strategy {strategy!r} is not supported (group, channel)")
        group_size = weights.get("group_size") if strategy == "group" else None
        QuantScheme(weights["num_bits"], group_size, bool(weights.get("symmetric", True)))  # validates
        return PackQuantizedDecoder(weights["num_bits"], group_size, bool(weights.get("symmetric", True)),
                                    act_order_groups=weights.get("actorder") in ("group", "dynamic"))

    def _decoder_of(self, name: str) -> PackQuantizedDecoder | None:
        if any(p != "Linear" and _matches(p, name) for p in self.ignore):
            return None
        return next((d for targets, d in self.groups if any(_matches(t, name) for t in targets)), None)

    def decoder_for(self, checkpoint_names: list[str]) -> PackQuantizedDecoder | None:
        """Decoder for a layer whose shards have these checkpoint module names; None = not quantized."""
        found = [self._decoder_of(name) for name in checkpoint_names]
        if any(d is not found[0] for d in found):
            raise CheckpointFormatError(f"fused layer {checkpoint_names} mixes differently quantized shards")
        return found[0]

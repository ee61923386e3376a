"""Quantized checkpoints -> model: swap the Linear layers a checkpoint quantizes for QuantLinear.

The loader calls `prepare_quantized_model` after building the dense skeleton and before reading
weights. Each replaced layer keeps its shape, fused shards and bias, and gets the decoder of the
checkpoint's layout (zili.compress.layouts); the loader then streams the packed tensors into it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from zili.compress.layouts import layout_for
from zili.config import ModelConfig
from zili.errors import CheckpointFormatError
from zili.layers.linear import Linear
from zili.layers.quantized import QuantLinear


def checkpoint_names(model: nn.Module, module_path: str) -> list[str]:
    """Checkpoint module names of a layer's shards: ...qkv_proj -> [...q_proj, ...k_proj, ...v_proj]."""
    parent, _, leaf = module_path.rpartition(".")
    shards = sorted((index, name) for name, (fused, index) in getattr(model, "packed_modules", {}).items()
                    if fused == leaf)
    if not shards:
        return [module_path]
    return [f"{parent}.{name}" if parent else name for _, name in shards]


def quantized_linears(model: nn.Module, config: ModelConfig, include_lm_head: bool = True):
    """(path, Linear) for every Linear layer a quantization may replace, in forward order."""
    for path, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        if path == "lm_head" and (config.tie_word_embeddings or not include_lm_head):
            continue  # a tied head is the embedding matrix, which stays in full precision
        yield path, module


def prepare_quantized_model(model: nn.Module, config: ModelConfig, quant_config: dict[str, Any]) -> nn.Module:
    """Replace, in place, every Linear the checkpoint quantizes with an empty QuantLinear."""
    layout = layout_for(quant_config)
    for path, module in list(quantized_linears(model, config)):
        decoder = layout.decoder_for(checkpoint_names(model, path))
        if decoder is None:
            continue
        group_size = getattr(decoder, "group_size", None)
        if group_size not in (None, -1) and module.in_features % group_size:
            raise CheckpointFormatError(
                f"{path}: group size {group_size} does not divide its input dimension {module.in_features}")
        layer = QuantLinear(module.in_features, module.output_sizes, module.bias is not None, decoder,
                            dtype=module.weight.dtype, device=module.weight.device)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
    return model

"""Quantized checkpoint layouts, by the `quant_method` of config.json's quantization_config.

A layout says which Linear layers a checkpoint quantizes (`decoder_for(checkpoint names)`) and
how to decode their tensors into a `QuantizedWeight`. A new layout is one file plus one line here.
"""

from __future__ import annotations

from typing import Any

from zili.compress.layouts.awq import AwqLayout
from zili.compress.layouts.compressed_tensors import CompressedTensorsLayout
from zili.compress.layouts.gptq import GptqLayout
from zili.errors import CheckpointFormatError

LAYOUTS = {
    "compressed-tensors": CompressedTensorsLayout,
    "gptq": GptqLayout,
    "awq": AwqLayout,
}


def layout_for(quantization_config: dict[str, Any]):
    if not isinstance(quantization_config, dict):
        raise CheckpointFormatError("config.json: quantization_config must be an object")
    method = str(quantization_config.get("quant_method", "")).lower()
    if method not in LAYOUTS:
        raise CheckpointFormatError(
            f"quantization method {method!r} is not supported; zili reads {', '.join(LAYOUTS)} checkpoints")
    return LAYOUTS[method](quantization_config)

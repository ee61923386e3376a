"""AWQ GEMM tensors against AutoAWQ's packing loop and compressed-tensors' AutoAWQ converter."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from foreign_layouts import autoawq_tensors, dequantize, random_quantized

from zili.compress.layouts import layout_for
from zili.compress.layouts.awq import AwqDecoder
from zili.errors import CheckpointFormatError


@pytest.mark.parametrize("group", [32, 64])
def test_decode_matches_autoawq_and_the_compressed_tensors_converter(group):
    n, k = 48, 128
    codes, scales, zeros = random_quantized(n, k, group, seed=group)
    tensors = autoawq_tensors(codes, scales, zeros)
    decoded = AwqDecoder(group, zero_point=True).decode(dict(tensors), n, k)
    ours = decoded.dense()
    torch.testing.assert_close(ours, dequantize(codes, scales, zeros, torch.arange(k) // group), rtol=0, atol=0)
    # an independent reader: compressed-tensors converts AutoAWQ tensors to pack-quantized ones
    converted = AutoAWQConverter(bits=4, group_size=group, zero_point=True).process(
        {f"layer.{name}": t for name, t in tensors.items()})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, symmetric=False, strategy="group", group_size=group))
    state = {name.removeprefix("layer."): t for name, t in converted.items()}
    theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]    # fp16, like the scales
    assert torch.equal(decoded.dense(torch.float16), theirs)


def test_config_parsing_and_errors():
    layout = layout_for({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
                         "modules_to_not_convert": ["visual"]})
    assert layout.decoder_for(["model.layers.0.self_attn.q_proj"]).group_size == 64
    assert layout.decoder_for(["lm_head"]) is None and layout.decoder_for(["visual.proj"]) is None
    with pytest.raises(CheckpointFormatError, match="GEMM"):
        layout_for({"quant_method": "awq", "bits": 4, "version": "gemv"})
    with pytest.raises(CheckpointFormatError, match="8-bit"):
        layout_for({"quant_method": "awq", "bits": 8})
    tensors = autoawq_tensors(*random_quantized(16, 64, 32))
    with pytest.raises(CheckpointFormatError, match="multiple of 8"):
        AwqDecoder(32, True).decode(tensors, 12, 64)
    with pytest.raises(CheckpointFormatError, match="qweight has 64 rows"):
        AwqDecoder(32, True).decode(tensors, 16, 32)

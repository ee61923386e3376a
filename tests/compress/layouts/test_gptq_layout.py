"""GPTQ (AutoGPTQ / GPTQModel) tensors: hand-computed words and loops written after AutoGPTQ's packer."""

import pytest
import torch
from foreign_layouts import autogptq_tensors, dequantize, random_quantized

from zili.compress.layouts import layout_for
from zili.compress.layouts.gptq import GptqDecoder
from zili.errors import CheckpointFormatError


def test_hand_computed_tensors():
    # one output, 8 inputs with codes 1..8 packed in one word, one group, zero point 8, scale 0.5
    tensors = {"qweight": torch.tensor([[0x87654321 - (1 << 32)]], dtype=torch.int32),   # (K*4/32, N) = (1, 1)
               "qzeros": torch.tensor([[0x7]], dtype=torch.int32),                      # v1 stores z - 1 = 7
               "scales": torch.tensor([[0.5]], dtype=torch.float16)}
    decoded = GptqDecoder(4, -1, zeros_minus_one=True, desc_act=False).decode(tensors, 1, 8)
    assert decoded.codes.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert decoded.zeros.tolist() == [[8]]
    assert decoded.dense().tolist() == [[(c - 8) * 0.5 for c in range(1, 9)]]
    v2 = GptqDecoder(4, -1, zeros_minus_one=False, desc_act=False).decode(tensors, 1, 8)
    assert v2.zeros.tolist() == [[7]]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("v1", [True, False])
def test_decode_matches_autogptq_packing(bits, act_order, v1):
    n, k, group = 32, 128, 32
    codes, scales, zeros = random_quantized(n, k, group, bits, seed=bits + act_order)
    g_idx = torch.randperm(k, generator=torch.Generator().manual_seed(7)) // group if act_order else torch.arange(k) // group
    tensors = autogptq_tensors(codes, scales, zeros, bits, g_idx, v1=v1)
    decoder = GptqDecoder(bits, group, zeros_minus_one=v1, desc_act=act_order)
    decoded = decoder.decode(tensors, n, k)
    assert (decoded.perm is not None) == act_order
    torch.testing.assert_close(decoded.dense(), dequantize(codes, scales, zeros, g_idx), rtol=0, atol=0)


def test_per_channel_group_size_minus_one():
    codes, scales, zeros = random_quantized(16, 64, 64, seed=3)
    decoded = GptqDecoder(4, -1, True, False).decode(autogptq_tensors(codes, scales, zeros, 4), 16, 64)
    assert decoded.group_size == 64
    torch.testing.assert_close(decoded.dense(), dequantize(codes, scales, zeros, torch.zeros(64, dtype=torch.long)))


def test_config_parsing_and_errors():
    layout = layout_for({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True})
    assert layout.decoder_for(["model.layers.0.mlp.down_proj"]).required_tensors[-1] == "g_idx"
    assert layout.decoder_for(["lm_head"]) is None
    assert layout_for({"quant_method": "gptq", "bits": 4, "lm_head": True}).decoder_for(["lm_head"]) is not None
    with pytest.raises(CheckpointFormatError, match="3-bit"):
        layout_for({"quant_method": "gptq", "bits": 3, "group_size": 128})
    with pytest.raises(CheckpointFormatError, match="checkpoint_format 'marlin'"):
        layout_for({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"})
    decoder = GptqDecoder(4, 32, True, False)
    tensors = autogptq_tensors(*random_quantized(16, 64, 32), 4)
    with pytest.raises(CheckpointFormatError, match="qzeros .* expected 3 for 24"):
        decoder.decode(tensors, 24, 64)
    with pytest.raises(CheckpointFormatError, match="scales has shape"):
        decoder.decode({**tensors, "scales": tensors["scales"][:1]}, 16, 64)

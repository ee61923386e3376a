"""pack-quantized tensors and config against the compressed-tensors package's own compressor."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

from zili.compress.layouts import layout_for
from zili.compress.layouts.compressed_tensors import PackQuantizedDecoder, encode, quantization_config
from zili.compress.packing import pack_int32
from zili.compress.rtn import rtn_quantize
from zili.compress.scheme import QuantizeOptions, QuantScheme
from zili.errors import CheckpointFormatError

SCHEMES = [QuantScheme(bits, group, sym) for bits in (4, 8) for group in (32, None) for sym in (True, False)]


def their_scheme(scheme: QuantScheme) -> QuantizationScheme:
    args = QuantizationArgs(num_bits=scheme.bits, symmetric=scheme.symmetric, group_size=scheme.group_size,
                            strategy="channel" if scheme.group_size is None else "group")
    return QuantizationScheme(targets=["Linear"], weights=args)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
def test_encode_equals_their_compressor_bit_for_bit(scheme):
    weight = torch.randn(40, 128, generator=torch.Generator().manual_seed(4))
    quantized = rtn_quantize(weight, scheme)
    state = {"weight": weight, "weight_scale": quantized.scales,
             "weight_zero_point": (quantized.zeros.int() - scheme.mid_code).to(torch.int8)}
    theirs = PackedQuantizationCompressor.compress(state, their_scheme(scheme))
    ours = encode(quantized, torch.float32)
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
def test_decode_equals_their_decompressor(scheme):
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(5))
    tensors = encode(rtn_quantize(weight, scheme, torch.bfloat16), torch.bfloat16)
    theirs = PackedQuantizationCompressor.decompress(dict(tensors), their_scheme(scheme))["weight"]
    decoder = PackQuantizedDecoder(scheme.bits, scheme.group_size, scheme.symmetric, act_order_groups=False)
    ours = decoder.decode(tensors, 24, 64).dense(torch.bfloat16)
    assert torch.equal(ours, theirs)


def test_act_order_g_idx_is_honoured():
    """actorder "group": columns stay in place and g_idx names each column's group."""
    g = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 16, (16, 64), generator=g).to(torch.uint8)
    scales = torch.rand(16, 2, generator=g) + 0.5
    g_idx = torch.randperm(64, generator=g) // 32
    expected = (codes.float() - 8) * scales[:, g_idx]
    tensors = {"weight_packed": pack_int32(codes, 4), "weight_scale": scales,
               "weight_shape": torch.tensor([16, 64]), "weight_g_idx": g_idx.int()}
    decoder = PackQuantizedDecoder(4, 32, symmetric=True, act_order_groups=True)
    assert "weight_g_idx" in decoder.required_tensors
    torch.testing.assert_close(decoder.decode(tensors, 16, 64).dense(), expected, rtol=0, atol=0)


def test_written_config_is_valid_for_compressed_tensors():
    options = QuantizeOptions(method="gptq", scheme=QuantScheme(4, 64, False), act_order=True)
    config = quantization_config(options, ["lm_head"], {"calibration_tokens": 100})
    parsed = QuantizationConfig.model_validate(config)
    weights = parsed.config_groups["group_0"].weights
    assert (weights.num_bits, weights.group_size, weights.symmetric, weights.strategy) == (4, 64, False, "group")
    assert parsed.format == "pack-quantized" and parsed.ignore == ["lm_head"]
    assert config["zili"]["method"] == "gptq"
    layout = layout_for(config)  # and zili reads back what it wrote
    decoder = layout.decoder_for(["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"])
    assert (decoder.bits, decoder.group_size, decoder.symmetric) == (4, 64, False)
    assert layout.decoder_for(["lm_head"]) is None


def test_ignore_patterns_and_unsupported_configs():
    base = quantization_config(QuantizeOptions(), ["lm_head", "re:.*mlp.down_proj$"], None)
    layout = layout_for(base)
    assert layout.decoder_for(["model.layers.1.mlp.down_proj"]) is None
    assert layout.decoder_for(["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]) is not None
    mixed = layout_for(quantization_config(QuantizeOptions(), ["model.layers.0.self_attn.k_proj"], None))
    with pytest.raises(CheckpointFormatError, match="mixes"):
        mixed.decoder_for(["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"])
    for change, message in [({"format": "float-quantized"}, "format 'float-quantized'"),
                            ({"quantization_status": "frozen"}, "'frozen'"),
                            ({"config_groups": {}}, "no config_groups")]:
        with pytest.raises(CheckpointFormatError, match=message):
            layout_for({**base, **change})
    group = base["config_groups"]["group_0"]
    bad_groups = [({**group, "input_activations": {"num_bits": 8}}, "activation quantization"),
                  ({**group, "weights": {**group["weights"], "num_bits": 2}}, "int4 / int8"),
                  ({**group, "weights": {**group["weights"], "strategy": "tensor"}}, "strategy 'tensor'")]
    for bad, message in bad_groups:
        with pytest.raises(CheckpointFormatError, match=message):
            layout_for({**base, "config_groups": {"group_0": bad}})
    with pytest.raises(CheckpointFormatError, match="'bitsandbytes' is not supported"):
        layout_for({"quant_method": "bitsandbytes"})


def test_decode_rejects_inconsistent_tensors():
    tensors = encode(rtn_quantize(torch.randn(16, 64), QuantScheme(4, 32)), torch.float32)
    decoder = PackQuantizedDecoder(4, 32, True, False)
    with pytest.raises(CheckpointFormatError, match="weight_shape"):
        decoder.decode(tensors, 16, 128)
    with pytest.raises(CheckpointFormatError, match="weight_scale has shape"):
        decoder.decode({**tensors, "weight_scale": torch.ones(16, 3)}, 16, 64)
    with pytest.raises(CheckpointFormatError, match="weight_packed must be a 2-D int32"):
        decoder.decode({**tensors, "weight_packed": tensors["weight_packed"].float()}, 16, 64)

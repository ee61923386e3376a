"""AWQ: the scale search beats RTN where activations have loud channels, folding the scales keeps
the float model's function, and clipping never increases a layer's output error."""

import pytest
import torch

from zili.compress.awq import ScaleGroup, apply_awq, decoder_layer_groups, search_clip, search_scales
from zili.layers.linear import Linear
from zili.compress.rtn import fake_quantize
from zili.compress.scheme import QuantScheme
from zili.eval.full_sequence import FullSequenceAttention
from zili.models.loader import load_model


def loud_channel_inputs(rows, features, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    x[:, torch.randperm(features, generator=g)[:6]] *= 20    # a few salient input channels
    return x


def output_error(x, weight, quantized):
    return ((x @ weight.t() - x @ quantized.t()) ** 2).mean().item()


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, False), QuantScheme(4, 64, True), QuantScheme(4, None, False)],
                         ids=lambda s: s.describe())
def test_scale_search_beats_rtn(scheme):
    x = loud_channel_inputs(512, 128, seed=12)
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(13)) * 0.05
    linear = Linear(128, 96)
    linear.weight.data.copy_(weight)
    group = ScaleGroup("x", [linear], fold_inverse=lambda s: None)
    scales = search_scales(list(x.split(128)), group, scheme, grid=20)
    assert torch.equal(linear.weight, weight)               # the search leaves the weights as they were
    awq = fake_quantize(weight * scales, scheme) / scales
    rtn = fake_quantize(weight, scheme)
    assert output_error(x, weight, awq) < 0.8 * output_error(x, weight, rtn)
    assert scales.shape == (128,) and (scales > 0).all()


def test_clip_search_never_hurts():
    x = loud_channel_inputs(256, 64, seed=14)
    weight = torch.randn(40, 64, generator=torch.Generator().manual_seed(15))
    weight[:, 3] *= 6                                         # outlier weights worth clipping
    scheme = QuantScheme(4, 32, False)
    clipped = search_clip(x, weight, scheme, grid=20)
    assert (clipped.abs() <= weight.abs() + 1e-7).all()
    assert output_error(x, weight, fake_quantize(clipped, scheme)) <= output_error(x, weight, fake_quantize(weight, scheme))


@pytest.mark.parametrize("fixture", ["qwen_checkpoint", "llama_mha_checkpoint"])
def test_folding_scales_keeps_the_float_layer(fixture, request):
    """Scale every group by random s and fold 1/s upstream: the layer computes the same function."""
    model, _ = load_model(request.getfixturevalue(fixture), device="cpu", dtype=torch.float32)
    layer = model.model.layers[0]
    groups = decoder_layer_groups(layer, lambda n: model.model.rotary_emb.cos_sin(torch.arange(n), torch.float32))
    assert len(groups) == (4 if layer.self_attn.num_kv_heads == layer.self_attn.num_heads else 3)
    x = torch.randn(12, 64)
    cos, sin = model.model.rotary_emb.cos_sin(torch.arange(12), torch.float32)
    with torch.no_grad():
        before = layer(x, cos, sin, FullSequenceAttention())
        g = torch.Generator().manual_seed(16)
        for group in groups:
            scales = torch.rand(group.linears[0].in_features, generator=g) + 0.5
            group.fold_inverse(scales)
            for linear in group.linears:
                linear.weight.data *= scales
        after = layer(x, cos, sin, FullSequenceAttention())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_apply_awq_on_a_layer_lowers_its_quantization_error(qwen_checkpoint):
    model, _ = load_model(qwen_checkpoint, device="cpu", dtype=torch.float32)
    layer = model.model.layers[0]
    scheme = QuantScheme(4, 32, False)
    x = loud_channel_inputs(64, 64, seed=17)
    cos, sin = model.model.rotary_emb.cos_sin(torch.arange(64), torch.float32)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: inputs.__setitem__(n, [a[0].clone()]))
             for n, m in layer.named_modules() if n in ("self_attn.qkv_proj", "self_attn.o_proj",
                                                          "mlp.gate_up_proj", "mlp.down_proj")]

    def quantized_output():
        saved = {n: m.weight.data.clone() for n, m in layer.named_modules() if hasattr(m, "output_sizes")}
        for n, m in layer.named_modules():
            if n in saved:
                m.weight.data = fake_quantize(m.weight.data, scheme)
        with torch.no_grad():
            out = layer(x, cos, sin, FullSequenceAttention())
        for n, m in layer.named_modules():
            if n in saved:
                m.weight.data = saved[n]
        return out

    with torch.no_grad():
        reference = layer(x, cos, sin, FullSequenceAttention())
    for hook in hooks:
        hook.remove()
    rtn_error = (quantized_output() - reference).pow(2).mean()
    qk_rows = slice(0, layer.self_attn.q_size + layer.self_attn.kv_size)
    qk_before = layer.self_attn.qkv_proj.weight.data[qk_rows].clone()
    rotary = lambda n: model.model.rotary_emb.cos_sin(torch.arange(n), torch.float32)  # noqa: E731
    apply_awq(decoder_layer_groups(layer, rotary), inputs, scheme, grid=20)
    awq_error = (quantized_output() - reference).pow(2).mean()
    assert awq_error < rtn_error
    # q and k rows are only rescaled per input column, never clipped
    ratio = layer.self_attn.qkv_proj.weight.data[qk_rows] / qk_before
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-5, atol=1e-5)

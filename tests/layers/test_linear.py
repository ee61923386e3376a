"""Linear layers fill fused shards by checkpoint name; mismatches are refused."""

from __future__ import annotations

import pytest
import torch

from zili.errors import CheckpointFormatError
from zili.layers.linear import Linear


def test_fused_layer_equals_separate_projections():
    q, k, v = torch.randn(8, 6), torch.randn(4, 6), torch.randn(4, 6)
    bias = [torch.randn(8), torch.randn(4), torch.randn(4)]
    fused = Linear(6, [8, 4, 4], bias=True)
    for shard, (weight, b) in enumerate(zip([q, k, v], bias)):
        fused.load_weight("weight", weight, shard)
        fused.load_weight("bias", b, shard)
    x = torch.randn(3, 6)
    expected = torch.cat([x @ w.T + b for w, b in zip([q, k, v], bias)], dim=-1)
    torch.testing.assert_close(fused(x), expected)
    assert fused.out_features == 16 and fused.output_sizes == [8, 4, 4]


def test_unfused_layer_loads_whole_tensor():
    layer = Linear(6, 5)
    weight = torch.randn(5, 6)
    layer.load_weight("weight", weight)
    assert torch.equal(layer.weight, weight) and layer.bias is None


def test_shape_mismatch_is_refused():
    with pytest.raises(CheckpointFormatError, match=r"checkpoint \(4, 6\), model expects \(8, 6\)"):
        Linear(6, [8, 4]).load_weight("weight", torch.randn(4, 6), 0)


def test_bias_without_bias_is_refused():
    with pytest.raises(CheckpointFormatError, match="unexpected tensor 'bias'"):
        Linear(6, 4, bias=False).load_weight("bias", torch.randn(4))

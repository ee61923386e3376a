"""QuantLinear follows the dense Linear's loading and call contract; QuantizedWeight helpers."""

import pytest
import torch

from zili.errors import CheckpointFormatError
from zili.layers.linear import Linear
from zili.layers.quantized import QuantizedWeight, QuantLinear
from zili.layers.quantized.weight import concat_rows, perm_from_g_idx


class RawDecoder:
    """A trivial layout for the tests: the checkpoint stores codes / scales / zeros unpacked."""

    group_size = 16
    required_tensors = ("codes", "scales", "zeros")
    optional_tensors = ("g_idx",)

    def decode(self, tensors, out_features, in_features):
        perm = perm_from_g_idx(tensors["g_idx"], self.group_size) if "g_idx" in tensors else None
        codes = tensors["codes"] if perm is None else tensors["codes"][:, perm]
        return QuantizedWeight(codes, tensors["scales"], tensors["zeros"], 4, self.group_size, perm)


def shard_tensors(out_features, in_features, seed):
    g = torch.Generator().manual_seed(seed)
    return {"codes": torch.randint(0, 16, (out_features, in_features), generator=g).to(torch.uint8),
            "scales": torch.rand(out_features, in_features // 16, generator=g) + 0.1,
            "zeros": torch.randint(0, 16, (out_features, in_features // 16), generator=g).to(torch.uint8)}


def dense_of(tensors):
    return QuantizedWeight(tensors["codes"], tensors["scales"], tensors["zeros"], 4, 16).dense()


def test_fused_layer_loads_shards_and_computes_like_dense_linear():
    sizes = [32, 16, 16]
    shards = [shard_tensors(n, 48, seed=i) for i, n in enumerate(sizes)]
    bias = torch.randn(64)
    layer = QuantLinear(48, sizes, bias=True, decoder=RawDecoder(), kernel="reference")
    dense = Linear(48, sizes, bias=True)
    for shard, tensors in enumerate(shards):
        assert layer.missing_tensors()
        for name, tensor in tensors.items():
            layer.load_weight(name, tensor, shard)
        layer.load_weight("bias", bias[dense.shard_slice(shard)], shard)
        dense.load_weight("weight", dense_of(tensors), shard)
        dense.load_weight("bias", bias[dense.shard_slice(shard)], shard)
    assert layer.missing_tensors() == []
    layer.finish_loading()
    x = torch.randn(5, 48)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    assert layer.output_sizes == sizes and layer.out_features == 64 and layer.in_features == 48


def test_missing_and_unexpected_tensors_are_named():
    layer = QuantLinear(32, [16, 16], bias=True, decoder=RawDecoder())
    tensors = shard_tensors(16, 32, seed=0)
    for name, tensor in tensors.items():
        layer.load_weight(name, tensor, 0)
    layer.load_weight("codes", tensors["codes"], 1)
    missing = layer.missing_tensors()
    assert "scales (shard 1)" in missing and "zeros (shard 1)" in missing and "bias" in missing
    with pytest.raises(CheckpointFormatError, match="missing checkpoint tensors"):
        layer.finish_loading()
    with pytest.raises(CheckpointFormatError, match="unexpected tensor 'weight'"):
        layer.load_weight("weight", torch.zeros(16, 32), 0)
    with pytest.raises(CheckpointFormatError, match="shape mismatch for bias"):
        layer.load_weight("bias", torch.zeros(17), 0)


def test_act_order_shards_must_share_one_input_order():
    layer = QuantLinear(32, [16, 16], bias=False, decoder=RawDecoder())
    for shard in range(2):
        for name, tensor in shard_tensors(16, 32, seed=shard).items():
            layer.load_weight(name, tensor, shard)
        g_idx = torch.arange(32) // 16 if shard == 0 else torch.arange(32).flip(0) // 16
        layer.load_weight("g_idx", g_idx.int(), shard)
    with pytest.raises(CheckpointFormatError, match="different act-order g_idx"):
        layer.finish_loading()


def test_perm_from_g_idx():
    assert perm_from_g_idx(torch.arange(8) // 4, 4) is None  # already in order
    g_idx = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0])
    perm = perm_from_g_idx(g_idx, 4)
    assert (g_idx[perm] == torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])).all()
    with pytest.raises(CheckpointFormatError, match="exactly group_size"):
        perm_from_g_idx(torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]), 4)


def test_dense_undoes_the_permutation():
    weight = QuantizedWeight(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), torch.tensor([[1.0, 10.0]]),
                             torch.tensor([[0, 0]], dtype=torch.uint8), 4, 2, perm=torch.tensor([3, 1, 0, 2]))
    # column j multiplies input perm[j]; codes 1,2 are in group 0 (scale 1), codes 3,4 in group 1 (scale 10)
    assert weight.dense().tolist() == [[30.0, 2.0, 40.0, 1.0]]


def test_concat_rows_and_shape_validation():
    a = QuantizedWeight(torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.uint8), 4, 4)
    b = QuantizedWeight(torch.ones(3, 8, dtype=torch.uint8), torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.uint8), 4, 4)
    fused = concat_rows([a, b])
    assert fused.codes.shape == (5, 8) and fused.rows(2, 5).codes.eq(1).all()
    c = QuantizedWeight(torch.ones(3, 8, dtype=torch.uint8), torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.uint8), 4, 8)
    with pytest.raises(CheckpointFormatError, match="different quantization schemes"):
        concat_rows([a, c])
    with pytest.raises(CheckpointFormatError, match="does not divide"):
        QuantizedWeight(torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.uint8), 4, 3)
    with pytest.raises(CheckpointFormatError, match="do not match"):
        QuantizedWeight(torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.uint8), 4, 4)

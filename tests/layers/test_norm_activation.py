"""RMSNorm and activations against their `transformers` definitions (bit-exact, fp32 and bf16)."""

from __future__ import annotations

import pytest
import torch

from zili.errors import ModelLoadError
from zili.layers.activation import ACTIVATIONS, gated, get_activation
from zili.layers.norm import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ours, theirs = RMSNorm(32, eps=1e-5), LlamaRMSNorm(32, eps=1e-5)
    weight = torch.randn(32)
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = (torch.randn(7, 32) * 5).to(dtype)
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_match_transformers(name):
    from transformers.activations import ACT2FN

    x = torch.randn(100) * 4
    torch.testing.assert_close(get_activation(name)(x), ACT2FN[name](x))


def test_gated_activation():
    gate, up = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(gated(torch.nn.functional.silu, torch.cat([gate, up], -1)),
                               torch.nn.functional.silu(gate) * up)


def test_unknown_activation_lists_supported():
    with pytest.raises(ModelLoadError, match="'quick_gelu' is not supported; supported: silu"):
        get_activation("quick_gelu")

"""Rotary embeddings against `transformers`' LlamaRotaryEmbedding for every supported rope_scaling type."""

from __future__ import annotations

import pytest
import torch

from zili.config import ModelConfig
from zili.errors import ModelLoadError
from zili.layers.rotary import RotaryEmbedding, apply_rotary

HEAD_DIM = 16
MAX_POSITIONS = 64

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                    "beta_fast": 16, "beta_slow": 2},
    "yarn-no-truncate": {"rope_type": "yarn", "factor": 3.0, "truncate": False},
}


def _configs(scaling):
    from transformers import LlamaConfig

    fields = dict(hidden_size=4 * HEAD_DIM, num_attention_heads=4, num_key_value_heads=4, intermediate_size=8,
                  num_hidden_layers=1, vocab_size=8, max_position_embeddings=MAX_POSITIONS, rope_theta=500.0,
                  rope_scaling=scaling)
    ours = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], **fields})
    return ours, LlamaConfig(**fields)


@pytest.mark.parametrize("positions", [
    torch.arange(40),                      # a prompt inside the context
    torch.tensor([3, 17, 5000, 63]),       # scattered, beyond the first lazily built table
    torch.arange(100),                     # longer than max_position_embeddings (dynamic rescales)
    torch.tensor([130]),                   # one decode step past the context
], ids=["prefix", "scattered", "beyond-context", "single"])
@pytest.mark.parametrize("name", list(SCALINGS))
def test_cos_sin_match_transformers(name, positions):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    ours_config, their_config = _configs(SCALINGS[name])
    ours = RotaryEmbedding(ours_config)
    theirs = LlamaRotaryEmbedding(their_config)
    cos, sin = ours.cos_sin(positions, torch.float32)
    their_cos, their_sin = theirs(torch.zeros(1, dtype=torch.float32), positions[None])
    torch.testing.assert_close(cos, their_cos[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, their_sin[0], rtol=1e-5, atol=1e-5)


def test_rotation_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ours_config, _ = _configs(SCALINGS["llama3"])
    positions = torch.arange(10)
    cos, sin = RotaryEmbedding(ours_config).cos_sin(positions, torch.float32)
    q, k = torch.randn(10, 4, HEAD_DIM), torch.randn(10, 2, HEAD_DIM)
    their_q, their_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    torch.testing.assert_close(apply_rotary(q, cos, sin), their_q[0].transpose(0, 1))
    torch.testing.assert_close(apply_rotary(k, cos, sin), their_k[0].transpose(0, 1))


def test_rotation_preserves_norm_and_relative_positions():
    config, _ = _configs(None)
    rope = RotaryEmbedding(config)
    q, k = torch.randn(1, 1, HEAD_DIM), torch.randn(1, 1, HEAD_DIM)

    def score(q_pos, k_pos):
        cq, sq = rope.cos_sin(torch.tensor([q_pos]), torch.float32)
        ck, sk = rope.cos_sin(torch.tensor([k_pos]), torch.float32)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    cos, sin = rope.cos_sin(torch.tensor([7]), torch.float32)
    torch.testing.assert_close(apply_rotary(q, cos, sin).norm(), q.norm())
    torch.testing.assert_close(score(9, 4), score(25, 20), rtol=1e-4, atol=1e-4)


def test_partial_rotary_leaves_the_rest_untouched():
    config, _ = _configs(None)
    config.partial_rotary_factor = 0.5
    rope = RotaryEmbedding(config)
    cos, sin = rope.cos_sin(torch.arange(5), torch.float32)
    assert cos.shape == (5, HEAD_DIM // 2)
    x = torch.randn(5, 2, HEAD_DIM)
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[..., HEAD_DIM // 2:], x[..., HEAD_DIM // 2:])
    assert not torch.allclose(out[1:, :, :HEAD_DIM // 2], x[1:, :, :HEAD_DIM // 2])


def test_cos_sin_in_low_precision_are_rounded_fp32_values():
    config, _ = _configs(SCALINGS["yarn"])
    positions = torch.arange(50)
    rope = RotaryEmbedding(config)
    cos32, _ = rope.cos_sin(positions, torch.float32)
    cos16, _ = rope.cos_sin(positions, torch.bfloat16)
    assert cos16.dtype == torch.bfloat16 and torch.equal(cos16, cos32.to(torch.bfloat16))


def test_unknown_rope_type_is_refused():
    config, _ = _configs({"rope_type": "su", "factor": 2.0})
    with pytest.raises(ModelLoadError, match="'su' is not supported"):
        RotaryEmbedding(config)

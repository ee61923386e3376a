"""zili's Llama-family model against `transformers` on the same random-weight checkpoints (fp32).

Each case is one config.json feature: logits over a 48-token sequence must match within 1e-4,
and a 32-token greedy continuation must be token-identical to `transformers.generate`.
"""

from __future__ import annotations

import json

import pytest
import torch

from tiny_models import (load_reference, make_checkpoint, random_tokens, reference_greedy, zili_greedy,
                         zili_logits)
from zili.models.loader import load_model

SEQ_LEN = 48        # longer than the sliding windows (8) and the dynamic-rope context (32) below
PROMPT_LEN = 12
NEW_TOKENS = 32
LOGITS_ATOL = 1e-4

# case id -> (architecture, config overrides, extra options)
CASES = {
    "llama": ("LlamaForCausalLM", {}, {}),
    "llama-tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}, {}),
    "llama-attention-bias": ("LlamaForCausalLM", {"attention_bias": True}, {}),
    "llama-mlp-bias": ("LlamaForCausalLM", {"mlp_bias": True}, {}),
    "llama-head-dim-32": ("LlamaForCausalLM", {"head_dim": 32}, {}),
    "llama-kv-heads-1": ("LlamaForCausalLM", {"num_key_value_heads": 1}, {}),
    "llama-kv-heads-4": ("LlamaForCausalLM", {"num_key_value_heads": 4}, {}),
    "llama-rope-linear": ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, {}),
    "llama-rope-dynamic": ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
                                                "max_position_embeddings": 32}, {}),
    "llama-rope-llama3": ("LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}, {}),
    "llama-rope-yarn": ("LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}, {}),
    "llama-rope-legacy-type-key": ("LlamaForCausalLM", {"rope_scaling": {"type": "linear", "factor": 3.0}}, {}),
    "llama-sharded": ("LlamaForCausalLM", {}, {"max_shard_size": "40KB"}),
    "qwen2": ("Qwen2ForCausalLM", {}, {}),
    "qwen2-tied": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}, {}),
    "qwen2-sliding-window": ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8,
                                                  "max_window_layers": 1}, {}),
    # Qwen2.5 config.json files predate `layer_types`: windows come from max_window_layers alone
    "qwen2-sliding-window-no-layer-types": ("Qwen2ForCausalLM", {
        "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, {"drop_layer_types": True}),
    "qwen2-window-disabled": ("Qwen2ForCausalLM", {"use_sliding_window": False, "sliding_window": 8},
                              {"drop_layer_types": True}),
    "qwen2-rope-yarn": ("Qwen2ForCausalLM", {"rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}, {}),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 32}, {}),
    "qwen3-tied-kv-heads-1": ("Qwen3ForCausalLM", {"tie_word_embeddings": True, "num_key_value_heads": 1}, {}),
    "qwen3-attention-bias": ("Qwen3ForCausalLM", {"attention_bias": True}, {}),
    "mistral": ("MistralForCausalLM", {"sliding_window": None}, {}),
    "mistral-sliding-window": ("MistralForCausalLM", {"sliding_window": 8, "head_dim": 8}, {}),
}


def _drop_layer_types(folder) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.pop("layer_types", None)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request, tmp_path_factory):
    """(zili model, transformers model, zili config) for one case; built once per module."""
    arch, overrides, options = CASES[request.param]
    folder = make_checkpoint(tmp_path_factory.mktemp(request.param), arch,
                             max_shard_size=options.get("max_shard_size"), **overrides)
    if options.get("drop_layer_types"):
        _drop_layer_types(folder)
    model, config = load_model(folder, device="cpu", dtype=torch.float32)
    reference = load_reference(folder, torch.float32)
    return model, reference, config, folder


def test_logits_match_transformers(pair):
    model, reference, config, _ = pair
    tokens = random_tokens(config.vocab_size, SEQ_LEN, seed=1)
    ours = zili_logits(model, tokens)
    with torch.inference_mode():
        theirs = reference(torch.tensor([tokens])).logits[0].float()
    assert ours.shape == theirs.shape == (SEQ_LEN, config.vocab_size)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_greedy_continuation_matches_transformers(pair):
    model, reference, config, _ = pair
    prompt = random_tokens(config.vocab_size, PROMPT_LEN, seed=2)
    ours = zili_greedy(model, prompt, NEW_TOKENS)
    theirs = reference_greedy(reference, prompt, NEW_TOKENS)
    assert len(theirs) == NEW_TOKENS
    assert ours == theirs


def _reference_windows(hf_config) -> list[int | None]:
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is None:  # Mistral: one window for every layer
        return [window] * hf_config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def test_config_features_reach_the_model(pair):
    """The case really exercises its feature (guards against a case silently testing the default)."""
    model, reference, config, folder = pair
    ours, theirs = model.model.layers[0].self_attn, reference.model.layers[0].self_attn
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == _reference_windows(reference.config)
    assert ours.head_dim == theirs.head_dim
    assert (ours.qkv_proj.bias is not None) == (theirs.q_proj.bias is not None)
    assert (ours.o_proj.bias is not None) == (theirs.o_proj.bias is not None)
    assert (ours.q_norm is not None) == hasattr(theirs, "q_norm")
    assert ours.num_kv_heads == reference.config.num_key_value_heads
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == bool(reference.config.tie_word_embeddings)
    assert (folder / "model.safetensors.index.json").exists() == ("sharded" in folder.name)

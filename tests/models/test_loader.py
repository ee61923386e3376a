"""Loading model folders: bf16 checkpoints, dtype conversion, and every way a folder can be broken.

The oracle for bf16 is the same checkpoint computed in fp32: zili's bf16 error must be of the same
size as `transformers`' own bf16 error (both round activations to 8 mantissa bits).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import (copy_checkpoint, load_reference, make_checkpoint, random_tokens, zili_greedy,
                         zili_logits)
from zili.errors import CheckpointFormatError, ModelLoadError, UnsupportedArchitectureError
from zili.models.loader import load_model
from zili.models.registry import MODEL_REGISTRY


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bf16"), "Qwen2ForCausalLM", dtype=torch.bfloat16,
                           tie_word_embeddings=True)


@pytest.fixture(scope="module")
def bf16_oracle(bf16_checkpoint):
    """(fp32 transformers model, bf16 transformers model) of the bf16 checkpoint."""
    return load_reference(bf16_checkpoint, torch.float32), load_reference(bf16_checkpoint, torch.bfloat16)


def _reference_logits(reference, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return reference(torch.tensor([tokens])).logits[0].float()


def test_bf16_checkpoint_is_stored_in_bf16(bf16_checkpoint):
    assert {t.dtype for t in load_file(bf16_checkpoint / "model.safetensors").values()} == {torch.bfloat16}


def test_bf16_checkpoint_loaded_in_fp32_matches_transformers_exactly(bf16_checkpoint, bf16_oracle):
    model, _ = load_model(bf16_checkpoint, device="cpu", dtype="float32")
    assert model.model.embed_tokens.weight.dtype == torch.float32
    tokens = random_tokens(model.config.vocab_size, 48, seed=3)
    torch.testing.assert_close(zili_logits(model, tokens), _reference_logits(bf16_oracle[0], tokens),
                               atol=1e-4, rtol=0)


def test_bf16_checkpoint_loaded_in_bf16_is_as_accurate_as_transformers_bf16(bf16_checkpoint, bf16_oracle):
    model, _ = load_model(bf16_checkpoint, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference32, reference16 = bf16_oracle
    tokens = random_tokens(model.config.vocab_size, 48, seed=4)
    exact = _reference_logits(reference32, tokens)
    ours = zili_logits(model, tokens)
    assert ours.dtype == torch.float32  # compute_logits always hands fp32 to the sampler
    our_error, their_error = (ours - exact), (_reference_logits(reference16, tokens) - exact)
    assert their_error.abs().max() > 0  # the bf16 oracle really ran in bf16
    rms = lambda x: x.pow(2).mean().sqrt()  # noqa: E731
    assert rms(our_error) <= 1.5 * rms(their_error)
    assert our_error.abs().max() <= 2 * their_error.abs().max()


def test_bf16_greedy_picks_a_near_best_token_at_every_step(bf16_checkpoint, bf16_oracle):
    """Greedy in bf16 may diverge from fp32 on near-ties only: each chosen token's exact (fp32)
    logit is within twice transformers' own bf16 logit error of the best one."""
    model, _ = load_model(bf16_checkpoint, device="cpu", dtype=torch.bfloat16)
    reference32, reference16 = bf16_oracle
    prompt = random_tokens(model.config.vocab_size, 12, seed=5)
    generated = zili_greedy(model, prompt, 32)
    sequence = prompt + generated
    exact = _reference_logits(reference32, sequence)
    tolerance = 2 * (_reference_logits(reference16, sequence) - exact).abs().max()
    steps = exact[len(prompt) - 1:-1]  # logits that chose each generated token
    chosen = steps.gather(1, torch.tensor(generated)[:, None])[:, 0]
    assert torch.all(steps.max(dim=1).values - chosen <= tolerance)


def test_default_dtype_follows_the_device_not_the_file(tiny_checkpoint):
    from zili.devices import default_dtype

    model, _ = load_model(tiny_checkpoint, device="cpu")
    assert model.model.embed_tokens.weight.dtype == default_dtype("cpu")


def test_sharded_checkpoint_loads_every_shard(checkpoint_factory):
    folder = checkpoint_factory("LlamaForCausalLM", max_shard_size="40KB", seed=7)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model, _ = load_model(folder, device="cpu", dtype=torch.float32)
    for name, tensor in load_file(folder / index["weight_map"]["model.norm.weight"]).items():
        assert torch.equal(model.get_parameter(name), tensor)


# ---- broken folders: each gives a typed error whose message names the problem -------------

@pytest.fixture
def broken(tiny_checkpoint, tmp_path):
    """A writable copy of the tiny checkpoint to damage."""
    return copy_checkpoint(tiny_checkpoint, tmp_path / "model")


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        load_model(tmp_path / "nope", device="cpu")


def test_path_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="not a folder"):
        load_model(tmp_path / "file", device="cpu")


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(broken, device="cpu")


def test_config_is_not_json(broken):
    (broken / "config.json").write_text("{'architectures': oops")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(broken, device="cpu")


def test_config_is_not_an_object(broken):
    (broken / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="JSON object"):
        load_model(broken, device="cpu")


def test_config_missing_field(broken):
    config = json.loads((broken / "config.json").read_text())
    del config["hidden_size"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="hidden_size"):
        load_model(broken, device="cpu")


def test_config_inconsistent_heads(broken):
    _edit_config(broken, num_key_value_heads=3)
    with pytest.raises(ModelLoadError, match="num_key_value_heads"):
        load_model(broken, device="cpu")


def test_unknown_architecture_names_the_supported_ones(broken):
    _edit_config(broken, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model(broken, device="cpu")
    assert "GPT2LMHeadModel" in str(info.value)
    assert all(name in str(info.value) for name in MODEL_REGISTRY)


def test_unsupported_rope_type(broken):
    _edit_config(broken, rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ModelLoadError, match="longrope"):
        load_model(broken, device="cpu")


def test_missing_weights(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointFormatError, match="no \\*.safetensors"):
        load_model(broken, device="cpu")


def test_pickle_only_checkpoint_is_refused(broken):
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match="pickle") as info:
        load_model(broken, device="cpu")
    assert "pytorch_model.bin" in str(info.value)


def test_truncated_weights(broken):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_model(broken, device="cpu")


def test_shapes_disagree_with_config(broken):
    _edit_config(broken, intermediate_size=96)
    with pytest.raises(CheckpointFormatError, match="shape mismatch") as info:
        load_model(broken, device="cpu")
    assert "mlp" in str(info.value)


def _rewrite_weights(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(broken):
    _rewrite_weights(broken, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointFormatError, match="missing tensors: model.layers.1.mlp.down_proj.weight"):
        load_model(broken, device="cpu")


def test_missing_shard_of_a_fused_projection(broken):
    _rewrite_weights(broken, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointFormatError, match="model.layers.0.self_attn.qkv_proj.weight"):
        load_model(broken, device="cpu")


def test_unexpected_tensor(broken):
    _rewrite_weights(broken, lambda t: t.update({"model.layers.0.self_attn.w_extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointFormatError, match="w_extra"):
        load_model(broken, device="cpu")


def test_index_lists_a_missing_shard(checkpoint_factory, tmp_path):
    folder = copy_checkpoint(checkpoint_factory("LlamaForCausalLM", max_shard_size="40KB"), tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointFormatError, match=shard.name):
        load_model(folder, device="cpu")


def test_malformed_index(broken):
    (broken / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointFormatError, match="weight_map"):
        load_model(broken, device="cpu")

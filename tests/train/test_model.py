"""The training model: batched attention against the reference SDPA, checkpoint names and the
exported folder against `transformers`, the parameter count against the model itself."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tiny_models import load_reference
from train_helpers import TEST_CONFIG, options
from zili.layers.attention import DenseKVCache, causal_mask, sdpa_attention
from zili.models.loader import load_model
from zili.models.tokenizer import Tokenizer
from zili.train.model import BatchedCausalAttention, build_training_model, sequence_nll
from zili.train.report import count_parameters
from zili.train.trainer import train


def test_batched_attention_matches_the_reference_per_row():
    torch.manual_seed(0)
    b, s, hq, hkv, d = 3, 7, 4, 2, 8
    q, k, v = torch.randn(b * s, hq, d), torch.randn(b * s, hkv, d), torch.randn(b * s, hkv, d)
    out = BatchedCausalAttention(b, s).attend(0, q, k, v, 0.3, None)
    mask = causal_mask(s, s, None, "cpu")
    for row in range(b):
        rows = slice(row * s, (row + 1) * s)
        torch.testing.assert_close(out[rows], sdpa_attention(q[rows], k[rows], v[rows], 0.3, mask))


def test_batched_nll_equals_token_by_token_decoding():
    torch.manual_seed(0)
    model = build_training_model(TEST_CONFIG, "cpu").eval()
    tokens = torch.randint(0, TEST_CONFIG.vocab_size, (2, 9))
    nll = sequence_nll(model, tokens)  # (2, 8)
    c = model.config
    for row in range(2):
        cache = DenseKVCache(c.num_hidden_layers, 9, c.num_key_value_heads, c.head_dim, torch.float32, "cpu")
        with torch.no_grad():
            logits = model.compute_logits(model(tokens[row, :-1], torch.arange(8), cache))
        expected = torch.nn.functional.cross_entropy(logits, tokens[row, 1:], reduction="none")
        torch.testing.assert_close(nll[row].detach(), expected)


def test_parameter_count_formula():
    model = build_training_model(TEST_CONFIG, "cpu")
    counts = count_parameters(TEST_CONFIG)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert counts["embedding"] == model.model.embed_tokens.weight.numel()


def test_trained_folder_loads_in_zili_and_transformers_with_the_same_logits(corpus_file, val_file, tmp_path):
    out = tmp_path / "out"
    train(options(corpus_file, out, val_file, max_steps=4, save_dtype="bfloat16"))
    reference = load_reference(out, torch.float32)
    # every tensor of the checkpoint has the name transformers expects, and nothing is missing
    expected = {k for k in reference.state_dict() if k != "lm_head.weight"}
    assert set(load_file(str(out / "model.safetensors"))) == expected
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values())

    model, config = load_model(out, device="cpu", dtype=torch.float32)
    ids = Tokenizer.from_folder(out).encode(val_file.read_text())[:config.max_position_embeddings]
    with torch.no_grad():
        cache = DenseKVCache(config.num_hidden_layers, len(ids), config.num_key_value_heads, config.head_dim,
                             torch.float32, "cpu")
        ours = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), cache))
        theirs = reference(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

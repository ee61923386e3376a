"""Fixtures for the compression tests: tiny checkpoints and a calibration text (all offline)."""

from pathlib import Path

import pytest
import torch
from tiny_models import TRAINING_TEXT

TRAIN_STEPS = 120
TRAIN_WINDOW = 64


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TRAINING_TEXT * 4)
    return path


@pytest.fixture(scope="session")
def qwen_checkpoint(checkpoint_factory) -> Path:
    """Qwen2 (q/k/v biases, grouped-query attention): hidden 64, intermediate 128."""
    return checkpoint_factory("Qwen2ForCausalLM")


@pytest.fixture(scope="session")
def llama_mha_checkpoint(checkpoint_factory) -> Path:
    """Llama with one kv head per query head (AWQ can scale o_proj through v_proj)."""
    return checkpoint_factory("LlamaForCausalLM", num_key_value_heads=4)


@pytest.fixture(scope="session")
def trained_checkpoint(checkpoint_factory) -> Path:
    """A tiny Qwen2 trained for a few seconds on TRAINING_TEXT, so its next-token distributions are
    peaked like a real model's (on random weights the top tokens are near-ties that any perturbation
    reorders, which would make "first divergent greedy token in the other's top-5" meaningless)."""
    from tiny_models import load_reference
    from tokenizers import Tokenizer

    folder = checkpoint_factory("Qwen2ForCausalLM", weight_std=0.02)
    ids = torch.tensor(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TRAINING_TEXT).ids)
    model = load_reference(folder).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        starts = torch.randint(0, len(ids) - TRAIN_WINDOW - 1, (8,), generator=generator)
        batch = torch.stack([ids[s:s + TRAIN_WINDOW] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder, safe_serialization=True)
    return folder

"""Fixtures for the compression tests: tiny checkpoints and a calibration text (all offline)."""

from pathlib import Path

import pytest
from tiny_models import TRAINING_TEXT


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

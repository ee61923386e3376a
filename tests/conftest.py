"""Fixtures shared by every test area, and the test process settings (offline, one torch thread).

Everything is built offline, on the CPU, in well under a second.

Fixtures
- `tokenizer_dir` (session): a folder with a tiny byte-level BPE `tokenizer.json` (vocab ~300,
  special tokens <|begin|> <|end|> <|pad|> <|im_start|> <|im_end|>) and a `tokenizer_config.json`
  holding a simple chat template. Read-only: copy it before changing anything.
- `tiny_checkpoint` (session): a random-weight tiny LlamaForCausalLM folder (hidden 64, 2 layers,
  4 heads, 2 KV heads, fp32 safetensors, tokenizer, generation_config.json). Read-only.
- `checkpoint_factory` (session): `checkpoint_factory(arch="LlamaForCausalLM", **config_overrides)`
  -> a new folder made by `make_checkpoint` under a fresh temporary directory; usable from
  module-scoped fixtures, e.g. one Qwen3 checkpoint shared by a whole test module.

Plain functions (tests/tiny_models.py, importable as `from tiny_models import ...`)
- `make_checkpoint(folder, arch="LlamaForCausalLM", *, dtype, seed, max_shard_size, chat_template,
  **config_overrides) -> folder`: the same as the factory, into a folder you choose.
- `build_tokenizer(folder, chat_template=..., template_file=False)`: tokenizer files only.
- `load_reference(folder, dtype, attn_implementation="sdpa")`: the `transformers` model of a folder, the test oracle.
- `zili_logits(model, ids)`, `zili_greedy(model, prompt, n)` (reference loop, EOS ignored),
  `reference_greedy(hf_model, prompt, n)` (transformers.generate), `random_tokens(vocab, n, seed)`.
- `TRAINING_TEXT`, `TINY_CONFIG`, `SIMPLE_CHAT_TEMPLATE`, `token_id(token)`, `copy_checkpoint(src, dst)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the network; make transformers fail fast instead of trying the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine oversubscribed
# threads make them 10-100x slower. ZILI_TEST_THREADS overrides; subprocesses inherit OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("ZILI_TEST_THREADS", "1"))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("ZILI_TEST_THREADS", "1")))

from tiny_models import build_tokenizer, make_checkpoint  # noqa: E402  (after the offline switches)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    def factory(arch: str = "LlamaForCausalLM", **overrides) -> Path:
        return make_checkpoint(tmp_path_factory.mktemp(arch), arch, **overrides)

    return factory


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory("LlamaForCausalLM")

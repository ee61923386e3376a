"""The bundled demo model (models/zili-demo): it is the default model, zili and transformers give
it the same logits, and its held-out perplexity is the model card's figure.

The perplexity oracle here is `transformers`, fed the windows the model card describes
(non-overlapping windows of max_position_embeddings tokens, each scoring all its tokens but
the first), so the card's number is checked by an implementation that is not zili's.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from tiny_models import load_reference
from zili.layers.attention import DenseKVCache
from zili.llm import default_model_path
from zili.models.loader import load_model
from zili.models.tokenizer import Tokenizer
from zili.train.evaluate import folder_perplexity

DEMO = default_model_path()
WINDOWS_PER_BATCH = 16


@pytest.fixture(scope="module")
def report():
    return json.loads((DEMO / "training_report.json").read_text())


@pytest.fixture(scope="module")
def heldout_ids():
    return Tokenizer.from_folder(DEMO).encode((DEMO / "heldout.txt").read_text(), add_special_tokens=False)


def test_the_demo_model_is_the_default_and_ships_complete():
    assert DEMO.name == "zili-demo" and DEMO.parent.name == "models"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "heldout.txt", "training_report.json", "README.md"):
        assert (DEMO / name).is_file(), name
    assert not (DEMO / "checkpoint").exists()
    assert sum(p.stat().st_size for p in DEMO.iterdir()) < 30 * 2**20


def test_zili_and_transformers_give_the_same_logits(heldout_ids):
    model, config = load_model(DEMO, device="cpu", dtype=torch.float32)
    reference = load_reference(DEMO, torch.float32)
    ids = torch.tensor(heldout_ids[:config.max_position_embeddings])
    with torch.no_grad():
        cache = DenseKVCache(config.num_hidden_layers, len(ids), config.num_key_value_heads, config.head_dim,
                             torch.float32, "cpu")
        ours = model.compute_logits(model(ids, torch.arange(len(ids)), cache))
        theirs = reference(ids[None]).logits[0].float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_heldout_perplexity_is_the_model_cards_figure(report, heldout_ids):
    reference = load_reference(DEMO, torch.float32)
    window = reference.config.max_position_embeddings
    ids = torch.tensor(heldout_ids)
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    total, count = 0.0, 0
    with torch.no_grad():
        full = [w for w in windows if len(w) == window]
        batches = [torch.stack(full[i:i + WINDOWS_PER_BATCH]) for i in range(0, len(full), WINDOWS_PER_BATCH)]
        batches += [w[None] for w in windows if 2 <= len(w) < window]
        for batch in batches:
            logits = reference(batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                    reduction="sum")
            total, count = total + float(nll), count + batch[:, 1:].numel()
    oracle = math.exp(total / count)

    card = (DEMO / "README.md").read_text()
    card_figure = float(re.search(r"Validation perplexity: \*\*([0-9.]+)\*\*", card).group(1))
    assert report["validation"]["predicted_tokens"] == count
    assert oracle == pytest.approx(report["validation"]["perplexity"], rel=1e-4)
    assert abs(oracle - card_figure) <= 0.005 + 1e-4 * oracle  # the card rounds to 2 decimals
    # and zili's own evaluation (the function the trainer used) gives the same figure
    assert folder_perplexity(DEMO, (DEMO / "heldout.txt").read_text())[0] == pytest.approx(oracle, rel=1e-4)


def test_default_llm_generates_english_letters():
    from zili.llm import LLM
    from zili.sampling_params import SamplingParams

    llm = LLM(dtype="float32", kv_cache_memory="64MiB")
    assert llm.path == DEMO
    out = llm.generate("To be, or not to be", SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert len(out.token_ids) > 0 and out.text
    letters = sum(c.isalpha() for c in out.text)
    assert letters >= 0.5 * len(out.text.replace(" ", "").replace("\n", "")) > 0

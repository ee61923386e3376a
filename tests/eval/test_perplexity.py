"""Sliding-window perplexity against transformers, and the `zili eval perplexity` command."""

import math

import pytest
import torch
from tiny_models import TRAINING_TEXT, load_reference

from zili.cli import main
from zili.errors import InvalidRequestError
from zili.eval.perplexity import perplexity, window_spans
from zili.models.loader import load_model
from zili.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def qwen(checkpoint_factory):
    folder = checkpoint_factory("Qwen2ForCausalLM", weight_std=0.05)
    model, _ = load_model(folder, device="cpu", dtype=torch.float32)
    ids = Tokenizer.from_folder(folder).encode(TRAINING_TEXT)[:150]
    return folder, model, ids


def hf_strided_perplexity(reference, ids, window, stride):
    """The Hugging Face documentation's strided perplexity loop, verbatim in spirit."""
    ids = torch.tensor(ids)[None]
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + window, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = reference(input_ids, labels=target).loss
        valid = (target[:, 1:] != -100).sum().item()   # labels shift inside the model: position 0 is never scored
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == ids.size(1):
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def test_single_window_equals_transformers_loss(qwen):
    folder, model, ids = qwen
    reference = load_reference(folder)
    with torch.no_grad():
        expected = math.exp(reference(torch.tensor(ids)[None], labels=torch.tensor(ids)[None]).loss.item())
    result = perplexity(model, ids, window=len(ids))
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert result.tokens == len(ids) - 1 and result.seconds >= 0


@pytest.mark.parametrize("window,stride", [(32, 16), (40, 40), (64, 8)])
def test_sliding_window_equals_the_transformers_recipe(qwen, window, stride):
    folder, model, ids = qwen
    expected, tokens = hf_strided_perplexity(load_reference(folder), ids, window, stride)
    result = perplexity(model, ids, window, stride)
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert result.tokens == tokens
    assert tokens == len(ids) - 1 if stride < window else len(ids) - math.ceil(len(ids) / window)


@pytest.mark.parametrize("n,window,stride", [(150, 32, 16), (100, 100, 50), (101, 10, 3), (2, 5, 5), (64, 64, 1)])
def test_overlapping_windows_score_every_token_after_the_first_once(n, window, stride):
    scored = []
    for begin, end, first in window_spans(n, window, stride):
        assert end - begin <= window and first >= 1
        scored += range(begin + first, end)
    assert scored == list(range(1, n))


def test_bad_arguments(qwen):
    _, model, ids = qwen
    with pytest.raises(InvalidRequestError, match="at least 2 tokens"):
        perplexity(model, ids[:1], 16)
    with pytest.raises(InvalidRequestError, match="stride") as e:
        perplexity(model, ids, 16, stride=17)
    assert e.value.param == "stride"


def test_cli_compares_two_models(qwen, tmp_path, capsys):
    folder, model, ids = qwen
    text = tmp_path / "heldout.txt"
    text.write_text(TRAINING_TEXT)
    out = tmp_path / "q8"
    assert main(["quantize", str(folder), "-o", str(out), "--bits", "8"]) == 0
    capsys.readouterr()
    assert main(["eval", "perplexity", str(out), "--text", str(text), "--compare", str(folder),
                 "--window", "64", "--max-tokens", "150", "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["model", "perplexity", "tokens", "window", "stride", "time"]
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    original = perplexity(model, ids, 64).perplexity
    assert float(rows[str(folder)][1]) == pytest.approx(original, rel=1e-3)
    assert rows[str(out)][2] == rows[str(folder)][2] == "149"
    assert float(rows[str(out)][1]) == pytest.approx(original, rel=0.05)   # int8: close to the original
    assert lines[3].startswith(f"{out} vs {folder}:") and lines[3].endswith("% perplexity")
    assert main(["eval", "perplexity", str(folder), "--text", str(tmp_path / "missing.txt")]) == 1
    assert "text file not found" in capsys.readouterr().err

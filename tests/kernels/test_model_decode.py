"""A whole tiny bf16 model (dense and int8/int4-quantized) decodes with zili's CPU kernels as without them.

The kernels change only rounding (bf16: fp32 accumulation order; quantized: int8 activations).
A random tiny model in bf16 has many near-ties among its logits (bf16 logits step by ~0.01), so:
- teacher-forced, token by token along the kernel-free greedy continuation, the kernels' argmax
  agrees on most positions, and every disagreement is a near-tie: the kernels' token is in the
  top 5 of the kernel-free logits, within 0.1 of its best logit;
- free-running greedy decode, where the two first diverge (if ever), the kernels' token is in the
  top 5 of the kernel-free logits for the same prefix (docs/STYLE.md, rule 8).
"""

import pytest
import torch
from conftest import kernels_off
from tiny_models import make_checkpoint, quantize_decoder_layers, random_tokens, zili_greedy, zili_logits

from zili.layers.attention import DenseKVCache
from zili.layers.quantized import QuantLinear
from zili.models.loader import load_model

PROMPT_TOKENS = 12   # above the kernels' row limit: the prompt runs through PyTorch, decode through the kernels
NEW_TOKENS = 24
NEAR_TIE = 0.1       # logits


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("kernels-model"), weight_std=0.1)


def decode_logits(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """(len(continuation), vocab) logits predicting each continuation token, one decode step per token."""
    config = model.config
    cache = DenseKVCache(config.num_hidden_layers, len(prompt) + len(continuation), config.num_key_value_heads,
                         config.head_dim, torch.bfloat16, "cpu")
    rows = []
    with torch.inference_mode():
        tokens = torch.tensor(prompt)
        for token in continuation:
            hidden = model(tokens, torch.arange(cache.length, cache.length + tokens.numel()), cache)
            cache.advance(tokens.numel())
            rows.append(model.compute_logits(hidden[-1:])[0])
            tokens = torch.tensor([token])
    return torch.stack(rows)


def without_kernels(monkeypatch, fn, *args):
    with monkeypatch.context() as patch:
        kernels_off(patch)
        return fn(*args)


@pytest.fixture(params=[None, 8, 4], ids=["bf16", "int8", "int4"])
def model(request, cpu_kernels, bf16_folder):
    model, _ = load_model(bf16_folder, dtype=torch.bfloat16)
    if request.param is not None:
        quantize_decoder_layers(model, request.param)
        kinds = {m.kernel.name for m in model.modules() if isinstance(m, QuantLinear)}
        assert kinds == {f"cpu-vnni-int{request.param}"}
    return model


def test_teacher_forced_decode_agrees_up_to_near_ties(model, cpu_kernels, monkeypatch):
    calls = []
    kernel = cpu_kernels.linear_bf16
    monkeypatch.setattr(cpu_kernels, "linear_bf16", lambda *a: calls.append(1) or kernel(*a))
    agree = total = 0
    for seed in range(3):
        prompt = random_tokens(model.config.vocab_size, PROMPT_TOKENS, seed)
        continuation = without_kernels(monkeypatch, zili_greedy, model, prompt, NEW_TOKENS)
        reference = without_kernels(monkeypatch, decode_logits, model, prompt, continuation)
        fast = decode_logits(model, prompt, continuation)
        for ref_row, choice in zip(reference, fast.argmax(-1).tolist()):
            agree += choice == ref_row.argmax().item()
            total += 1
            assert choice in ref_row.topk(5).indices.tolist()
            assert ref_row.max() - ref_row[choice] <= NEAR_TIE
    assert calls, "the bf16 kernel never ran"
    assert agree >= 0.9 * total, f"argmax agreed on {agree} of {total} positions"


def test_free_running_greedy_first_divergence_is_in_the_top_5(model, monkeypatch):
    for seed in range(3):
        prompt = random_tokens(model.config.vocab_size, PROMPT_TOKENS, seed)
        fast = zili_greedy(model, prompt, NEW_TOKENS)
        reference = without_kernels(monkeypatch, zili_greedy, model, prompt, NEW_TOKENS)
        if fast != reference:
            first = next(i for i, (a, b) in enumerate(zip(fast, reference)) if a != b)
            logits = without_kernels(monkeypatch, zili_logits, model, prompt + fast[:first])[-1]
            assert fast[first] in logits.topk(5).indices.tolist(), f"diverged at token {first}"

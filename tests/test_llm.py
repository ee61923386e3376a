"""The offline API (`LLM`) against the reference loop: same greedy tokens, stop strings, seeds.

Oracle: `zili.generation.generate_tokens` on the same model, decoded with the tokenizer; stop
strings are cut from that text by hand.
"""

from __future__ import annotations

import pytest
import torch

from zili.generation import generate_tokens
from zili.llm import LLM
from zili.sampling_params import SamplingParams

PROMPT = "The quick brown fox"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def wordy_checkpoint(checkpoint_factory):
    """A random checkpoint whose output layer can only produce letters and word pieces, so the
    text has multi-character tokens to put stop strings across (random bytes would not decode)."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    folder = checkpoint_factory("LlamaForCausalLM", seed=11)
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab()
    tensors = load_file(folder / "model.safetensors")
    wordy = [i for token, i in vocab.items() if token.isascii() and token.lstrip("Ġ").isalpha()]
    assert len(wordy) >= 50
    keep = torch.zeros(tensors["lm_head.weight"].shape[0], 1)
    keep[wordy] = 1.0
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * keep * 5
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def llm(wordy_checkpoint):
    return LLM(wordy_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference(llm):
    """(token ids, text) of the greedy reference continuation of PROMPT."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    tokens = [s.token_id for s in generate_tokens(llm.model, prompt_ids, params, llm.eos_token_ids,
                                                  llm.max_model_len)]
    return tokens, llm.tokenizer.decode(tokens)


def greedy(**extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, **extra)


@pytest.fixture(scope="module")
def split_stop(llm, reference):
    """(index, stop string) where the stop string starts inside one token and ends in a later one."""
    tokens, text = reference
    boundaries = []
    for i in range(len(tokens) + 1):
        prefix = llm.tokenizer.decode(tokens[:i])
        if text.startswith(prefix) and "\ufffd" not in prefix:
            boundaries.append(len(prefix))
    for start, end in zip(boundaries[2:], boundaries[3:]):
        index = end - 1  # the last character of a token of two or more characters
        stop = text[index:index + 3]
        if end - start >= 2 and len(stop) == 3 and "\ufffd" not in stop and text.find(stop) == index:
            return index, stop
    raise AssertionError(f"no stop string spanning tokens in {text!r}")


def test_greedy_generate_matches_reference(llm, reference):
    output = llm.generate(PROMPT, greedy(), use_tqdm=False)[0]
    assert output.outputs[0].token_ids == reference[0]
    assert output.outputs[0].text == reference[1]
    assert output.prompt_token_ids == llm.tokenizer.encode(PROMPT)
    assert output.finished and output.outputs[0].finish_reason == "length"


def test_stream_concatenates_to_the_generated_text(llm, reference):
    deltas = list(llm.stream(PROMPT, greedy()))
    assert "".join(deltas) == reference[1]
    assert all(deltas)


def test_stop_string_split_across_tokens(llm, reference, split_stop):
    index, stop = split_stop
    completion = llm.generate(PROMPT, greedy(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert completion.text == reference[1][:index]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop


def test_streamed_text_never_shows_a_stop_string(llm, reference, split_stop):
    index, stop = split_stop
    emitted = ""
    for delta in llm.stream(PROMPT, greedy(stop=[stop])):
        emitted += delta
        assert reference[1][:index].startswith(emitted)  # held back, never taken back
    assert emitted == reference[1][:index]


def test_include_stop_string(llm, reference, split_stop):
    index, stop = split_stop
    completion = llm.generate(PROMPT, greedy(stop=[stop], include_stop_str_in_output=True),
                              use_tqdm=False)[0].outputs[0]
    assert completion.text == reference[1][:index + len(stop)]


def test_earliest_stop_string_wins(llm, reference, split_stop):
    index, stop = split_stop
    later = reference[1][index + 1:index + 4]
    completion = llm.generate(PROMPT, greedy(stop=[later, stop, "never appears"]), use_tqdm=False)[0].outputs[0]
    assert completion.text == reference[1][:index] and completion.stop_reason == stop


def test_absent_stop_string_changes_nothing(llm, reference):
    completion = llm.generate(PROMPT, greedy(stop=["§§§"]), use_tqdm=False)[0].outputs[0]
    assert completion.text == reference[1] and completion.finish_reason == "length"


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=42)
    first = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate([PROMPT, "Hello world"], params, use_tqdm=False)[0].outputs[0].token_ids
    assert first == again
    other = llm.generate(PROMPT, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=43),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert other != first


def test_batch_equals_one_by_one(llm):
    prompts = ["Hello world", "你好", "The weather is nice 😀", "A"]
    batched = llm.generate(prompts, greedy(), use_tqdm=False)
    for prompt, output in zip(prompts, batched):
        params = greedy()
        tokens = [s.token_id for s in generate_tokens(llm.model, llm.tokenizer.encode(prompt), params,
                                                      llm.eos_token_ids, llm.max_model_len)]
        assert output.outputs[0].token_ids == tokens
        assert output.outputs[0].text == llm.tokenizer.decode(tokens)


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "Hello"}]
    output = llm.chat(messages, greedy())
    assert output.prompt_token_ids == llm.tokenizer.encode_chat(messages)
    assert torch.tensor(output.prompt_token_ids)[0] == llm.tokenizer.bos_token_id

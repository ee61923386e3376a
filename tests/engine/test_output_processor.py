"""Detokenization and stop handling, fed chosen token ids through the real tiny tokenizer (no model)."""

from __future__ import annotations

import pytest

from tiny_models import EOS_TOKEN, token_id
from zili.engine.output_processor import OutputProcessor, partial_stop_len
from zili.engine.sequence import Request
from zili.models.tokenizer import Tokenizer
from zili.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_folder(tokenizer_dir)


def feed(tokenizer, text_or_ids, max_model_len=256, **params):
    """Append the tokens of `text` one by one; returns (sequence, released text after each token)."""
    processor = OutputProcessor(tokenizer, [token_id(EOS_TOKEN)], max_model_len)
    ids = text_or_ids if isinstance(text_or_ids, list) else tokenizer.encode(text_or_ids, add_special_tokens=False)
    seq = Request.create("r", [1], SamplingParams(**{"max_tokens": 100, **params})).sequences[0]
    released = []
    for token in ids:
        done = processor.append_token(seq, token, None)
        released.append(seq.text)
        if done:
            break
    return seq, released


TEXT = "Hello world! How are you today?"


def test_stop_string_split_across_tokens_ends_the_text_before_it(tokenizer):
    # "d! H" spans four tokens: 'd', '!', ' ', 'H'
    seq, released = feed(tokenizer, TEXT, stop=["d! H"])
    assert seq.text == "Hello worl" and seq.finish_reason == "stop" and seq.stop_reason == "d! H"
    assert all(seq.text.startswith(text) for text in released)  # never a piece of the stop string
    assert released[-2] == "Hello worl"  # 'd', '!', ' ' were held back while they could start it
    assert seq.output_token_ids == tokenizer.encode("Hello world! H", add_special_tokens=False)


def test_stop_string_can_be_kept_in_the_output(tokenizer):
    seq, _ = feed(tokenizer, TEXT, stop=["d! H"], include_stop_str_in_output=True)
    assert seq.text == "Hello world! H"


def test_held_back_text_is_released_when_the_match_fails(tokenizer):
    seq, released = feed(tokenizer, TEXT, stop=["d! X", "zzz"], max_tokens=len(tokenizer.encode(TEXT)) - 1)
    assert seq.text == TEXT and seq.finish_reason == "length"
    assert "Hello worl" in released and "Hello world! How" in released


def test_the_earliest_of_several_stop_strings_wins(tokenizer):
    seq, _ = feed(tokenizer, TEXT, stop=["you", "How"])
    assert seq.text == "Hello world! " and seq.stop_reason == "How"


def test_stop_strings_only_count_after_min_tokens(tokenizer):
    seq, _ = feed(tokenizer, TEXT, stop=["o"], min_tokens=8)
    assert seq.text == "Hello world! H"  # the 'o's of Hello and world come before 8 tokens


def test_multibyte_characters_are_never_split(tokenizer):
    text = "Le café est très bon"
    seq, released = feed(tokenizer, text, max_tokens=len(tokenizer.encode(text, add_special_tokens=False)))
    assert seq.text == text and seq.finish_reason == "length"
    assert not any("\ufffd" in r for r in released)


def test_eos_and_stop_token_ids(tokenizer):
    eos = token_id(EOS_TOKEN)
    hello = tokenizer.encode("Hello", add_special_tokens=False)
    seq, _ = feed(tokenizer, hello + [eos, 44])
    assert seq.text == "Hello" and seq.finish_reason == "stop" and seq.stop_reason is None
    assert seq.output_token_ids == hello + [eos]
    seq, _ = feed(tokenizer, hello + [eos, 44], ignore_eos=True, max_tokens=len(hello) + 2)
    assert seq.finish_reason == "length" and len(seq.output_token_ids) == len(hello) + 2
    seq, _ = feed(tokenizer, hello, stop_token_ids=[hello[2]])
    assert seq.finish_reason == "stop" and seq.stop_reason == hello[2] and seq.text == "He"


def test_max_model_len_ends_with_length(tokenizer):
    seq, _ = feed(tokenizer, TEXT, max_model_len=5, max_tokens=None)
    assert seq.finish_reason == "length" and seq.num_tokens == 5


def test_partial_stop_len():
    assert partial_stop_len("abc", ["cde"]) == 1
    assert partial_stop_len("abcd", ["cde", "bcdx"]) == 3
    assert partial_stop_len("abc", ["xyz"]) == 0
    assert partial_stop_len("xa", ["ab"]) == 1
    assert partial_stop_len("ab", ["ab"]) == 0  # a full match is find_stop's business, not held back

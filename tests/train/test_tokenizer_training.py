"""The trained tokenizer: lossless on any text, special tokens where promised, and a folder that
zili's Tokenizer and transformers' AutoTokenizer read identically (ids and chat prompt)."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from train_helpers import synthetic_text
from zili.models.tokenizer import Tokenizer
from zili.train.tokenizer_training import CHAT_TEMPLATE, EOS_TOKEN, SPECIAL_TOKENS, save_tokenizer, train_bpe


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_bpe([synthetic_text(300, seed=2)], 300), path, context_length=64)
    return path


@pytest.fixture(scope="module")
def tokenizer(folder):
    return Tokenizer.from_folder(folder)


def test_vocabulary_layout(tokenizer):
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tokenizer.vocab_size == 300
    assert tokenizer.eos_token_id == 0 and tokenizer.bos_token_id is None
    # merges learned from the corpus: a frequent word is one token (after the byte-level space mark)
    assert len(tokenizer.encode(" the")) == 1


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
@example("<|im_start|>")  # a special token's text encodes to its id, which decodes back unless skipped
@example(f"a{EOS_TOKEN}b")
def test_any_text_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert 0 not in ids or EOS_TOKEN in text  # no unknown-token fallback: bytes always encode


def test_end_of_text_in_the_corpus_is_one_token(tokenizer):
    ids = tokenizer.encode(f"The king.{EOS_TOKEN}A lord")
    assert ids.count(0) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The king.A lord"


def test_transformers_reads_the_same_tokenizer_and_template(folder, tokenizer):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(folder)
    text = "Good Romeo speaks to the moon, and weeps. Café ☕ 12345"
    assert reference(text)["input_ids"] == tokenizer.encode(text)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is there?"}]
    prompt = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho is there?<|im_end|>\n" \
                     "<|im_start|>assistant\n"
    assert tokenizer.chat_template_source == CHAT_TEMPLATE
    assert reference.eos_token == EOS_TOKEN and reference.model_max_length == 64

"""Tokenizer basics against `transformers`, and UTF-8 safe incremental detokenization.

The tiny byte-level BPE splits multi-byte characters across tokens: an emoji is always four
single-byte tokens, and some learned merges join the last bytes of one CJK / accented character
with the first bytes of the next, so every decoding step can end inside a character.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2 byte -> vocab character

from tiny_models import BOS_TOKEN, EOS_TOKEN, TRAINING_TEXT
from zili.models.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world! 😀",
    "😀🎉 emoji 👩‍👩‍👧 family",
    "你好，世界。我们今天学习中文。",
    "Le café est très bon, voilà.",
    "mixed: 日本語も少し 😀 café ✓ — done",
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_folder(tokenizer_dir)


def byte_token(tokenizer: Tokenizer, byte: int) -> int:
    return tokenizer.token_to_id(bytes_to_unicode()[byte])


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    reverse = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(reverse[c] for c in tokenizer.id_to_token(token_id))


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> tuple[list[str], str]:
    """(delta per add() call, text from flush())."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush()


def test_special_tokens_and_bos(tokenizer):
    assert tokenizer.bos_token_id == tokenizer.token_to_id(BOS_TOKEN)
    assert tokenizer.eos_token_id == tokenizer.token_to_id(EOS_TOKEN)
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in tokenizer.encode("hi", add_special_tokens=False)
    ids = tokenizer.encode("hi") + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids) == "hi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == f"{BOS_TOKEN}hi{EOS_TOKEN}"


@pytest.mark.parametrize("text", TEXTS + [TRAINING_TEXT])
def test_encode_decode_match_transformers(tokenizer, tokenizer_dir, text):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.encode(text) == reference.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == reference.decode(reference.encode(text),
                                                                         skip_special_tokens=True) == text


def test_vocabulary_splits_characters(tokenizer):
    """The premise of the streaming tests: tokens that are not whole characters exist."""
    partial = [i for i in range(tokenizer.vocab_size) if tokenizer.id_to_token(i).isascii() is False
               and not _is_special(tokenizer, i) and _not_utf8(token_bytes(tokenizer, i))]
    spanning = [i for i in partial if _spans_two_characters(token_bytes(tokenizer, i))]
    assert len(partial) > 100 and spanning
    assert len(tokenizer.encode("😀", add_special_tokens=False)) == 4


def _is_special(tokenizer, token_id):
    return tokenizer.id_to_token(token_id).startswith("<|")


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def _spans_two_characters(data: bytes) -> bool:
    """Ends of one multi-byte character followed by the start of another, e.g. b'\\xbd\\xe4'."""
    is_continuation = [0x80 <= b < 0xC0 for b in data]
    return is_continuation[0] and any(0xC0 <= b for b in data[1:])


def assert_streams_whole_characters(tokenizer, ids):
    deltas, tail = stream(tokenizer, ids)
    expected = tokenizer.decode(ids)
    emitted = ""
    for delta in deltas:
        assert "\ufffd" not in delta or "\ufffd" in expected
        emitted += delta
        assert expected.startswith(emitted)  # never a partial character, never text to take back
    assert emitted + tail == expected


@pytest.mark.parametrize("text", TEXTS)
def test_stream_emits_whole_characters(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 2
    assert_streams_whole_characters(tokenizer, ids)
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) == text and tail == ""


def test_emoji_waits_for_its_last_byte(tokenizer):
    ids = tokenizer.encode("a😀", add_special_tokens=False)
    assert stream(tokenizer, ids)[0] == ["a", "", "", "", "😀"]


STREAM_ALPHABET = list("ab ,.éè你好世界学习日本語") + ["😀", "🎉", "\u200d", "✓"]


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(STREAM_ALPHABET), max_size=40))
def test_stream_property(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert_streams_whole_characters(tokenizer, ids)
    assert "".join(stream(tokenizer, ids)[0]) + stream(tokenizer, ids)[1] == text


def test_truncated_character_is_replaced_on_flush(tokenizer):
    emoji = "😀".encode()
    ids = tokenizer.encode("ab", add_special_tokens=False) + [byte_token(tokenizer, b) for b in emoji[:2]]
    deltas, tail = stream(tokenizer, ids)
    assert deltas[-2:] == ["", ""]  # held back: more bytes could complete the character
    assert "".join(deltas) == "ab"
    assert tail == "\ufffd" and "".join(deltas) + tail == tokenizer.decode(ids)


def test_invalid_bytes_in_the_middle(tokenizer):
    ids = [byte_token(tokenizer, ord("a")), byte_token(tokenizer, 0x80), byte_token(tokenizer, 0xFF),
           byte_token(tokenizer, ord("b"))]
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids) == "a\ufffd\ufffdb"


def test_special_tokens_in_stream(tokenizer):
    ids = tokenizer.encode("hi") + [tokenizer.eos_token_id]
    assert "".join(stream(tokenizer, ids)[0]) == "hi"
    deltas, tail = stream(tokenizer, ids, skip_special_tokens=False)
    assert "".join(deltas) + tail == f"{BOS_TOKEN}hi{EOS_TOKEN}"


def test_long_stream_equals_full_decode(tokenizer):
    ids = tokenizer.encode(TRAINING_TEXT * 3, add_special_tokens=False)
    assert_streams_whole_characters(tokenizer, ids)

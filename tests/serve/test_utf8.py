"""Streamed text never holds a partial UTF-8 character; invalid bytes become U+FFFD (item 16).

The tiny tokenizer is byte-level: logit_bias pushes the model to emit only the byte tokens 0xC3
and 0xA9, so "é" (C3 A9) is always split across two tokens and stray bytes form invalid
sequences. The oracle is the `tokenizers` library decoding the returned token ids in one go.
"""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import MODEL_NAME
from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2 byte -> vocab character


@pytest.fixture(scope="module")
def tokenizer(serve_model) -> Tokenizer:
    return Tokenizer.from_file(str(serve_model / "tokenizer.json"))


def stream_deltas(url: str, path: str, body: dict) -> list[str]:
    deltas = []
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    deltas.append(choice["text"] if "text" in choice else choice["delta"].get("content", ""))
    return deltas


def test_split_multibyte_characters(server, tokenizer):
    alphabet = bytes_to_unicode()
    byte_ids = [tokenizer.token_to_id(alphabet[b]) for b in (0xC3, 0xA9)]
    assert None not in byte_ids
    seen_valid = seen_invalid = False
    for seed in range(4):
        body = {"model": MODEL_NAME, "prompt": "Le caf", "max_tokens": 24, "temperature": 1.0, "seed": seed,
                "ignore_eos": True, "return_token_ids": True, "logit_bias": {str(i): 100 for i in byte_ids}}
        whole = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
        assert set(whole["token_ids"]) <= set(byte_ids)
        expected = tokenizer.decode(whole["token_ids"])
        assert whole["text"] == expected
        deltas = stream_deltas(server.url, "/v1/completions", body)
        assert "".join(deltas) == expected  # so no delta ever showed a character that was not final
        seen_valid |= "é" in expected
        seen_invalid |= "\ufffd" in expected
    assert seen_valid and seen_invalid


def test_multilingual_chat_stream_equals_non_stream(server, tokenizer):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "你好，世界 🙂 café"}], "max_tokens": 30,
            "temperature": 0.8, "seed": 5, "return_token_ids": True}
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    assert whole["message"]["content"] == tokenizer.decode(whole["token_ids"])
    assert "".join(stream_deltas(server.url, "/v1/chat/completions", body)) == whole["message"]["content"]

"""Bad requests, table-driven, against the shared server (RELIABILITY items 1, 2, 3, 4, 21, 22).

Every non-2xx answer carries the OpenAI envelope with a string (never numeric) code, client
faults are 4xx (400 for validation, never 422), the message leaks no traceback or input text,
and the server keeps serving afterwards. The official client raises the matching exception.
"""

from __future__ import annotations

import json
import re

import openai
import pytest
from conftest import MODEL_NAME, SHARED_MAX_MODEL_LEN
from tiny_models import tokenizer_vocab_size

VOCAB = tokenizer_vocab_size()
C = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
CH = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
JSON_HEADERS = {"content-type": "application/json"}


def c(**changes):
    return {**C, **changes}


def ch(**changes):
    return {**CH, **changes}


def without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


# (id, method, path, request kwargs, status, param or None)
CASES = [
    ("unknown-route", "GET", "/nope", {}, 404, None),
    ("unknown-v1-route", "POST", "/v1/nope", {"json": C}, 404, None),
    ("wrong-method", "GET", COMPLETIONS, {}, 405, None),
    ("wrong-method-models", "DELETE", "/v1/models", {}, 405, None),
    ("invalid-json", "POST", COMPLETIONS, {"content": b"{", "headers": JSON_HEADERS}, 400, None),
    ("json-array", "POST", COMPLETIONS, {"content": b"[]", "headers": JSON_HEADERS}, 400, None),
    ("json-number", "POST", COMPLETIONS, {"content": b"42", "headers": JSON_HEADERS}, 400, None),
    ("json-null", "POST", COMPLETIONS, {"content": b"null", "headers": JSON_HEADERS}, 400, None),
    ("empty-body", "POST", COMPLETIONS, {"content": b"", "headers": JSON_HEADERS}, 400, None),
    ("text-plain", "POST", COMPLETIONS, {"content": json.dumps(C).encode(), "headers": {"content-type": "text/plain"}},
     400, None),
    ("form-encoded", "POST", CHAT, {"content": b"model=tiny", "headers":
                                    {"content-type": "application/x-www-form-urlencoded"}}, 400, None),
    ("non-utf8", "POST", COMPLETIONS, {"content": b'{"model": "tiny", "prompt": "\xff\xfe"}', "headers": JSON_HEADERS},
     400, None),
    ("nan-literal", "POST", COMPLETIONS, {"content": b'{"model":"tiny","prompt":"hi","temperature":NaN}',
                                         "headers": JSON_HEADERS}, 400, "temperature"),
    ("infinity-literal", "POST", CHAT, {"content": json.dumps(CH)[:-1].encode() + b',"top_p":Infinity}',
                                        "headers": JSON_HEADERS}, 400, "top_p"),
    ("temperature-string", "POST", COMPLETIONS, {"json": c(temperature="1.0")}, 400, "temperature"),
    ("prompt-number", "POST", COMPLETIONS, {"json": c(prompt=42)}, 400, "prompt"),
    ("messages-empty", "POST", CHAT, {"json": ch(messages=[])}, 400, "messages"),
    ("messages-missing", "POST", CHAT, {"json": without(CH, "messages")}, 400, "messages"),
    ("messages-not-list", "POST", CHAT, {"json": ch(messages="hi")}, 400, "messages"),
    ("model-missing", "POST", COMPLETIONS, {"json": without(C, "model")}, 400, "model"),
    ("model-number", "POST", COMPLETIONS, {"json": c(model=5)}, 400, "model"),
    ("model-unknown", "POST", CHAT, {"json": ch(model="gpt-4")}, 404, "model"),
    ("temperature-high", "POST", COMPLETIONS, {"json": c(temperature=2.5)}, 400, "temperature"),
    ("temperature-negative", "POST", CHAT, {"json": ch(temperature=-0.1)}, 400, "temperature"),
    ("top-p-high", "POST", COMPLETIONS, {"json": c(top_p=1.5)}, 400, "top_p"),
    ("n-zero", "POST", COMPLETIONS, {"json": c(n=0)}, 400, "n"),
    ("n-high", "POST", CHAT, {"json": ch(n=17)}, 400, "n"),
    ("n-bool", "POST", CHAT, {"json": ch(n=True)}, 400, "n"),
    ("presence-high", "POST", COMPLETIONS, {"json": c(presence_penalty=3)}, 400, "presence_penalty"),
    ("frequency-low", "POST", CHAT, {"json": ch(frequency_penalty=-2.5)}, 400, "frequency_penalty"),
    ("top-logprobs-high", "POST", CHAT, {"json": ch(logprobs=True, top_logprobs=21)}, 400, "top_logprobs"),
    ("top-logprobs-alone", "POST", CHAT, {"json": ch(top_logprobs=2)}, 400, "top_logprobs"),
    ("logprobs-high", "POST", COMPLETIONS, {"json": c(logprobs=6)}, 400, "logprobs"),
    ("stop-too-many", "POST", COMPLETIONS, {"json": c(stop=["a", "b", "c", "d", "e"])}, 400, "stop"),
    ("stop-empty", "POST", CHAT, {"json": ch(stop="")}, 400, "stop"),
    ("stop-too-long", "POST", CHAT, {"json": ch(stop="x" * 300)}, 400, "stop"),
    ("stop-number", "POST", CHAT, {"json": ch(stop=5)}, 400, "stop"),
    ("max-tokens-zero", "POST", COMPLETIONS, {"json": c(max_tokens=0)}, 400, "max_tokens"),
    ("max-tokens-negative", "POST", CHAT, {"json": ch(max_tokens=-1)}, 400, "max_tokens"),
    ("max-completion-tokens-zero", "POST", CHAT, {"json": ch(max_completion_tokens=0)}, 400, "max_completion_tokens"),
    ("logit-bias-key-text", "POST", COMPLETIONS, {"json": c(logit_bias={"abc": 1})}, 400, "logit_bias"),
    ("logit-bias-key-vocab", "POST", CHAT, {"json": ch(logit_bias={str(VOCAB): 1})}, 400, "logit_bias"),
    ("logit-bias-value", "POST", COMPLETIONS, {"json": c(logit_bias={"5": 101})}, 400, "logit_bias"),
    ("logit-bias-too-many", "POST", COMPLETIONS, {"json": c(logit_bias={str(i): 1 for i in range(301)})}, 400,
     "logit_bias"),
    ("token-id-negative", "POST", COMPLETIONS, {"json": c(prompt=[1, -1])}, 400, "prompt"),
    ("token-id-vocab", "POST", COMPLETIONS, {"json": c(prompt=[1, VOCAB])}, 400, "prompt"),
    ("prompt-empty-list", "POST", COMPLETIONS, {"json": c(prompt=[])}, 400, "prompt"),
    ("prompt-empty-ids", "POST", COMPLETIONS, {"json": c(prompt=[[]])}, 400, "prompt"),
    ("prompt-empty-string", "POST", COMPLETIONS, {"json": c(prompt=[""])}, 400, "prompt"),
    ("prompt-mixed", "POST", COMPLETIONS, {"json": c(prompt=["a", 1])}, 400, "prompt"),
    ("prompt-too-long", "POST", COMPLETIONS, {"json": c(prompt=[5] * (SHARED_MAX_MODEL_LEN + 10))}, 400, "prompt"),
    ("prompt-fills-context", "POST", COMPLETIONS, {"json": c(prompt=[5] * SHARED_MAX_MODEL_LEN)}, 400, "prompt"),
    ("prompt-plus-max-tokens", "POST", COMPLETIONS, {"json": c(prompt=[5] * 100, max_tokens=50)}, 400, "max_tokens"),
    ("chat-too-long", "POST", CHAT, {"json": ch(messages=[{"role": "user", "content": "hello " * 200}])}, 400,
     "messages"),
    ("role-unknown", "POST", CHAT, {"json": ch(messages=[{"role": "wizard", "content": "hi"}])}, 400,
     "messages[0].role"),
    ("content-image", "POST", CHAT, {"json": ch(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}])}, 400, None),
    ("tools", "POST", CHAT, {"json": ch(tools=[{"type": "function", "function": {"name": "f"}}])}, 400, "tools"),
    ("response-format-json", "POST", CHAT, {"json": ch(response_format={"type": "json_object"})}, 400,
     "response_format"),
    ("suffix", "POST", COMPLETIONS, {"json": c(suffix="end")}, 400, "suffix"),
    ("best-of", "POST", COMPLETIONS, {"json": c(best_of=3)}, 400, "best_of"),
    ("too-many-choices", "POST", COMPLETIONS, {"json": c(prompt=["a", "b", "c", "d"], n=8)}, 400, "n"),
    ("compute-cap", "POST", CHAT, {"json": ch(n=16, max_tokens=100)}, 400, "max_tokens"),
    ("seed-string", "POST", COMPLETIONS, {"json": c(seed="x")}, 400, "seed"),
    ("seed-huge", "POST", COMPLETIONS, {"json": c(seed=2**70)}, 400, "seed"),
    ("stream-string", "POST", CHAT, {"json": ch(stream="yes")}, 400, "stream"),
    ("stream-options-type", "POST", CHAT, {"json": ch(stream=True, stream_options={"include_usage": "yes"})}, 400,
     "stream_options.include_usage"),
    ("top-k-negative", "POST", COMPLETIONS, {"json": c(top_k=-2)}, 400, "top_k"),
    ("repetition-zero", "POST", COMPLETIONS, {"json": c(repetition_penalty=0)}, 400, "repetition_penalty"),
    ("min-p-high", "POST", CHAT, {"json": ch(min_p=1.5)}, 400, "min_p"),
    ("stop-token-negative", "POST", CHAT, {"json": ch(stop_token_ids=[-1])}, 400, "stop_token_ids"),
    ("stop-token-vocab", "POST", CHAT, {"json": ch(stop_token_ids=[VOCAB])}, 400, "stop_token_ids"),
    ("too-many-messages", "POST", CHAT, {"json": ch(messages=[{"role": "user", "content": "a"}] * 1100)}, 400,
     "messages"),
    ("lone-surrogate", "POST", CHAT, {"content": json.dumps(CH).replace('"hi"', '"\\ud800"').encode(),
                                      "headers": JSON_HEADERS}, 400, None),
    ("tokenize-both", "POST", "/tokenize", {"json": {"prompt": "a", "messages": CH["messages"]}}, 400, "prompt"),
    ("tokenize-model", "POST", "/tokenize", {"json": {"model": "nope", "prompt": "a"}}, 404, "model"),
    ("detokenize-negative", "POST", "/detokenize", {"json": {"tokens": [-1]}}, 400, "tokens"),
    ("detokenize-text", "POST", "/detokenize", {"json": {"tokens": "abc"}}, 400, "tokens"),
    ("bad-content-length", "POST", COMPLETIONS, {"content": json.dumps(C).encode(),
                                                 "headers": {**JSON_HEADERS, "content-encoding": "br"}}, 415, None),
]

LEAK_PATTERNS = [re.compile(p) for p in (r"Traceback", r"File \"", r"0x[0-9a-f]{6,}", r"line \d+", r"\bat 0x",
                                         r"pydantic", r"ValidationError")]


def assert_envelope(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    if param is not None:
        assert error["param"] == param, error
    for pattern in LEAK_PATTERNS:
        assert not pattern.search(response.text), (pattern.pattern, response.text)
    return error


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_request_gets_envelope(http, case):
    _, method, path, kwargs, status, param = case
    response = http.request(method, path, **kwargs)
    error = assert_envelope(response, status, param)
    assert 400 <= response.status_code < 500  # client faults are 4xx
    if "context" in case[0] or case[0] in ("prompt-fills-context", "prompt-plus-max-tokens"):
        assert error["code"] == "context_length_exceeded"
        numbers = set(re.findall(r"\d+", error["message"]))
        assert str(SHARED_MAX_MODEL_LEN) in numbers  # names the limit and the request's size


def test_context_messages_name_both_numbers(http):
    error = complete_error(http, c(prompt=[5] * 100, max_tokens=50))
    assert "128" in error["message"] and "150" in error["message"]
    error = complete_error(http, c(prompt=[5] * 200))
    assert "128" in error["message"] and "200" in error["message"]


def complete_error(http, body):
    return assert_envelope(http.post(COMPLETIONS, json=body), 400)


def test_omitted_max_tokens_is_clamped_to_the_room_left(http):
    prompt = [5] * 120
    response = http.post(CHAT.replace("chat/", ""), json=without(c(prompt=prompt, ignore_eos=True), "max_tokens"))
    assert response.status_code == 200  # completions default (16) clamped to the 8 tokens left
    assert response.json()["usage"]["completion_tokens"] == SHARED_MAX_MODEL_LEN - 120
    chat = http.post(CHAT, json=without(ch(ignore_eos=True), "max_tokens"))
    assert chat.status_code == 200
    usage = chat.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == SHARED_MAX_MODEL_LEN
    assert chat.json()["choices"][0]["finish_reason"] == "length"


def test_server_keeps_serving_after_the_corpus(http):
    for _, method, path, kwargs, _, _ in CASES:
        http.request(method, path, **kwargs)
    assert http.get("/health").status_code == 200
    ok = http.post(COMPLETIONS, json=C)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("kwargs, exception, param", [
    ({"temperature": 2.5}, openai.BadRequestError, "temperature"),
    ({"n": 0}, openai.BadRequestError, "n"),
    ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
    ({"extra_body": {"top_logprobs": 30, "logprobs": True}}, openai.BadRequestError, "top_logprobs"),
    ({"model": "missing"}, openai.NotFoundError, "model"),
    ({"max_tokens": 500}, openai.BadRequestError, "max_tokens"),
])
def test_openai_client_raises_matching_exception(openai_client, kwargs, exception, param):
    request = {"model": MODEL_NAME, "messages": CH["messages"], **kwargs}
    with pytest.raises(exception) as info:
        openai_client.chat.completions.create(**request)
    assert info.value.body["param"] == param
    assert not isinstance(info.value, openai.UnprocessableEntityError)

"""Sampling bounds, both directions, as a hypothesis property (RELIABILITY item 3).

In range (OpenAI spec + zili's extensions): every combination is served (200, finish_reason set).
Out of range: one bad field among valid ones is a 400 whose `param` names that field.
Runs against the shared real server with the tiny model (prompt + max_tokens stay small).
"""

from __future__ import annotations

import math

import pytest
from conftest import MODEL_NAME
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import tokenizer_vocab_size

VOCAB = tokenizer_vocab_size()
INT64 = 2**63
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

finite = dict(allow_nan=False, allow_infinity=False)
text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8)

common = {
    "temperature": st.floats(0, 2, **finite),
    "top_p": st.floats(0, 1, **finite),
    "n": st.integers(1, 16),
    "presence_penalty": st.floats(-2, 2, **finite),
    "frequency_penalty": st.floats(-2, 2, **finite),
    "stop": st.one_of(st.none(), text, st.lists(text, max_size=4)),
    "max_tokens": st.integers(1, 4),
    "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100, **finite), max_size=5),
    "seed": st.integers(-INT64, INT64 - 1),
    "top_k": st.integers(-1, 2 * VOCAB),
    "min_p": st.floats(0, 1, **finite),
    "repetition_penalty": st.floats(0, 2, exclude_min=True, **finite),
    "ignore_eos": st.booleans(),
}
completion_fields = {**common, "logprobs": st.integers(0, 5), "echo": st.booleans(),
                     "prompt": st.one_of(text, st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10))}
chat_fields = {**common, "top_logprobs": st.integers(0, 20)}


def optional_fields(fields: dict) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({}, optional=fields)


@SETTINGS
@given(body=optional_fields(completion_fields), stream=st.booleans())
def test_in_range_completions_succeed(http, body, stream):
    body = {"model": MODEL_NAME, "prompt": "Hi", **body, "stream": stream}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, (body, response.text)
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]") and '"error"' not in response.text
    else:
        choices = response.json()["choices"]
        assert len(choices) == body.get("n", 1)
        assert all(c["finish_reason"] in ("stop", "length") for c in choices)


@SETTINGS
@given(body=optional_fields(chat_fields), logprobs=st.booleans())
def test_in_range_chat_succeeds(http, body, logprobs):
    if not logprobs:
        body.pop("top_logprobs", None)
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], **body, "logprobs": logprobs}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, (body, response.text)
    for choice in response.json()["choices"]:
        assert choice["finish_reason"] in ("stop", "length")
        if logprobs:
            assert all(math.isfinite(item["logprob"]) for item in choice["logprobs"]["content"])


out_of_range = {
    "temperature": st.one_of(st.floats(max_value=0, exclude_max=True, **finite),
                             st.floats(min_value=2, exclude_min=True, **finite)),
    "top_p": st.one_of(st.floats(max_value=0, exclude_max=True, **finite),
                       st.floats(min_value=1, exclude_min=True, **finite)),
    "n": st.one_of(st.integers(max_value=0), st.integers(min_value=17)),
    "presence_penalty": st.one_of(st.floats(max_value=-2, exclude_max=True, **finite),
                                  st.floats(min_value=2, exclude_min=True, **finite)),
    "frequency_penalty": st.floats(min_value=2, exclude_min=True, **finite),
    "max_tokens": st.integers(max_value=0),
    "stop": st.lists(text, min_size=5, max_size=8),
    "logit_bias": st.one_of(st.integers(VOCAB, 10**9).map(lambda t: {str(t): 1.0}),
                            st.floats(min_value=100, exclude_min=True, **finite).map(lambda v: {"1": v})),
    "seed": st.one_of(st.integers(max_value=-INT64 - 1), st.integers(min_value=INT64)),
    "top_k": st.integers(max_value=-2),
    "min_p": st.floats(min_value=1, exclude_min=True, **finite),
    "repetition_penalty": st.one_of(st.floats(max_value=0, **finite), st.floats(min_value=2, exclude_min=True,
                                                                                 **finite)),
    "logprobs": st.one_of(st.integers(max_value=-1), st.integers(min_value=6)),
    "prompt": st.lists(st.integers(VOCAB, 10**6), min_size=1, max_size=3),
}


@SETTINGS
@given(data=st.data(), param=st.sampled_from(sorted(out_of_range)))
def test_out_of_range_is_400_naming_the_parameter(http, data, param):
    value = data.draw(out_of_range[param])
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, param: value}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400, (body, response.text)
    assert response.json()["error"]["param"] == param


@SETTINGS
@given(value=st.one_of(st.integers(max_value=-1), st.integers(min_value=21)))
def test_out_of_range_top_logprobs(http, value):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "logprobs": True,
            "top_logprobs": value}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_floats_are_400(http, value):
    raw = ('{"model": "%s", "prompt": "Hi", "temperature": %s}' % (MODEL_NAME, value)).encode()
    response = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"

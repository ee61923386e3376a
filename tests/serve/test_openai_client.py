"""The official `openai` client against a real server: every endpoint, streaming and not (items 5, 23).

Responses are validated against the client's own schema types (openai.types), and streamed text
is checked against the non-streamed text for the same seed.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import ALIAS_NAME, MODEL_NAME
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]


def strict_schema(model_cls, data: dict):
    """Validate a response dict against the openai type (pydantic), failing on wrong types."""
    return model_cls.model_validate(data, strict=False)


def test_models_lists_exactly_the_served_names(openai_client):
    names = [m.id for m in openai_client.models.list().data]
    assert names == [MODEL_NAME, ALIAS_NAME]
    assert openai_client.models.retrieve(ALIAS_NAME).id == ALIAS_NAME


def test_unknown_model_is_404(openai_client):
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("nope")


def test_completion_text_prompt(openai_client, server):
    result = openai_client.completions.create(model=ALIAS_NAME, prompt="Once upon a time", max_tokens=6,
                                              temperature=0)
    raw = httpx.post(server.base_url + "/completions", json={"model": ALIAS_NAME, "prompt": "Once upon a time",
                                                             "max_tokens": 6, "temperature": 0}).json()
    strict_schema(Completion, raw)
    assert result.model == ALIAS_NAME and result.object == "text_completion"
    assert result.choices[0].text == raw["choices"][0]["text"]  # greedy: same text twice
    assert result.choices[0].finish_reason in ("stop", "length")
    assert result.usage.completion_tokens <= 6 and result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_completion_batch_of_prompts_and_token_ids(openai_client, http):
    ids = http.post("/tokenize", json={"prompt": "The quick brown fox"}).json()["tokens"]
    by_text = openai_client.completions.create(model=MODEL_NAME, prompt=["The quick brown fox", "Hello world"],
                                               max_tokens=5, temperature=0)
    by_ids = openai_client.completions.create(model=MODEL_NAME, prompt=[ids, ids], max_tokens=5, temperature=0)
    single_ids = openai_client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, temperature=0)
    assert [c.index for c in by_text.choices] == [0, 1]
    assert by_ids.choices[0].text == by_ids.choices[1].text == by_text.choices[0].text == single_ids.choices[0].text


def test_completion_n_seed_echo_logprobs(openai_client):
    result = openai_client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, n=3, seed=7,
                                              temperature=1.0, echo=True, logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in result.choices) == [0, 1, 2]
    again = openai_client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, n=3, seed=7,
                                             temperature=1.0, echo=True, logprobs=2, extra_body={"ignore_eos": True})
    assert [c.text for c in result.choices] == [c.text for c in again.choices]
    per_choice = 4  # ignore_eos: every choice runs to max_tokens
    assert result.usage.completion_tokens == 3 * per_choice
    for choice in result.choices:
        assert choice.text.startswith("Hello")
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        # echo: every prompt token (the first without a logprob, as OpenAI sends it), then the completion
        assert len(lp.tokens) == result.usage.prompt_tokens + per_choice
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(v <= 0 for v in lp.token_logprobs[1:])
        assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
        assert lp.text_offset == sorted(lp.text_offset)


def test_completion_stop_string(openai_client):
    free = openai_client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=12, temperature=0)
    text = free.choices[0].text
    assert len(text) >= 3
    # a two-character stop string whose first occurrence is at k: the output must end right before it
    k = max(i for i in range(len(text) - 1) if text.find(text[i:i + 2]) == i)
    stopped = openai_client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=12, temperature=0,
                                               stop=[text[k:k + 2]])
    assert stopped.choices[0].text == text[:k]
    assert stopped.choices[0].finish_reason == "stop"


def test_completion_stream_equals_non_stream(openai_client):
    kwargs = dict(model=MODEL_NAME, prompt="Machines learn", max_tokens=10, temperature=0.8, seed=3)
    whole = openai_client.completions.create(**kwargs)
    chunks = list(openai_client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_chat_non_stream(openai_client, server):
    result = openai_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=5,
                                                   temperature=0, logprobs=True, top_logprobs=3)
    raw = httpx.post(server.base_url + "/chat/completions", json={
        "model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "logprobs": True,
        "top_logprobs": 3}).json()
    strict_schema(ChatCompletion, raw)
    choice = result.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == raw["choices"][0]["message"]["content"]
    assert len(choice.logprobs.content) == result.usage.completion_tokens
    for item in choice.logprobs.content:
        assert item.logprob <= 0 and 1 <= len(item.top_logprobs) <= 3
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-4  # the best alternative is at least as likely


def test_chat_stream_with_usage_and_n(openai_client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0.9, seed=11, n=2)
    whole = openai_client.chat.completions.create(**kwargs)
    stream = openai_client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    texts, finish, usage, finish_chunks = {0: "", 1: ""}, {}, None, []
    for chunk in stream:
        ChatCompletionChunk.model_validate(chunk.model_dump())
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
                finish_chunks.append(choice.index)
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert sorted(finish_chunks) == [0, 1]  # one finishing chunk per choice
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_chat_extensions_accepted(openai_client):
    result = openai_client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=0.7, seed=1, stop=["\n"],
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True})
    assert result.usage.completion_tokens >= 1


def test_tokenize_detokenize_round_trip(openai_client, http):
    tokens = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": "Hello world", "add_special_tokens": False})
    assert tokens.status_code == 200
    ids = tokens.json()["tokens"]
    back = openai_client.post("/detokenize", body={"model": MODEL_NAME, "tokens": ids}, cast_to=httpx.Response)
    assert back.json()["prompt"] == "Hello world"
    chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"].endswith("assistant:")


def test_health_ready_metrics(http):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").status_code == 200
    http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
    text = http.get("/metrics").text
    for name in ("zili_http_requests_total", "zili_time_to_first_token_seconds_bucket",
                 "zili_time_per_output_token_seconds_bucket", "zili_engine_num_running", "zili_engine_num_waiting",
                 "zili_engine_kv_blocks_used", "zili_engine_prefix_cache_hit_rate",
                 "zili_engine_prompt_tokens_total", "zili_engine_generation_tokens_total"):
        assert name in text, name
    assert 'zili_http_requests_total{route="/v1/completions",status="200"}' in text

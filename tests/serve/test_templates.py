"""Chat templates are sandboxed, size- and time-limited; template errors are 400 (item 20).

Message content is data, never template code (SSTI payloads come out literally). A hostile
model folder (its chat template is untrusted input too) cannot reach Python internals, loop for
ever, or blow up memory: each attempt is a 400 and the server goes on. Rendering happens in the
HTTP process, so an in-process app with a fake engine exercises the real code path.
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from fake_engine import AppServer, SlowFakeEngine
from tiny_models import tokenizer_vocab_size

SSTI_PAYLOADS = ["{{ 7*7 }}", "{% for x in range(3) %}X{% endfor %}", "{{ ''.__class__.__mro__ }}",
                 "{{ cycler.__init__.__globals__.os.popen('id').read() }}", "${7*7} <%= 7*7 %> #{7*7}"]

HOSTILE_TEMPLATES = {
    "mro-escape": "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "globals-escape": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "nested-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
    "huge-output": "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}",
    "huge-repeat": "{{ 'x' * 1000000000 }}",
    "huge-power": "{{ 2 ** 1000000 }}",
    "raises": "{{ raise_exception('roles must alternate') }}",
    "attribute-on-undefined": "{{ messages[0].nope.deeper }}",
}


def chat(url: str, content: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 2})


def test_message_content_is_never_template_code(serve_model):
    with AppServer(serve_model, SlowFakeEngine(tokenizer_vocab_size(), gate_open=True),
                   served_model_names=["m"]) as server:
        for payload in SSTI_PAYLOADS:
            ids = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": payload}]})
            assert ids.status_code == 200
            text = httpx.post(server.url + "/detokenize", json={"tokens": ids.json()["tokens"]}).json()["prompt"]
            assert f"user: {payload}" in text  # literally, not evaluated
            assert chat(server.url, payload).status_code == 200


@pytest.fixture(scope="module")
def hostile_models(serve_model, tmp_path_factory) -> dict:
    folders = {}
    for name, template in HOSTILE_TEMPLATES.items():
        folder = tmp_path_factory.mktemp(name)
        for item in ("tokenizer.json", "config.json"):
            shutil.copy(serve_model / item, folder / item)
        config = json.loads((serve_model / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        folders[name] = folder
    return folders


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_hostile_model_template_is_a_400(hostile_models, name):
    engine = SlowFakeEngine(tokenizer_vocab_size(), gate_open=True)
    with AppServer(hostile_models[name], engine, served_model_names=["m"], template_timeout_s=0.5) as server:
        response = chat(server.url, "hello")
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "template_error" and error["param"] == "messages"
        assert "uid=" not in response.text and "Traceback" not in response.text
        assert engine.started == 0  # nothing reached the engine
        assert httpx.get(server.url + "/health").status_code == 200
        plain = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
        assert plain.status_code == 200  # the server goes on

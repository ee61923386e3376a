"""Chat templates render byte-identically to `transformers`' apply_chat_template, inside a sandbox."""

from __future__ import annotations

import pytest

from tiny_models import SIMPLE_CHAT_TEMPLATE, build_tokenizer
from zili.errors import TokenizerError
from zili.models.tokenizer import Tokenizer

# Qwen2.5-style ChatML with a default system prompt, tools and tool calls.
CHATML_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "system" and loop.first %}
    {%- elif message.role == "assistant" and message.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- for tool_call in message.tool_calls %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.function.name + '", "arguments": ' }}
            {{- tool_call.function.arguments | tojson + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama-3-style: bos_token from the tokenizer config, headers, trimmed content.
LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Mistral-style: roles must alternate, enforced with raise_exception.
ALTERNATING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

TEMPLATES = {"simple": SIMPLE_CHAT_TEMPLATE, "chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE,
             "alternating": ALTERNATING_TEMPLATE}

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello world!"}],
    "multi-turn": [
        {"role": "user", "content": "What is your name?"},
        {"role": "assistant", "content": "  My name is Zili.  "},
        {"role": "user", "content": "Le café est très bon 😀 你好"},
    ],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
    ],
    "tool-call": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"celsius": 21}'},
    ],
}

# (template, conversation, tools): every combination the template can render
RENDER_CASES = [
    (template, conversation, tools)
    for template in TEMPLATES
    for conversation in CONVERSATIONS
    for tools in (None, [WEATHER_TOOL])
    if not (template == "alternating" and conversation in ("system", "tool-call"))
    if tools is None or template == "chatml"
]


@pytest.fixture(scope="module")
def tokenizers_for(tmp_path_factory):
    """template name -> (zili Tokenizer, transformers tokenizer) of the same folder."""
    from transformers import AutoTokenizer

    cache = {}

    def get(name: str, template_file: bool = False):
        if (name, template_file) not in cache:
            folder = build_tokenizer(tmp_path_factory.mktemp(name), chat_template=TEMPLATES[name],
                                     template_file=template_file)
            cache[name, template_file] = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
        return cache[name, template_file]

    return get


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen-prompt", "no-gen-prompt"])
@pytest.mark.parametrize("template, conversation, tools", RENDER_CASES,
                         ids=[f"{t}-{c}{'-tools' if tools else ''}" for t, c, tools in RENDER_CASES])
def test_render_matches_transformers(tokenizers_for, template, conversation, tools, add_generation_prompt):
    ours, theirs = tokenizers_for(template)
    messages = CONVERSATIONS[conversation]
    expected = theirs.apply_chat_template(messages, tools=tools, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools) == expected


@pytest.mark.parametrize("template", ["simple", "chatml", "llama3"])
def test_encode_chat_matches_transformers_token_ids(tokenizers_for, template):
    ours, theirs = tokenizers_for(template)
    messages = CONVERSATIONS["multi-turn"]
    expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert ours.encode_chat(messages) == list(expected)
    if template == "simple":  # the template writes BOS itself; encode_chat must not add a second one
        assert ours.encode_chat(messages)[:2] != [ours.bos_token_id] * 2


def test_template_in_chat_template_jinja_file(tokenizers_for):
    ours, theirs = tokenizers_for("chatml", template_file=True)
    messages = CONVERSATIONS["system"]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert ours.encode_chat(messages) == list(theirs.apply_chat_template(messages, add_generation_prompt=True))


def test_raise_exception_becomes_tokenizer_error(tokenizers_for):
    ours, theirs = tokenizers_for("alternating")
    messages = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(Exception, match="must alternate"):
        theirs.apply_chat_template(messages, tokenize=False)
    with pytest.raises(TokenizerError, match="must alternate"):
        ours.apply_chat_template(messages)


def _tokenizer_with_template(tmp_path, template: str) -> Tokenizer:
    return Tokenizer.from_folder(build_tokenizer(tmp_path, chat_template=template))


def test_template_that_does_not_compile(tmp_path):
    with pytest.raises(TokenizerError, match="does not compile"):
        _tokenizer_with_template(tmp_path, "{% for message in messages %}{{ message.content }}")


@pytest.mark.parametrize("messages", [[], [{"role": "user"}], "not a list", [None]],
                         ids=["empty", "no-content", "string", "none-message"])
def test_template_failing_on_messages_raises_tokenizer_error(tmp_path, messages):
    tokenizer = _tokenizer_with_template(tmp_path, CHATML_TEMPLATE)
    with pytest.raises(TokenizerError):
        tokenizer.apply_chat_template(messages)


def test_arithmetic_error_in_template_raises_tokenizer_error(tmp_path):
    tokenizer = _tokenizer_with_template(tmp_path, "{{ 100 / (messages | length - 1) }}")
    with pytest.raises(TokenizerError, match="ZeroDivisionError"):
        tokenizer.apply_chat_template(CONVERSATIONS["user"])


def test_message_content_is_data_not_template(tokenizers_for):
    ours, theirs = tokenizers_for("chatml")
    messages = [{"role": "user", "content": "{{ 7 * 7 }} {% if true %}x{% endif %}"}]
    rendered = ours.apply_chat_template(messages)
    assert "{{ 7 * 7 }} {% if true %}x{% endif %}" in rendered
    assert rendered == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_no_template(tmp_path):
    tokenizer = _tokenizer_with_template(tmp_path, None)
    assert not tokenizer.has_chat_template
    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer.apply_chat_template(CONVERSATIONS["user"])


def test_oversized_output_is_refused(tmp_path):
    tokenizer = _tokenizer_with_template(tmp_path, "{% for i in range(90000) %}{{ 'x' * 100 }}{% endfor %}")
    with pytest.raises(TokenizerError, match="too large"):
        tokenizer.apply_chat_template(CONVERSATIONS["user"])


SSTI_PAYLOADS = {
    "subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals-via-helper": "{{ raise_exception.__globals__['__builtins__'] }}",
    "os-via-cycler": "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}",
    "mutate-messages": "{{ messages.append({'role': 'system', 'content': 'pwned'}) }}{{ messages | length }}",
    "mutate-dict": "{% set m = messages[0] %}{{ m.update({'content': 'pwned'}) }}{{ m.content }}",
    "format-string": "{{ '{0.__class__.__init__.__globals__}'.format(messages) }}",
    "loop-subclasses": "{% for c in [].__class__.__base__.__subclasses__() %}{{ c.__name__ }}{% endfor %}",
}


@pytest.mark.parametrize("payload", list(SSTI_PAYLOADS.values()), ids=list(SSTI_PAYLOADS))
def test_sandbox_blocks_template_injection(tmp_path, payload):
    tokenizer = _tokenizer_with_template(tmp_path, payload)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizerError):
        tokenizer.apply_chat_template(messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_unsafe_attribute_renders_nothing(tmp_path):
    """Reading a dunder attribute yields an undefined value: no Python internals leak into a prompt."""
    tokenizer = _tokenizer_with_template(tmp_path, "[{{ messages.__class__ }}][{{ messages[0].__init__ }}]")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "[][]"

"""Chat template rendering for requests: sandboxed (tokenizer.py), size- and time-limited.

The model's template comes from a downloaded folder and is untrusted: Jinja's sandbox stops
attribute tricks, `MAX_TEMPLATE_OUTPUT_CHARS` bounds the prompt, and here a trace function
stops a render that runs past its deadline (nested loops over `range`), raising
TemplateTimeoutError inside the render thread. Renders run in a worker thread, never on the
event loop.
"""

from __future__ import annotations

import asyncio
import sys
import time

from zili.errors import TokenizerError

TEMPLATE_FILENAME = "<template>"  # Jinja's code name for templates compiled from a string


class TemplateTimeoutError(TokenizerError):
    pass


def _render_with_deadline(render, timeout_s: float):
    deadline = time.monotonic() + timeout_s

    def local_trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateTimeoutError(f"chat template rendering exceeded {timeout_s:g} s")
        return local_trace

    def global_trace(frame, event, arg):
        # only template code is traced line by line; library frames run untraced
        if frame.f_code.co_filename == TEMPLATE_FILENAME:
            return local_trace
        return None

    previous = sys.gettrace()
    sys.settrace(global_trace)
    try:
        return render()
    finally:
        sys.settrace(previous)


async def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool,
                      timeout_s: float) -> tuple[str, list[int]]:
    """messages -> (prompt text, token ids), raising TokenizerError (-> 400) on any template failure."""

    def work():
        text = _render_with_deadline(
            lambda: tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt),
            timeout_s)
        return text, tokenizer.encode(text, add_special_tokens=False)

    try:
        return await asyncio.to_thread(work)
    except RecursionError:
        raise TokenizerError("chat template failed on these messages: RecursionError") from None
    except MemoryError:
        raise TokenizerError("chat template needed too much memory") from None

"""`zili chat [MODEL]`: interactive multi-turn chat in the terminal, streaming tokens."""

from __future__ import annotations

import argparse
import sys

from zili.commands.common import add_engine_arguments, add_model_arguments, add_sampling_arguments, load_llm, sampling_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_engine_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt")
    parser.set_defaults(run=run, max_tokens=512)


def run(args: argparse.Namespace) -> int:
    llm = load_llm(args)
    params = llm.default_sampling_params(**sampling_overrides(args))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Type a message; /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt_ids = llm.tokenizer.encode_chat(messages, add_generation_prompt=True)
        reply = []
        try:
            for delta in llm.stream(prompt_ids, params):
                reply.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # Ctrl-C stops the answer, not the chat
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})

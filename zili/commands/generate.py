"""`zili generate [MODEL] PROMPT`: stream one completion to stdout."""

from __future__ import annotations

import argparse
import sys

from zili.commands.common import add_engine_arguments, add_model_arguments, add_sampling_arguments, load_llm, sampling_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_engine_arguments(parser)
    parser.add_argument("prompt", nargs="?", default=None, help="prompt text (default: read stdin)")
    add_sampling_arguments(parser)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.prompt is None and args.model is not None and not _looks_like_model(args.model):
        args.model, args.prompt = None, args.model  # `zili generate "text"` uses the demo model
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    llm = load_llm(args)
    params = llm.default_sampling_params(**sampling_overrides(args))
    prompt_ids = llm.tokenizer.encode_chat([{"role": "user", "content": prompt}]) if args.chat else prompt
    if not args.chat:
        sys.stdout.write(prompt)
    for delta in llm.stream(prompt_ids, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _looks_like_model(value: str) -> bool:
    from pathlib import Path

    return Path(value).is_dir()

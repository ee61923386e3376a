"""The `zili` command. Each subcommand lives in zili/commands/<name>.py and is imported lazily."""

from __future__ import annotations

import argparse
import importlib
import sys

from zili.errors import ZiliError

# subcommand -> (module in zili.commands, one-line help)
COMMANDS = {
    "generate": ("generate", "complete a prompt and stream the text"),
    "chat": ("chat", "interactive chat in the terminal"),
    "serve": ("serve", "OpenAI-compatible HTTP server with a web chat page"),
    "quantize": ("quantize", "compress a model's weights (RTN, GPTQ, AWQ)"),
    "eval": ("eval", "evaluate a model (perplexity)"),
    "train": ("train", "train a tokenizer and a small model from a text corpus"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zili", description="Run, compress and serve open-weight LLMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: an absent sub-command flag must not reset `zili --debug COMMAND` to False
        cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
        if name == wanted:  # import only the module that runs
            try:
                importlib.import_module(f"zili.commands.{module}").add_arguments(cmd)
            except ModuleNotFoundError as e:
                if e.name != f"zili.commands.{module}":
                    raise
                cmd.set_defaults(unavailable=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "unavailable", None):
        print(f"error: `zili {args.unavailable}` is not available in this build", file=sys.stderr)
        return 2
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ZiliError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`zili eval perplexity [MODEL] --text FILE [--compare OTHER]`: sliding-window perplexity,
optionally side by side with a second model (e.g. the original next to its quantized copy)."""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from zili.commands.common import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    ppl = tasks.add_parser("perplexity", help="perplexity of a text under the model",
                           description="perplexity of a text under the model (sliding window)")
    add_model_arguments(ppl)
    ppl.add_argument("--text", type=Path, default=None,
                     help="UTF-8 text file (default: the demo model's held-out text)")
    ppl.add_argument("--compare", type=Path, default=None, metavar="OTHER_MODEL",
                     help="a second model evaluated on the same text, printed alongside")
    ppl.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context)")
    ppl.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window/2)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the text")
    ppl.set_defaults(run=run_perplexity)


def _evaluate(path: Path, text: str, args: argparse.Namespace):
    from zili.eval.perplexity import perplexity
    from zili.models.loader import load_model
    from zili.models.tokenizer import Tokenizer

    model, config = load_model(path, device=args.device, dtype=args.dtype)
    ids = Tokenizer.from_folder(path).encode(text)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    window = min(args.window or config.max_position_embeddings, config.max_position_embeddings, len(ids))
    result = perplexity(model, ids, window, args.stride, progress=True, kv_cache_dtype=args.kv_cache_dtype)
    del model
    gc.collect()
    return result


def run_perplexity(args: argparse.Namespace) -> int:
    from zili.errors import InvalidRequestError
    from zili.llm import default_model_path

    model = Path(args.model) if args.model else default_model_path()
    text_path = args.text or default_model_path() / "heldout.txt"
    if not text_path.is_file():
        raise InvalidRequestError(f"text file not found: {text_path}", param="text")
    text = text_path.read_text(encoding="utf-8")
    rows = [(str(model), _evaluate(model, text, args))]
    if args.compare:
        rows.append((str(args.compare), _evaluate(args.compare, text, args)))
    width = max(len("model"), *(len(name) for name, _ in rows))
    if args.kv_cache_dtype != "auto":
        print(f"KV cache: {args.kv_cache_dtype} (k / v rounded as the engine's {args.kv_cache_dtype} cache stores them)")
    print(f"{'model':<{width}}  {'perplexity':>10}  {'tokens':>8}  {'window':>6}  {'stride':>6}  {'time':>8}")
    for name, r in rows:
        print(f"{name:<{width}}  {r.perplexity:>10.4f}  {r.tokens:>8}  {r.window:>6}  {r.stride:>6}  {r.seconds:>7.1f}s")
    if len(rows) == 2:
        (name_a, a), (name_b, b) = rows
        print(f"{name_a} vs {name_b}: {100 * (a.perplexity / b.perplexity - 1):+.2f}% perplexity")
    return 0

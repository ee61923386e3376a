"""`zili train --corpus FILE [--preset tiny|small] -o OUT`: a BPE tokenizer and a small Llama
model trained from scratch, saved as a Hugging Face folder that zili and transformers load.

Data parallel: `torchrun --nproc-per-node 2 -m zili.cli train ...` (gloo on CPUs).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from zili.errors import InvalidRequestError

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")


def parse_duration(value: str) -> float:
    """'90', '90s', '25m', '1.5h' -> seconds."""
    match = DURATION.match(value)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {value!r}; use e.g. 90s, 25m or 1.5h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from zili.train.presets import PRESETS

    parser.add_argument("--corpus", required=True, type=Path, help="UTF-8 training text")
    parser.add_argument("-o", "--output", required=True, type=Path, help="folder for the trained model")
    parser.add_argument("--preset", default="small",
                        help=f"model shape and hyper-parameters: {', '.join(PRESETS)} (default: small)")
    parser.add_argument("--val-file", type=Path, help="validation text (default: the last 2%% of the corpus)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in the output folder")
    parser.add_argument("--time-budget", type=parse_duration, metavar="DURATION",
                        help="fit the run into this wall-clock time (e.g. 25m); sets the step count")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (overrides the preset)")
    parser.add_argument("--batch-size", type=int, help="sequences per micro-batch and process")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, help="steps of linear warmup before the cosine decay")
    parser.add_argument("--context-length", type=int, help="training sequence length")
    parser.add_argument("--vocab-size", type=int, help="BPE vocabulary size")
    parser.add_argument("--eval-interval", type=int, help="steps between validation passes")
    parser.add_argument("--checkpoint-interval", type=int, help="steps between checkpoints")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="bf16 autocast (auto: where the CPU computes bf16 natively) or fp32")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    parser.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                        help="dtype of the saved weights")
    parser.add_argument("--data-card", type=Path, help="markdown about the data, pasted into the model card")
    parser.add_argument("--sample-prompt", action="append", default=None, dest="sample_prompts",
                        help="prompt for the model card's samples (repeatable)")
    parser.add_argument("--keep-checkpoint", action="store_true", help="keep OUT/checkpoint after a finished run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def options_from_args(args: argparse.Namespace, argv: list[str] | None = None):
    from zili.train.presets import get_preset
    from zili.train.trainer import TrainOptions

    config = get_preset(args.preset).with_overrides(
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        warmup_steps=args.warmup_steps,
        context_length=args.context_length, vocab_size=args.vocab_size, eval_interval=args.eval_interval,
        checkpoint_interval=args.checkpoint_interval, seed=args.seed)
    if args.resume and args.overwrite:
        raise InvalidRequestError("--resume and --overwrite exclude each other", param="resume")
    if args.data_card is not None and not args.data_card.is_file():
        raise InvalidRequestError(f"data card not found: {args.data_card}", param="data_card")
    options = TrainOptions(
        corpus=args.corpus, output=args.output, config=config, val_file=args.val_file, resume=args.resume,
        overwrite=args.overwrite, time_budget_s=args.time_budget, precision=args.precision, device=args.device,
        save_dtype=args.save_dtype, data_card=args.data_card, keep_checkpoint=args.keep_checkpoint,
        progress=not args.no_progress,
        command=shlex.join(["zili", *(sys.argv[1:] if argv is None else argv)]))
    if args.sample_prompts:
        options.sample_prompts = tuple(args.sample_prompts)
    return options


def run(args: argparse.Namespace) -> int:
    from zili.train.trainer import train

    result = train(options_from_args(args))
    if not result.finished:
        return 130
    ppl = result.report["validation"]["perplexity"] if result.report else None
    if ppl is not None:
        print(f"saved {result.output} after {result.step} steps; held-out perplexity {ppl:.2f}")
    return 0

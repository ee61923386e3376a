"""Arguments shared by the subcommands that load a model."""

from __future__ import annotations

import argparse

from zili.config import KV_CACHE_DTYPES, MAX_NUM_SCHEDULER_STEPS
from zili.devices import DTYPES


def add_model_arguments(parser: argparse.ArgumentParser, optional_model: bool = True) -> None:
    parser.add_argument("model", nargs="?" if optional_model else None, default=None,
                        help="model folder (Hugging Face layout); default: the bundled demo model")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, xpu, ... (default: best available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                        help="compute dtype (default: bf16 where the device supports it, else fp32)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                        help="KV cache storage: auto (the compute dtype) or int8 (per-token scales, ~2x the "
                             "tokens per byte of bf16)")


def _scheduler_steps(text: str) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else 0
    if not 1 <= value <= MAX_NUM_SCHEDULER_STEPS:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, {MAX_NUM_SCHEDULER_STEPS}], not {text!r}")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-scheduler-steps", type=_scheduler_steps, default=1,
                        help=f"greedy decode steps per engine step, 1-{MAX_NUM_SCHEDULER_STEPS} (tokens then arrive "
                             "in groups; default 1)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=None, help="0 for greedy (default: model's)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_overrides(args: argparse.Namespace) -> dict:
    values = {"max_tokens": args.max_tokens, "seed": args.seed, "stop": args.stop}
    for name in ("temperature", "top_p", "top_k"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return values


def load_llm(args: argparse.Namespace):
    from zili.llm import LLM

    return LLM(args.model, device=args.device, dtype=args.dtype, progress=True, kv_cache_dtype=args.kv_cache_dtype,
               num_scheduler_steps=args.num_scheduler_steps)

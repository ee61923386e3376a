"""Offline throughput of zili's serving engine against transformers' generate, in the same run.

The PERFORMANCE.md workload (random Llama: hidden 896, intermediate 4864, 24 layers, 14 heads,
2 KV heads, vocab 32000, tied, bf16; made by benchmarks/make_checkpoint.py under benchmarks/work/).
For each concurrency c: c requests of the same PROMPT_TOKENS-token prompt, NEW_TOKENS greedy new
tokens each with EOS ignored, submitted together; throughput = c * NEW_TOKENS / wall time
(prefill included). transformers runs the same batch as one static `generate` call.

    nice python benchmarks/engine_throughput.py [--concurrency 1 4 16 64] [--new-tokens 128]

Prints a markdown table (and one JSON line with the raw numbers on stdout's last line).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from make_checkpoint import DEFAULT_OUT, make_checkpoint  # noqa: E402

from zili.engine.llm_engine import LLMEngine  # noqa: E402
from zili.sampling_params import SamplingParams  # noqa: E402

PROMPT_TOKENS = 32


def prompt_ids(vocab: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(PROMPT_TOKENS)]


def run_zili(engine: LLMEngine, prompt: list[int], concurrency: int, new_tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    for _ in range(concurrency):
        engine.add_request(None, prompt, params)
    steps, generated = 0, 0
    while engine.has_unfinished_requests():
        generated += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.finished)
        steps += 1
    elapsed = time.perf_counter() - start
    assert generated == concurrency * new_tokens, generated
    return {"seconds": elapsed, "tok_s": generated / elapsed, "steps": steps}


@torch.inference_mode()
def run_transformers(model, prompt: list[int], concurrency: int, new_tokens: int) -> dict:
    input_ids = torch.tensor([prompt] * concurrency)
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start
    generated = (out.shape[1] - input_ids.shape[1]) * concurrency
    assert generated == concurrency * new_tokens, generated
    return {"seconds": elapsed, "tok_s": generated / elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--kv-cache-memory", default="1GiB")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = make_checkpoint(args.model)

    from transformers import AutoModelForCausalLM  # benchmark-only peer

    engine = LLMEngine.from_folder(folder, device="cpu", dtype="bfloat16", kv_cache_memory=args.kv_cache_memory,
                                   max_num_seqs=max(args.concurrency), enable_prefix_caching=False)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    prompt = prompt_ids(engine.model_config.vocab_size)
    run_zili(engine, prompt, 1, 4)  # warm-up: first calls into oneDNN are slow
    run_transformers(reference, prompt, 1, 4)
    rows = []
    for concurrency in args.concurrency:
        zili = run_zili(engine, prompt, concurrency, args.new_tokens)
        peer = run_transformers(reference, prompt, concurrency, args.new_tokens)
        rows.append({"concurrency": concurrency, "zili": zili, "transformers": peer})
        print(f"[engine_throughput] c={concurrency}: zili {zili['tok_s']:.1f} tok/s, "
              f"transformers {peer['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    print(f"\n{args.new_tokens} new tokens per request after a {PROMPT_TOKENS}-token prompt, greedy, bf16, "
          f"{torch.get_num_threads()} threads\n")
    print("| concurrent requests | zili engine tok/s | transformers generate tok/s | zili / transformers |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        z, t = row["zili"]["tok_s"], row["transformers"]["tok_s"]
        print(f"| {row['concurrency']} | {z:.1f} | {t:.1f} | {z / t:.2f}x |")
    print(json.dumps({"new_tokens": args.new_tokens, "prompt_tokens": PROMPT_TOKENS, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

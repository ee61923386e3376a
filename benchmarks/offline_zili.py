"""zili through its offline API (`zili.llm.LLM` and its engine): prefill, batch-1 decode, batch of 16.

Runs as a child of benchmarks/run.py and prints one JSON object. The same methodology as
offline_transformers.py, from per-token timestamps of the engine's step loop: prefill = prompt
tokens / time to the first new token; decode = 128 / (time of new token 129 - time of new token
1) after a short prompt (the steps llama-bench's tg128 times); batch = 16 x 128 new tokens /
wall time of one `LLM.generate` over 16 prompts. EOS is ignored.
The precision is the checkpoint's: a folder from `zili quantize` loads as int8 / int4.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from common import emit, median, peak_rss_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--precision", default="bf16", help="label only; the checkpoint decides")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16, help="short prompt before decode")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--figures", default="prefill,decode,batch")
    args = parser.parse_args(argv)
    figures = set(args.figures.split(","))

    import zili
    from zili.llm import LLM
    from zili.sampling_params import SamplingParams

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    llm = LLM(args.model, dtype="bfloat16", max_model_len=args.prefill_tokens + args.decode_tokens + 64)
    load_s = time.perf_counter() - start
    rng = random.Random(0)
    vocab = llm.config.vocab_size

    def random_ids(length: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(length)]

    def token_times(prompt: list[int], new_tokens: int) -> list[float]:
        """Seconds from submission to each new token of one request, from the engine's step loop."""
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        engine, times = llm.engine, []
        begin = time.perf_counter()
        request_id = engine.add_request(None, prompt, params).request_id
        while len(times) < new_tokens:
            for output in engine.step():
                if output.request_id == request_id:
                    times += [time.perf_counter() - begin] * (len(output.outputs[0].token_ids) - len(times))
        return times

    def timed_generate(prompts: list[list[int]], new_tokens: int) -> float:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        begin = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - begin
        lengths = {len(o.outputs[0].token_ids) for o in outputs}
        assert lengths == {new_tokens}, f"expected {new_tokens} new tokens, got {lengths}"
        return elapsed

    result: dict = {"engine": "zili", "precision": args.precision, "threads": args.threads,
                    "zili_version": getattr(zili, "__version__", "?"), "load_s": load_s}
    token_times(random_ids(8), 4)  # warm-up (and any compilation)
    if "prefill" in figures:  # time to the first token of a long prompt
        samples = [args.prefill_tokens / token_times(random_ids(args.prefill_tokens), 1)[0]
                   for _ in range(args.reps)]
        result["prefill_tok_s"] = median(samples)
        result["prefill_samples"] = samples
    if "decode" in figures:  # the steps after the first token: 1 + N new tokens give N decode steps
        samples = []
        for _ in range(args.reps):
            times = token_times(random_ids(args.prompt_tokens), 1 + args.decode_tokens)
            samples.append(args.decode_tokens / (times[-1] - times[0]))
        result["decode_tok_s"] = median(samples)
        result["decode_samples"] = samples
    if "batch" in figures:
        samples = []
        for _ in range(args.reps):
            prompts = [random_ids(args.prompt_tokens) for _ in range(args.batch)]
            samples.append(args.batch * args.decode_tokens / timed_generate(prompts, args.decode_tokens))
        result["batch_tok_s"] = median(samples)
        result["batch_samples"] = samples
        result["batch"] = args.batch
    result["peak_rss_bytes"] = peak_rss_bytes()
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

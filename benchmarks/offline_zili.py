"""zili through its offline API (`zili.llm.LLM` and its engine): prefill, batch-1 decode, batch of 16.

Runs as a child of benchmarks/run.py and prints one JSON object. The same methodology as
offline_transformers.py, from per-token timestamps of the engine's step loop: prefill = prompt
tokens / time to the first new token; decode = 128 / (time of new token 129 - time of new token
1) after a short prompt (the steps llama-bench's tg128 times); batch = 16 x 128 new tokens /
wall time of one `LLM.generate` over 16 prompts. EOS is ignored. With --grouped-steps N (default 8), the
decode and batch figures are measured again on a fresh LLM with num_scheduler_steps=N (opt-in multi-step
greedy decoding): tokens then come in groups, so decode = tokens after the first group / time from the
first group's end to the last token.
The precision is the checkpoint's: a folder from `zili quantize` loads as int8 / int4.
"""
from __future__ import annotations

import gc
import random
import sys
import time

import zili  # first, as in a script that starts `from zili import LLM`: zili sets OpenMP's spin before torch loads it
import torch

from common import emit, offline_figures, offline_parser


def main(argv: list[str] | None = None) -> int:
    parser = offline_parser(__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", help="label only; the checkpoint decides")
    parser.add_argument("--grouped-steps", type=int, default=8,
                        help="also measure decode / batch with num_scheduler_steps=N (0: skip)")
    args = parser.parse_args(argv)

    from zili.llm import LLM
    from zili.sampling_params import SamplingParams

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    max_model_len = args.prefill_tokens + args.decode_tokens + 64
    llm = LLM(args.model, device=args.device, dtype="bfloat16", max_model_len=max_model_len)
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

    result: dict = {"engine": "zili", "precision": args.precision, "threads": args.threads, "device": args.device,
                    "zili_version": getattr(zili, "__version__", "?"), "load_s": load_s}
    offline_figures(args, result, random_ids, lambda batch, length: [random_ids(length) for _ in range(batch)],
                    token_times, timed_generate)
    figures = set(args.figures.split(","))
    if args.grouped_steps > 1 and figures & {"decode", "batch"}:  # peak RSS above is the default engine's
        del llm
        gc.collect()
        llm = LLM(args.model, device=args.device, dtype="bfloat16", max_model_len=max_model_len,
                  num_scheduler_steps=args.grouped_steps)
        token_times(random_ids(8), 4)  # warm-up
        result["grouped_steps"] = args.grouped_steps
        if "decode" in figures:
            samples = []
            for _ in range(args.reps):
                times = token_times(random_ids(args.prompt_tokens), 1 + args.decode_tokens)
                later = [t for t in times if t > times[1]]  # the tokens after the first group
                samples.append(len(later) / (times[-1] - times[1]))
            result["grouped_decode_samples"] = samples
        if "batch" in figures:
            result["grouped_batch_samples"] = [
                args.batch * args.decode_tokens / timed_generate([random_ids(args.prompt_tokens) for _ in range(args.batch)],
                                                                 args.decode_tokens) for _ in range(args.reps)]
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

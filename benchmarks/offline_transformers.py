"""The transformers peer (bf16, eager PyTorch): prefill, batch-1 decode, static batch of 16.

Runs as a child of benchmarks/run.py and prints one JSON object. Methodology matches
offline_zili.py, from per-token timestamps (a streamer): prefill = prompt tokens / time to the
first new token; decode = 128 / (time of new token 129 - time of new token 1) after a short
prompt; batch-16 = 16 x 128 new tokens / wall time of one `generate`. Generation length is
fixed (EOS ignored via min_new_tokens).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from common import emit, median, peak_rss_bytes


class TokenClock:
    """A `generate` streamer: put() gets the prompt first, then each new token; keeps their times."""

    def __init__(self):
        self.begin = time.perf_counter()
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter() - self.begin)

    def end(self) -> None:
        pass


def timed_generate(model, input_ids: torch.Tensor, new_tokens: int, streamer: TokenClock | None = None) -> float:
    attention_mask = torch.ones_like(input_ids)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=streamer)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == input_ids.shape[1] + new_tokens, out.shape
    return elapsed


def token_times(model, input_ids: torch.Tensor, new_tokens: int) -> list[float]:
    """Seconds from the call to each new token (batch 1)."""
    clock = TokenClock()
    timed_generate(model, input_ids, new_tokens, clock)
    return clock.times[1:]  # the first put() is the prompt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16, help="short prompt before decode")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--figures", default="prefill,decode,batch")
    args = parser.parse_args(argv)
    figures = set(args.figures.split(","))

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def random_ids(batch: int, length: int) -> torch.Tensor:
        return torch.randint(3, vocab, (batch, length), generator=generator)

    result: dict = {"engine": "transformers", "precision": "bf16", "threads": args.threads}
    timed_generate(model, random_ids(1, 8), 4)  # warm-up
    if "prefill" in figures:  # time to the first token of a long prompt
        samples = [args.prefill_tokens / token_times(model, random_ids(1, args.prefill_tokens), 1)[0]
                   for _ in range(args.reps)]
        result["prefill_tok_s"] = median(samples)
        result["prefill_samples"] = samples
    if "decode" in figures:  # the steps after the first token: 1 + N new tokens give N decode steps
        samples = []
        for _ in range(args.reps):
            times = token_times(model, random_ids(1, args.prompt_tokens), 1 + args.decode_tokens)
            samples.append(args.decode_tokens / (times[-1] - times[0]))
        result["decode_tok_s"] = median(samples)
        result["decode_samples"] = samples
    if "batch" in figures:
        samples = []
        for _ in range(args.reps):
            prompts = random_ids(args.batch, args.prompt_tokens)
            samples.append(args.batch * args.decode_tokens / timed_generate(model, prompts, args.decode_tokens))
        result["batch_tok_s"] = median(samples)
        result["batch_samples"] = samples
        result["batch"] = args.batch
    result["peak_rss_bytes"] = peak_rss_bytes()
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

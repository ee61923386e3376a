"""The transformers peer (bf16, eager PyTorch): prefill, batch-1 decode, static batch of 16.

Runs as a child of benchmarks/run.py and prints one JSON object. Methodology matches
offline_zili.py, from per-token timestamps (a streamer): prefill = prompt tokens / time to the
first new token; decode = 128 / (time of new token 129 - time of new token 1) after a short
prompt; batch-16 = 16 x 128 new tokens / wall time of one `generate`. Generation length is
fixed (EOS ignored via min_new_tokens).
"""
from __future__ import annotations

import sys
import time

import torch

from common import emit, offline_figures, offline_parser


class TokenClock:
    """A `generate` streamer: put() gets the prompt first, then each new token; keeps their times."""

    def __init__(self):
        self.begin = time.perf_counter()
        self.times: list[float] = []

    def put(self, value) -> None:
        if value.device.type == "cuda":  # the token exists once its kernels have run
            torch.cuda.synchronize(value.device)
        self.times.append(time.perf_counter() - self.begin)

    def end(self) -> None:
        pass


def timed_generate(model, input_ids: torch.Tensor, new_tokens: int, streamer: TokenClock | None = None) -> float:
    attention_mask = torch.ones_like(input_ids)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=streamer)
    if out.device.type == "cuda":
        torch.cuda.synchronize(out.device)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == input_ids.shape[1] + new_tokens, out.shape
    return elapsed


def token_times(model, input_ids: torch.Tensor, new_tokens: int) -> list[float]:
    """Seconds from the call to each new token (batch 1)."""
    clock = TokenClock()
    timed_generate(model, input_ids, new_tokens, clock)
    return clock.times[1:]  # the first put() is the prompt


def main(argv: list[str] | None = None) -> int:
    args = offline_parser(__doc__.splitlines()[0]).parse_args(argv)

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(args.device).eval()
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def random_ids(batch: int, length: int) -> torch.Tensor:
        return torch.randint(3, vocab, (batch, length), generator=generator).to(args.device)

    result: dict = {"engine": "transformers", "precision": "bf16", "threads": args.threads, "device": args.device}
    offline_figures(args, result, lambda length: random_ids(1, length), random_ids,
                    lambda input_ids, new_tokens: token_times(model, input_ids, new_tokens),
                    lambda input_ids, new_tokens: timed_generate(model, input_ids, new_tokens))
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

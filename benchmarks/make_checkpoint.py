"""Create the benchmark checkpoint of docs PERFORMANCE.md: random weights, fixed seed.

Llama, hidden 896, intermediate 4864, 24 layers, 14 heads, 2 KV heads, vocab 32000, tied
embeddings (~387M parameters, ~774 MB in bf16). Random weights are fine for speed; generation
length is fixed by the harness (ignore EOS).

The tokenizer is a SentencePiece BPE model (32000 pieces, byte fallback) trained on a synthetic
corpus drawn from the same seed, so nothing is downloaded: llama.cpp's convert_hf_to_gguf.py
converts a SentencePiece `tokenizer.model` without a known-tokenizer hash, and zili reads the
`tokenizer.json` that transformers derives from it.

    python benchmarks/make_checkpoint.py [--out benchmarks/work/model] [--force]

Needs `transformers` and `sentencepiece` (benchmark-only; benchmarks/setup_peers.py installs them).
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "work" / "model"
SEED = 0
SHAPE = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=32000,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)
# A chat template so `zili chat` / chat endpoints work on the benchmark model too.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def synthetic_corpus(rng: random.Random, num_lines: int = 40000) -> list[str]:
    """Sentences of made-up words with Zipf-like frequencies: enough distinct text for 32k BPE merges."""
    consonants = "b c d f g h j k l m n p r s t v w z ch sh th st tr pl br gr".split()
    vowels = "a e i o u ai ea ou io y".split()
    syllables = [c + v for c in consonants for v in vowels] + vowels
    words = ["".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
             for _ in range(60000)]
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
    lines = []
    for _ in range(num_lines):
        sentence = " ".join(rng.choices(words, cum_weights=cumulative, k=rng.randint(6, 20)))
        number = f" {rng.randint(0, 9999)}" if rng.random() < 0.2 else ""
        lines.append(sentence.capitalize() + rng.choice(".,?!.") + number)
    return lines


def train_tokenizer(out: Path, vocab_size: int) -> None:
    """tokenizer.model (SentencePiece) -> tokenizer.json + tokenizer_config.json via transformers."""
    import sentencepiece as spm
    from transformers import LlamaTokenizerFast

    lines = synthetic_corpus(random.Random(SEED))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    tokenizer = LlamaTokenizerFast(vocab_file=str(out / "tokenizer.model"), legacy=False,
                                   add_bos_token=True, add_eos_token=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))


def create_model(out: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(**SHAPE, torch_dtype="bfloat16")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": SHAPE["bos_token_id"], "eos_token_id": SHAPE["eos_token_id"], "do_sample": False}))
    return sum(p.numel() for p in model.parameters())


def is_complete(out: Path) -> bool:
    return all((out / name).exists() for name in
               ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json"))


def make_checkpoint(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    if is_complete(out) and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out, SHAPE["vocab_size"])
    num_params = create_model(out)
    print(f"[make_checkpoint] {num_params / 1e6:.1f}M parameters written to {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="recreate even if present")
    args = parser.parse_args(argv)
    make_checkpoint(args.out, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())

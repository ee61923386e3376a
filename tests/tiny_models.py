"""Tiny tokenizers and random-weight checkpoints for tests, built offline in a fraction of a second.

`build_tokenizer(folder)` trains a byte-level BPE (the GPT-2 / Llama-3 / Qwen scheme) on a short
built-in text and writes `tokenizer.json` + `tokenizer_config.json` (special tokens and a chat
template) the way a Hugging Face model folder holds them. `make_checkpoint(folder, arch, **config)`
builds a seeded random-weight `transformers` model of that architecture and saves it with
`save_pretrained` (safetensors), next to the tokenizer and a `generation_config.json`.
`load_reference(folder)` loads the same folder back with `transformers`, the oracle for zili;
`zili_logits` / `zili_greedy` and `reference_greedy` run one sequence through each side.

Import it from any test (`from tiny_models import make_checkpoint`; tests/ is on sys.path) or use
the fixtures in tests/conftest.py. `transformers` is imported lazily: only tests use it.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import torch

# Sentences the BPE is trained on. A little French and Chinese so that some merges join bytes of
# multi-byte characters, including merges that span two characters (useful for UTF-8 tests);
# no emoji, so an emoji always splits into several single-byte tokens.
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.
Once upon a time there was a little cat who lived in a small house by the river.
Every morning the cat walked to the market to buy fresh fish and warm bread.
Hello world! How are you today? I am fine, thank you. What is your name?
My name is Zili. I like to read books, write code and drink green tea.
Machines learn patterns from data; language models predict the next token.
A token is a piece of text, and a tokenizer turns text into tokens and back.
The weather is nice, the sky is blue and the birds are singing in the trees.
She said: "Let us go to the park", and they went there together after lunch.
Numbers like 1, 2, 3, 42 and 2024 appear in text too, as do dates and prices.
Le café est très bon, et le thé aussi. Où est la gare? Voilà, c'est ici.
你好，世界。我们今天学习中文。日本語も少し。中文很有意思，我们一起学习。
中文学习，中文学习，日本語。我们学习中文。你好你好你好。
"""

BOS_TOKEN = "<|begin|>"
EOS_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]
VOCAB_SIZE = 300

# A minimal template: system / user / assistant turns between BOS and EOS markers.
SIMPLE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# The tiny transformer every checkpoint starts from; `make_checkpoint(**overrides)` changes fields.
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


@functools.lru_cache(maxsize=None)
def _trained_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    # Llama-3 style: encode() prepends BOS; chat templates write it themselves.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, tok.token_to_id(BOS_TOKEN))])
    return tok.to_str()


def tokenizer_vocab_size() -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_tokenizer_json()).get_vocab_size(with_added_tokens=True)


def token_id(token: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_tokenizer_json()).token_to_id(token)


def build_tokenizer(folder: str | Path, chat_template: str | None = SIMPLE_CHAT_TEMPLATE,
                    template_file: bool = False) -> Path:
    """Write tokenizer.json and tokenizer_config.json into `folder`.

    chat_template: stored in tokenizer_config.json, or in chat_template.jinja if `template_file`;
    None writes no template.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(_trained_tokenizer_json())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None and template_file:
        (folder / "chat_template.jinja").write_text(chat_template)
    elif chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def _transformers_classes(arch: str):
    import transformers

    model_cls = getattr(transformers, arch)
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    return config_cls, model_cls


@torch.no_grad()
def _randomize(model: torch.nn.Module, std: float) -> None:
    """Visible random weights: norms around 1 and non-zero biases, so a skipped tensor changes logits."""
    for name, param in model.named_parameters():
        if "norm" in name:
            param.normal_(1.0, 0.2)
        else:
            param.normal_(0.0, std)


def make_checkpoint(folder: str | Path, arch: str = "LlamaForCausalLM", *, dtype: torch.dtype = torch.float32,
                    seed: int = 0, max_shard_size: str | int | None = None, weight_std: float = 0.2,
                    chat_template: str | None = SIMPLE_CHAT_TEMPLATE, **config_overrides: Any) -> Path:
    """Save a seeded random-weight `arch` model (tiny by default) with its tokenizer into `folder`.

    config_overrides change TINY_CONFIG fields or add any config.json field (rope_scaling,
    head_dim, attention_bias, sliding_window, ...). max_shard_size (e.g. "40KB") writes a
    sharded checkpoint with model.safetensors.index.json. dtype is the stored weight dtype.
    Returns `folder`.
    """
    folder = Path(folder)
    build_tokenizer(folder, chat_template=chat_template)
    config_cls, model_cls = _transformers_classes(arch)
    values = {**TINY_CONFIG, "vocab_size": tokenizer_vocab_size(), "bos_token_id": token_id(BOS_TOKEN),
              "eos_token_id": token_id(EOS_TOKEN), "pad_token_id": token_id(PAD_TOKEN), **config_overrides}
    config = config_cls(**values)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _randomize(model, weight_std)
    model = model.to(dtype)
    model.generation_config.eos_token_id = [token_id(EOS_TOKEN), token_id(IM_END)]
    model.generation_config.bos_token_id = token_id(BOS_TOKEN)
    model.generation_config.pad_token_id = token_id(PAD_TOKEN)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kwargs)
    return folder


def load_reference(folder: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """The `transformers` model saved in `folder` (the oracle), in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                attn_implementation=attn_implementation).eval()


def copy_checkpoint(source: str | Path, target: str | Path) -> Path:
    """A writable copy of a checkpoint folder (to corrupt it in error tests)."""
    return Path(shutil.copytree(source, target))


# ---- running zili and the oracle on one sequence ----------------------------------------------

def zili_logits(model, token_ids: list[int]) -> torch.Tensor:
    """Logits (T, vocab) of one sequence in a single forward pass through a fresh dense cache."""
    from zili.layers.attention import DenseKVCache

    config = model.config
    dtype = model.model.embed_tokens.weight.dtype
    cache = DenseKVCache(config.num_hidden_layers, len(token_ids), config.num_key_value_heads,
                         config.head_dim, dtype, "cpu")
    with torch.inference_mode():
        hidden = model(torch.tensor(token_ids), torch.arange(len(token_ids)), cache)
        return model.compute_logits(hidden)


def zili_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """`num_tokens` greedy tokens of the reference loop, EOS ignored."""
    from zili.generation import generate_tokens
    from zili.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    return [step.token_id for step in generate_tokens(model, prompt, params, [], max_model_len=1024)]


def reference_greedy(reference, prompt: list[int], num_tokens: int) -> list[int]:
    """`num_tokens` greedy tokens of `transformers.generate`, EOS ignored."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():  # an explicit mask: without one, tokens equal to pad_token_id would be masked
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def random_tokens(vocab_size: int, length: int, seed: int) -> list[int]:
    """A seeded random token sequence."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def quantize_decoder_layers(model, bits: int, group_size: int = 64) -> None:
    """Every Linear of the decoder layers -> QuantLinear (RTN); the lm_head stays as it is."""
    from zili.compress.rtn import rtn_quantize
    from zili.compress.scheme import QuantScheme
    from zili.layers.linear import Linear
    from zili.layers.quantized import QuantLinear

    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                weight = rtn_quantize(child.weight.float(), QuantScheme(bits=bits, group_size=group_size))
                dtype = child.weight.dtype
                setattr(parent, name, QuantLinear.from_weight(weight, child.output_sizes, child.bias, dtype))

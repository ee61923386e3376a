"""Model shapes and training hyper-parameters, one typed config, named presets.

`tiny` trains in seconds (tests, smoke runs); `small` is the bundled demo model's shape, sized
so ~25 minutes on two CPU cores give recognisable English.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from zili.errors import InvalidRequestError
from zili.validation import require, require_each


@dataclass(frozen=True)
class TrainConfig:
    # model shape (Llama architecture, tied embeddings, GQA)
    vocab_size: int
    """BPE vocabulary size, special tokens included."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    context_length: int
    """Training sequence length; also the model's max_position_embeddings."""
    # optimisation
    batch_size: int
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches summed into one optimizer step."""
    max_steps: int = 1000
    """Optimizer steps; the cosine schedule ends here."""
    lr: float = 1e-3
    """Peak learning rate (AdamW), reached after `warmup_steps`."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio."""
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 100
    """Optimizer steps between validation passes."""
    checkpoint_interval: int = 200
    """Optimizer steps between checkpoints (one is also written at the end and on Ctrl-C)."""
    seed: int = 0

    def __post_init__(self):
        require_each(self, [f.name for f in fields(self) if f.type in ("int", "float")],
                     lambda value: not value < 0, "{name} must not be negative (got {value})")
        require_each(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "intermediate_size", "context_length", "batch_size",
                            "grad_accum", "max_steps", "eval_interval", "checkpoint_interval"),
                     lambda value: value >= 1, "{name} must be at least 1 (got {value})")
        require(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                "hidden_size must be a multiple of num_attention_heads")
        require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                "num_attention_heads must be a multiple of num_key_value_heads")
        require(self.vocab_size >= 256 + 3, "vocab_size",
                "vocab_size must cover the 256 byte tokens and 3 special tokens")
        require(self.context_length >= 2, "context_length", "context_length must be at least 2")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one process."""
        return self.batch_size * self.grad_accum * self.context_length

    def with_overrides(self, **overrides) -> "TrainConfig":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "tiny": TrainConfig(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=176, context_length=64, batch_size=8,
                        max_steps=200, lr=3e-3, warmup_steps=10, eval_interval=50, checkpoint_interval=100),
    "small": TrainConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=688, context_length=256, batch_size=16,
                         max_steps=3000, lr=2e-3, warmup_steps=30, eval_interval=50, checkpoint_interval=50),
}


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise InvalidRequestError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}", param="preset")
    return PRESETS[name]

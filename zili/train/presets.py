"""Model shapes and training hyper-parameters, one typed config, named presets.

`tiny` trains in seconds (tests, smoke runs); `small` is the bundled demo model's shape, sized
so ~25 minutes on two CPU cores give recognisable English.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from zili.errors import InvalidRequestError


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
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and value < 0:
                raise InvalidRequestError(f"{f.name} must not be negative (got {value})", param=f.name)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "context_length", "batch_size",
                     "grad_accum", "max_steps", "eval_interval", "checkpoint_interval"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be at least 1 (got {getattr(self, name)})", param=name)
        if self.hidden_size % self.num_attention_heads:
            raise InvalidRequestError("hidden_size must be a multiple of num_attention_heads", param="hidden_size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise InvalidRequestError("num_attention_heads must be a multiple of num_key_value_heads",
                                      param="num_key_value_heads")
        if self.vocab_size < 256 + 3:
            raise InvalidRequestError("vocab_size must cover the 256 byte tokens and 3 special tokens",
                                      param="vocab_size")
        if self.context_length < 2:
            raise InvalidRequestError("context_length must be at least 2", param="context_length")

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

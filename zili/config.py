"""Typed configuration, one dataclass per concern, validated on construction."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zili.errors import ModelLoadError


@dataclass
class ModelConfig:
    """The subset of a Hugging Face `config.json` the Llama family needs."""

    architecture: str
    """The `architectures[0]` name, used to pick the implementation."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    """Per-head size; explicit in Qwen3 / Mistral configs, else hidden_size // num_attention_heads."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Bias on q/k/v projections (Qwen2 always, Llama when `attention_bias` is set)."""
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    """Per-head RMSNorm of q and k before rotary embedding (Qwen3)."""
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_sliding_window: list[int | None] = field(default_factory=list)
    """Per-layer attention window (tokens, including the current one); None means full attention."""
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str | None = None
    quantization_config: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.hidden_size <= 0 or self.num_hidden_layers <= 0 or self.vocab_size <= 0:
            raise ModelLoadError("config.json: hidden_size, num_hidden_layers and vocab_size must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if not self.layer_sliding_window:
            self.layer_sliding_window = [None] * self.num_hidden_layers

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        if not archs:
            raise ModelLoadError("config.json has no 'architectures' entry")
        arch = archs[0]
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            layers = int(cfg["num_hidden_layers"])
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            vocab = int(cfg["vocab_size"])
            inter = int(cfg["intermediate_size"])
        except KeyError as e:
            raise ModelLoadError(f"config.json is missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"config.json has a malformed field: {e}") from None
        eos = cfg.get("eos_token_id")
        eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        is_qwen = arch.startswith("Qwen2")
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=cfg.get("rope_scaling"),
            partial_rotary_factor=float(cfg.get("partial_rotary_factor", 1.0)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=True if is_qwen else bool(cfg.get("attention_bias", False)),
            o_proj_bias=False if is_qwen else bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=arch.startswith("Qwen3"),
            hidden_act=cfg.get("hidden_act", "silu"),
            sliding_window=cfg.get("sliding_window"),
            layer_sliding_window=_layer_windows(cfg, arch, layers),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos_list,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            quantization_config=cfg.get("quantization_config"),
            raw=cfg,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        folder = Path(folder)
        if not folder.exists():
            raise ModelLoadError(f"model folder not found: {folder}")
        if not folder.is_dir():
            raise ModelLoadError(f"not a folder: {folder}")
        path = folder / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"no config.json in {folder}")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{path} must hold a JSON object")
        return cls.from_dict(cfg)


def _layer_windows(cfg: dict[str, Any], arch: str, num_layers: int) -> list[int | None]:
    """Which layers use sliding-window attention, following each family's config convention."""
    window = cfg.get("sliding_window")
    if not window:
        return [None] * num_layers
    layer_types = cfg.get("layer_types")
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if arch.startswith("Qwen"):
        if not cfg.get("use_sliding_window", False):
            return [None] * num_layers
        first = cfg.get("max_window_layers", num_layers)
        return [window if i >= first else None for i in range(num_layers)]
    if arch.startswith("Mistral"):
        return [int(window)] * num_layers
    return [None] * num_layers

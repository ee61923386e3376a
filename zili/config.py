"""Typed configuration, one dataclass per concern, validated on construction."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zili.errors import ModelLoadError, ZiliError


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


# ---------------------------------------------------------------------------------------------
# Serving engine configuration (zili/engine): one dataclass per concern, resolved once by the
# engine against the loaded model (`EngineConfig.from_options` routes flat keyword options).
# ---------------------------------------------------------------------------------------------

class ConfigError(ZiliError, ValueError):
    """An engine option is out of range or inconsistent with the model or the memory budget."""


_MEMORY_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
                 "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory_size(value: int | float | str) -> int:
    """Bytes from an int or a string like "4GiB", "512MB", "1.5 gib" (decimal and binary units)."""
    if isinstance(value, bool):
        raise ConfigError(f"not a memory size: {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _MEMORY_UNITS:
            raise ConfigError(f"not a memory size: {value!r} (use bytes or e.g. 512MiB, 4GiB, 2GB)")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _MEMORY_UNITS[unit])
    if size <= 0:
        raise ConfigError(f"memory size must be positive, got {value!r}")
    return size


KV_CACHE_DTYPES = ("auto", "int8")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class CacheConfig:
    """The paged KV cache: block geometry, memory budget and prefix caching."""

    block_size: int = 16
    """Tokens per KV block; the unit of allocation, sharing and prefix hashing."""
    kv_cache_memory: int | str | None = None
    """KV cache budget in bytes or as a string ("4GiB"); None uses `kv_cache_memory_fraction`."""
    kv_cache_memory_fraction: float = 0.25
    """Share of the device's free memory (measured after loading the model) given to the KV cache
    when `kv_cache_memory` is not set."""
    num_blocks: int | None = None
    """Exact number of KV blocks, overriding the memory budget (tests, reproducible tuning)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of identical prompt prefixes across requests (LRU-evicted when freed)."""
    kv_cache_dtype: str = "auto"
    """How K and V are stored: "auto" in the model's compute dtype; "int8" with one fp16 scale per
    (token, head) (zili/layers/kv_quant.py): a budget holds 2 * head_dim / (head_dim + 2) times the
    tokens of a 16-bit cache (1.94x at head_dim 64; twice that against fp32), at a small accuracy cost."""

    def __post_init__(self):
        _require(isinstance(self.block_size, int) and 1 <= self.block_size <= 1024,
                 f"block_size must be an integer in [1, 1024], got {self.block_size!r}")
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_memory_size(self.kv_cache_memory)
        _require(0 < self.kv_cache_memory_fraction <= 1,
                 f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction!r}")
        _require(self.num_blocks is None or (isinstance(self.num_blocks, int) and self.num_blocks >= 1),
                 f"num_blocks must be a positive integer, got {self.num_blocks!r}")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES,
                 f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")


MAX_NUM_SCHEDULER_STEPS = 64  # SchedulerConfig.num_scheduler_steps at most (the CLI checks it too)


@dataclass
class SchedulerConfig:
    """Continuous batching limits and chunked prefill."""

    max_num_seqs: int = 128
    """Most sequences (a request with n > 1 counts n) running at once."""
    max_num_batched_tokens: int | None = None
    """Token budget of one step (prefill chunks + decodes); None: 512 with chunked prefill, else
    max_model_len (a whole prompt must fit one step when prompts are not split)."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps and mix them with decodes."""
    max_model_len: int | None = None
    """Longest sequence (prompt + output) in tokens; None: the model's max_position_embeddings,
    lowered to what the KV cache can hold."""
    num_scheduler_steps: int = 1
    """Decode steps per engine step for batches of plain greedy decodes (vLLM's multi-step
    scheduling): the fused C++ step feeds each row's argmax back as its next input, so Python runs
    once per `num_scheduler_steps` tokens. A group ends early after a step in which a row produced a
    stop token. Streams then receive tokens in groups, and requests that arrive meanwhile wait up to
    that many steps to start. 1: every step returns to the engine."""

    def __post_init__(self):
        _require(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1,
                 f"max_num_seqs must be a positive integer, got {self.max_num_seqs!r}")
        _require(isinstance(self.num_scheduler_steps, int) and not isinstance(self.num_scheduler_steps, bool)
                 and 1 <= self.num_scheduler_steps <= MAX_NUM_SCHEDULER_STEPS,
                 f"num_scheduler_steps must be an integer in [1, {MAX_NUM_SCHEDULER_STEPS}], "
                 f"got {self.num_scheduler_steps!r}")
        for name in ("max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, int) and value >= 1),
                     f"{name} must be a positive integer, got {value!r}")
        if not self.enable_chunked_prefill and None not in (self.max_num_batched_tokens, self.max_model_len):
            _require(self.max_num_batched_tokens >= self.max_model_len,
                     f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                     f">= max_model_len ({self.max_model_len}) so any prompt fits one step")


@dataclass
class EngineConfig:
    """Everything the serving engine is configured with."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    """Paged KV cache options."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Batching options."""

    @classmethod
    def from_options(cls, **options: Any) -> "EngineConfig":
        """Route flat options (block_size=..., max_num_seqs=..., kv_cache_memory="4GiB") to their config."""
        groups: dict[type, dict[str, Any]] = {CacheConfig: {}, SchedulerConfig: {}}
        for name, value in options.items():
            owner = next((c for c in groups if name in c.__dataclass_fields__), None)
            if owner is None:
                known = sorted(f for c in groups for f in c.__dataclass_fields__)
                raise ConfigError(f"unknown engine option {name!r}; known: {', '.join(known)}")
            groups[owner][name] = value
        return cls(cache=CacheConfig(**groups[CacheConfig]), scheduler=SchedulerConfig(**groups[SchedulerConfig]))

"""Rotary position embeddings with the scaling schemes of Hugging Face configs.

Frequencies follow `transformers`' definitions so logits match it exactly:
default, linear, dynamic (NTK), llama3 and yarn. The half-split ("rotate_half") layout is used,
which is what Llama-family checkpoints are trained with.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from zili.config import ModelConfig
from zili.errors import ModelLoadError
from zili.kernels import cpu_ext

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (base ** exponents)


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(base: float, dim: int, scaling: dict, max_position: int) -> tuple[torch.Tensor, float]:
    factor = scaling["factor"]
    original_max = scaling.get("original_max_position_embeddings") or max_position

    def mscale_of(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim)
        else:
            attention_factor = mscale_of(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Maps positions to (cos, sin) tables and rotates q / k with them.

    cos / sin are computed in fp32 from a table built once (extended on demand) and cast to the
    activation dtype, as `transformers` does.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dim = config.rotary_dim
        self.base = config.rope_theta
        self.max_position = config.max_position_embeddings
        scaling = dict(config.rope_scaling or {})
        self.rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"rope_scaling type {self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        self.scaling = scaling
        self.attention_factor = 1.0
        inv_freq = _base_inv_freq(self.base, self.dim)
        if self.rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif self.rope_type == "llama3":
            inv_freq = _llama3(inv_freq, scaling)
        elif self.rope_type == "yarn":
            inv_freq, self.attention_factor = _yarn(self.base, self.dim, scaling, self.max_position)
        self.inv_freq = inv_freq  # (dim / 2,) fp32 on the CPU; not a buffer, so meta-device init keeps it
        self._cos_sin: torch.Tensor | None = None  # (positions, 2, dim) fp32, built lazily

    def _table(self, length: int, device: torch.device) -> torch.Tensor:
        table = self._cos_sin
        if table is None or table.shape[0] < length or table.device != device:
            length = max(2 * length, 4096)  # grow geometrically; long-context tables stay lazy
            positions = torch.arange(length, dtype=torch.float32, device=device)
            table = self._build(positions, self.inv_freq.to(device))
            self._cos_sin = table
        return table

    def _build(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        freqs = positions[:, None] * inv_freq[None, :]  # (T, dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return torch.stack((emb.cos(), emb.sin()), dim=1) * self.attention_factor  # (T, 2, dim)

    def _dynamic_inv_freq(self, seq_len: int, device: torch.device) -> torch.Tensor:
        factor = self.scaling["factor"]
        base = self.base * ((factor * seq_len / self.max_position) - (factor - 1)) ** (self.dim / (self.dim - 2))
        return _base_inv_freq(base, self.dim).to(device)

    def table(self, seq_len: int, device: torch.device) -> torch.Tensor | None:
        """The fp32 (positions, 2 [cos, sin], dim) table that cos_sin indexes for sequences of up to `seq_len`
        positions (it may hold more rows), or None where those positions' values depend on seq_len."""
        if self.rope_type == "dynamic" and seq_len > self.max_position:
            return None
        return self._table(seq_len, device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) int64 -> cos, sin: (T, dim) in `dtype`."""
        seq_len = int(positions.max()) + 1 if positions.numel() else 1
        table = self.table(seq_len, positions.device)
        if table is None:
            # NTK-aware scaling: the base grows with the longest sequence in this forward pass.
            table = self._build(positions.float(), self._dynamic_inv_freq(seq_len, positions.device))
        else:
            table = table[positions]
        return table[:, 0].to(dtype), table[:, 1].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, head_dim); cos / sin: (T, rotary_dim). Rotates the first rotary_dim channels.

    bf16 inference on the CPU runs zili's C++ row op (one pass instead of six PyTorch ops), which
    rounds where this expression does; the expression stays the fallback and the test oracle."""
    if x.dim() == 3 and cpu_ext.use_row_kernel(cos, sin, strided=(x,)):
        return cpu_ext.rotary(x, cos, sin)
    rotary_dim = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if rotary_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

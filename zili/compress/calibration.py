"""Calibration for GPTQ / AWQ: token windows from a text file, and a layer-by-layer runner.

The runner keeps only the hidden states entering the current decoder layer (one (T, hidden)
tensor per window), so activation memory stays at about one layer's worth whatever the depth:
  hidden = embed(windows); for each layer: capture its Linear inputs with hooks, let the method
  quantize the layer, then hidden = quantized_layer(hidden) for the next one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from zili.errors import InvalidRequestError
from zili.eval.full_sequence import FullSequenceAttention

MIN_CALIBRATION_TOKENS = 16


def read_calibration_text(path: str | Path, max_chars: int) -> str:
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"calibration file not found: {path}", param="calib")
    try:
        with path.open(encoding="utf-8") as f:
            text = f.read(max_chars)
    except UnicodeDecodeError:
        raise InvalidRequestError(f"calibration file {path} is not UTF-8 text", param="calib") from None
    if not text.strip():
        raise InvalidRequestError(f"calibration file {path} is empty", param="calib")
    return text


def calibration_windows(token_ids: list[int], window_tokens: int, max_windows: int,
                        seed: int = 0) -> list[torch.Tensor]:
    """Cut token ids into consecutive windows of `window_tokens`; keep at most `max_windows`,
    spread over the text (a seeded random choice). Shorter texts give one shorter window."""
    if len(token_ids) < MIN_CALIBRATION_TOKENS:
        raise InvalidRequestError(
            f"calibration text has {len(token_ids)} tokens; at least {MIN_CALIBRATION_TOKENS} are needed",
            param="calib")
    ids = torch.tensor(token_ids, dtype=torch.long)
    if len(ids) <= window_tokens:
        return [ids]
    windows = list(ids[: len(ids) // window_tokens * window_tokens].view(-1, window_tokens))
    if len(windows) > max_windows:
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(windows), generator=generator)[:max_windows].sort().values
        windows = [windows[i] for i in keep.tolist()]
    return windows


class LayerwiseRunner:
    """Drives a Llama-family model (model.model.{embed_tokens, layers, norm, rotary_emb}) one
    decoder layer at a time over fixed token windows."""

    def __init__(self, model: nn.Module, windows: list[torch.Tensor]):
        inner = model.model
        self.layers = inner.layers
        self.norm = inner.norm
        device = inner.embed_tokens.weight.device
        dtype = inner.embed_tokens.weight.dtype
        self.attn = FullSequenceAttention()
        self.rotary_emb, self.device, self.dtype = inner.rotary_emb, device, dtype
        with torch.no_grad():
            self.hidden = [inner.embed_tokens(w.to(device)) for w in windows]          # (T, hidden) each
            self.rotary = [self.rotary_for(len(w)) for w in windows]

    def rotary_for(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions 0..num_tokens-1, the positions of every window."""
        return self.rotary_emb.cos_sin(torch.arange(num_tokens, device=self.device), self.dtype)

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] for h in self.hidden)

    @torch.no_grad()
    def capture(self, layer: nn.Module, modules: dict[str, nn.Module],
                observe: Callable[[str, torch.Tensor], None]) -> None:
        """Run `layer` over every window; observe(name, input (T, in_features)) for each module."""
        hooks = [module.register_forward_pre_hook(lambda _m, args, name=name: observe(name, args[0]))
                 for name, module in modules.items()]
        try:
            for hidden, (cos, sin) in zip(self.hidden, self.rotary):
                layer(hidden, cos, sin, self.attn)
        finally:
            for hook in hooks:
                hook.remove()

    @torch.no_grad()
    def advance(self, layer: nn.Module) -> None:
        """Replace the stored hidden states with `layer`'s outputs (the next layer's inputs)."""
        self.hidden = [layer(h, cos, sin, self.attn) for h, (cos, sin) in zip(self.hidden, self.rotary)]

    @torch.no_grad()
    def final_hidden(self) -> list[torch.Tensor]:
        """The normalized hidden states after the last layer: lm_head's inputs."""
        return [self.norm(h) for h in self.hidden]

"""AWQ (Lin et al. 2023, arXiv:2306.00978): activation-aware weight quantization.

Weights that meet large activations matter most. For the Linear layers sharing one input x,
AWQ searches a per-input-channel scale s (mean|x|^alpha, alpha on a grid in [0, 1), and
AutoAWQ's variant that also divides by the weights' relative magnitude) minimizing the error of
the block they feed when W becomes Q(W diag(s)) diag(s)^-1, then folds 1/s into the op producing
x (an RMSNorm weight, or the rows of the previous Linear) so the float model is unchanged, and
W diag(s) is quantized with round-to-nearest. A second search clips each group's weight range
(shrinking max|w| by up to half) where that lowers the group's output error, as AutoAWQ does;
the clipping is kept only if it lowers the layer's output error on the calibration rows too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from zili.compress.rtn import fake_quantize
from zili.compress.scheme import QuantScheme
from zili.eval.full_sequence import FullSequenceAttention

CLIP_TOKENS = 512          # calibration rows used by the clipping search (AutoAWQ's n_sample_token)
CLIP_MAX_SHRINK = 0.5      # clip max|w| down to at most half
CLIP_ROWS_PER_CHUNK = 256  # output rows per step of the clipping search (bounds its memory)


@dataclass
class ScaleGroup:
    """Linear layers that read the same input, and how to divide that input by s upstream."""

    input_key: str
    """Name under which the layers' captured inputs are stored."""
    linears: list[nn.Module]
    fold_inverse: Callable[[torch.Tensor], None]
    """Divides the producer's output channels by s (so the layers' input becomes x / s)."""
    block: Callable[[torch.Tensor], torch.Tensor] | None = None
    """The output whose error the search minimizes, as a function of one window of the layers'
    input: the attention block for q/k/v, the MLP for gate/up (as AutoAWQ does: an error in q or
    k matters through the softmax, one in gate through the activation). None: the layers' outputs."""
    clip_rows: slice | None = None
    """Output rows whose weights may be clipped (None: all). q and k rows are never clipped: their
    outputs meet in a dot product that a per-group output error does not see (AutoAWQ skips them too)."""


def fold_into_norm(norm: nn.Module) -> Callable[[torch.Tensor], None]:
    def fold(scales: torch.Tensor) -> None:
        norm.weight.data = (norm.weight.data.float() / scales).to(norm.weight.dtype)
    return fold


def fold_into_rows(linear: nn.Module, rows: slice) -> Callable[[torch.Tensor], None]:
    """The producer is rows `rows` of a Linear (v of qkv_proj, up of gate_up_proj)."""
    def fold(scales: torch.Tensor) -> None:
        weight = linear.weight.data
        weight[rows] = (weight[rows].float() / scales[:, None]).to(weight.dtype)
        if linear.bias is not None:
            linear.bias.data[rows] = (linear.bias.data[rows].float() / scales).to(linear.bias.dtype)
    return fold


def decoder_layer_groups(layer: nn.Module, rotary: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
                         ) -> list[ScaleGroup]:
    """The scale groups of a Llama-family decoder layer; rotary(T) gives (cos, sin) for positions 0..T-1.

    o_proj is scaled through v_proj only when every query head has its own kv head; with grouped
    query attention one v channel feeds several o_proj inputs, so it is left unscaled (as AutoAWQ does).
    """
    attn, mlp = layer.self_attn, layer.mlp

    def attention_block(x: torch.Tensor) -> torch.Tensor:
        return attn(x, *rotary(x.shape[0]), FullSequenceAttention())

    groups = [ScaleGroup("self_attn.qkv_proj", [attn.qkv_proj], fold_into_norm(layer.input_layernorm),
                         attention_block, clip_rows=attn.qkv_proj.shard_slice(2))]
    if attn.num_heads == attn.num_kv_heads:
        groups.append(ScaleGroup("self_attn.o_proj", [attn.o_proj],
                                 fold_into_rows(attn.qkv_proj, attn.qkv_proj.shard_slice(2))))
    groups.append(ScaleGroup("mlp.gate_up_proj", [mlp.gate_up_proj], fold_into_norm(layer.post_attention_layernorm),
                             mlp))
    groups.append(ScaleGroup("mlp.down_proj", [mlp.down_proj],
                             fold_into_rows(mlp.gate_up_proj, mlp.gate_up_proj.shard_slice(1))))
    return groups


def _group_output(group: ScaleGroup, windows: list[torch.Tensor]) -> torch.Tensor:
    if group.block is not None:
        return torch.cat([group.block(x) for x in windows]).float()
    return torch.cat([torch.cat([lin(x) for lin in group.linears], dim=-1) for x in windows]).float()


def _weight_magnitude(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """(K,) mean over output rows of |w| relative to its quantization group's max (AutoAWQ's w_mean)."""
    w = torch.cat([weight.float() for weight in weights])
    n, k = w.shape
    grouped = w.abs().view(n, k // group_size, group_size)
    return (grouped / (grouped.amax(-1, keepdim=True) + 1e-6)).view(n, k).mean(0)


def candidate_scales(x_magnitude: torch.Tensor, w_magnitude: torch.Tensor, grid: int):
    """The searched scales: s = mean|x|^a (the paper's; a = 0 is plain RTN), then AutoAWQ's
    "duo" s = mean|x|^a / w_mean^(1-a), for a = 0, 1/grid, ... (grid - 1)/grid; each normalized
    so that max(s) * min(s) = 1."""
    for duo in (False, True):
        for step in range(grid):
            alpha = step / grid
            scales = x_magnitude.pow(alpha)
            if duo:
                scales = scales / (w_magnitude.pow(1 - alpha) + 1e-4)
            scales = scales.clamp(min=1e-4)
            yield scales / (scales.max() * scales.min()).sqrt()


@torch.no_grad()
def search_scales(windows: list[torch.Tensor], group: ScaleGroup, scheme: QuantScheme, grid: int,
                  scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """windows: the group's input, (T, K) per calibration window -> best scales s: (K,) fp32,
    the candidate minimizing the group's output error with each layer's weight replaced by
    Q(W diag(s)) diag(s)^-1."""
    originals = [lin.weight.data for lin in group.linears]
    x_magnitude = torch.cat(windows).float().abs().mean(0)
    w_magnitude = _weight_magnitude(originals, scheme.group_size_for(originals[0].shape[1]))
    reference = _group_output(group, windows)
    best_error, best_scales = float("inf"), torch.ones_like(x_magnitude)
    try:
        for scales in candidate_scales(x_magnitude, w_magnitude, grid):
            for lin, weight in zip(group.linears, originals):
                lin.weight.data = (fake_quantize(weight.float() * scales, scheme, scale_dtype) / scales).to(weight.dtype)
            error = (_group_output(group, windows) - reference).pow(2).mean().item()
            if error < best_error:
                best_error, best_scales = error, scales
    finally:
        for lin, weight in zip(group.linears, originals):
            lin.weight.data = weight
    return best_scales


@torch.no_grad()
def search_clip(x: torch.Tensor, weight: torch.Tensor, scheme: QuantScheme, grid: int,
                scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x: (n, K); weight: (N, K) -> weight with each group clipped to the range that minimizes
    that group's output error sum_k x_k w_k after quantization."""
    x = x[:CLIP_TOKENS].float()
    n_out, k = weight.shape
    group_size = scheme.group_size_for(k)
    x_groups = x.view(x.shape[0], k // group_size, group_size)                # (n, G, g)
    clipped = weight.float().clone()
    for start in range(0, n_out, CLIP_ROWS_PER_CHUNK):
        w = clipped[start:start + CLIP_ROWS_PER_CHUNK]
        w_groups = w.view(w.shape[0], -1, group_size)                        # (r, G, g)
        reference = torch.einsum("ngk,rgk->nrg", x_groups, w_groups)
        original_max = w_groups.abs().amax(-1, keepdim=True)                 # (r, G, 1)
        best_error = torch.full(original_max.shape[:2], float("inf"))
        best_max = original_max.clone()
        for step in range(int(CLIP_MAX_SHRINK * grid)):
            max_val = original_max * (1 - step / grid)
            candidate = torch.clamp(w_groups, -max_val, max_val).reshape(w.shape)
            quantized = fake_quantize(candidate, scheme, scale_dtype).view_as(w_groups)
            error = (torch.einsum("ngk,rgk->nrg", x_groups, quantized) - reference).pow(2).mean(0)   # (r, G)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_max = torch.where(better[..., None], max_val, best_max)
        clipped[start:start + CLIP_ROWS_PER_CHUNK] = torch.clamp(w_groups, -best_max, best_max).reshape(w.shape)
    return clipped


@torch.no_grad()
def apply_awq(groups: list[ScaleGroup], inputs: dict[str, list[torch.Tensor]], scheme: QuantScheme, grid: int,
              scale_dtype: torch.dtype = torch.float32, clip: bool = True) -> None:
    """Search and fold scales for each group, then clip each group's clippable weight rows in place.

    inputs: group input_key -> that input for each kept calibration window, (T, K) each.
    """
    for group in groups:
        windows = inputs[group.input_key]
        scales = search_scales(windows, group, scheme, grid, scale_dtype)
        group.fold_inverse(scales)
        for lin in group.linears:
            lin.weight.data = (lin.weight.data.float() * scales).to(lin.weight.dtype)
        inputs[group.input_key] = [(x.float() / scales).to(x.dtype) for x in windows]
    if not clip:
        return
    for group in groups:
        x = torch.cat(inputs[group.input_key]).float()
        for lin in group.linears:
            rows = group.clip_rows or slice(0, lin.weight.shape[0])
            weight = lin.weight.data
            original = weight[rows].float()
            clipped = search_clip(x, original, scheme, grid, scale_dtype)
            # each group's clip is chosen on its own partial sums; keep the result only if the whole
            # layer's output error drops too (with small groups it sometimes does not)
            reference = x @ original.t()
            errors = [(x @ fake_quantize(w, scheme, scale_dtype).t() - reference).pow(2).mean().item()
                      for w in (original, clipped)]
            if errors[1] < errors[0]:
                weight[rows] = clipped.to(weight.dtype)

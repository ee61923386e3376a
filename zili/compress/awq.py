"""AWQ (Lin et al. 2023, arXiv:2306.00978): activation-aware weight quantization.

Weights that meet large activations matter most. For the Linear layers sharing one input x,
AWQ searches a per-input-channel scale s = mean|x|^alpha (alpha on a grid in [0, 1)) that
minimizes ||Q(W diag(s)) (x / s) - W x||^2, then folds 1/s into the op producing x (an RMSNorm
weight, or the rows of the previous Linear) so the float model is unchanged, and W diag(s) is
quantized with round-to-nearest. A second search clips each group's weight range (shrinking
max|w| by up to half) where that lowers the group's output error, as AutoAWQ does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from zili.compress.rtn import fake_quantize
from zili.compress.scheme import QuantScheme

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


def decoder_layer_groups(layer: nn.Module) -> list[ScaleGroup]:
    """The scale groups of a Llama-family decoder layer.

    o_proj is scaled through v_proj only when every query head has its own kv head; with grouped
    query attention one v channel feeds several o_proj inputs, so it is left unscaled (as AutoAWQ does).
    """
    attn, mlp = layer.self_attn, layer.mlp
    groups = [ScaleGroup("self_attn.qkv_proj", [attn.qkv_proj], fold_into_norm(layer.input_layernorm))]
    if attn.num_heads == attn.num_kv_heads:
        groups.append(ScaleGroup("self_attn.o_proj", [attn.o_proj],
                                 fold_into_rows(attn.qkv_proj, attn.qkv_proj.shard_slice(2))))
    groups.append(ScaleGroup("mlp.gate_up_proj", [mlp.gate_up_proj], fold_into_norm(layer.post_attention_layernorm)))
    groups.append(ScaleGroup("mlp.down_proj", [mlp.down_proj],
                             fold_into_rows(mlp.gate_up_proj, mlp.gate_up_proj.shard_slice(1))))
    return groups


@torch.no_grad()
def search_scales(x: torch.Tensor, weight: torch.Tensor, scheme: QuantScheme, grid: int,
                  scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x: (n, K) inputs; weight: (N, K) -> the best per-input-channel scales s: (K,) fp32."""
    x, weight = x.float(), weight.float()
    reference = x @ weight.t()
    magnitude = x.abs().mean(0)
    best_error, best_scales = float("inf"), torch.ones_like(magnitude)
    for step in range(grid):
        alpha = step / grid
        scales = magnitude.pow(alpha).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        quantized = fake_quantize(weight * scales, scheme, scale_dtype) / scales
        error = (x @ quantized.t() - reference).pow(2).mean().item()
        if error < best_error:
            best_error, best_scales = error, scales
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
def apply_awq(groups: list[ScaleGroup], inputs: dict[str, torch.Tensor], scheme: QuantScheme, grid: int,
              scale_dtype: torch.dtype = torch.float32, clip_skip: tuple[str, ...] = ("self_attn.qkv_proj",)) -> None:
    """Search and fold scales for each group, then clip weights in place (except q/k, whose
    outputs meet in a dot product that per-layer output error does not capture; AutoAWQ skips them too)."""
    for group in groups:
        x = inputs[group.input_key]
        weight = torch.cat([lin.weight.data.float() for lin in group.linears])
        scales = search_scales(x, weight, scheme, grid, scale_dtype)
        group.fold_inverse(scales)
        for lin in group.linears:
            lin.weight.data = (lin.weight.data.float() * scales).to(lin.weight.dtype)
        inputs[group.input_key] = x / scales
    for group in groups:
        if group.input_key in clip_skip:
            continue
        for lin in group.linears:
            lin.weight.data = search_clip(inputs[group.input_key], lin.weight.data, scheme, grid,
                                          scale_dtype).to(lin.weight.dtype)

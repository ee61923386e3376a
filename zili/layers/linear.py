"""Linear layers with the loading contract every quantized variant also follows.

A fused layer (q/k/v -> qkv_proj, gate/up -> gate_up_proj) stacks several checkpoint tensors
along its output dimension. The loader hands each checkpoint tensor to `load_weight` with the
index of its shard; the layer copies it into place. Quantized layers (zili.compress) implement
the same `load_weight` / `forward` contract, so the model code never changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zili.errors import CheckpointFormatError
from zili.kernels.dense import dense_linear


class OutputShards:
    """The output-dimension bookkeeping `Linear` and `QuantLinear` share: the fused shards' sizes,
    the rows each shard occupies, and copying a checkpoint tensor into its shard."""

    output_sizes: list[int]
    out_features: int

    def _set_output_sizes(self, out_features: int | list[int]) -> None:
        self.output_sizes = list(out_features) if isinstance(out_features, (list, tuple)) else [out_features]
        self.out_features = sum(self.output_sizes)

    def shard_slice(self, shard: int | None) -> slice:
        if shard is None:
            return slice(0, self.out_features)
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def _copy_shard(self, name: str, param: torch.Tensor, tensor: torch.Tensor, shard: int | None) -> None:
        """Copy checkpoint tensor `name` into the rows of `param` that belong to `shard`."""
        target = param.data[self.shard_slice(shard)]
        if tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointFormatError(
                f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, model expects {tuple(target.shape)}")
        target.copy_(tensor)


class Linear(OutputShards, nn.Module):
    """y = x @ W.T + b with W: (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool = False):
        super().__init__()
        self._set_output_sizes(out_features)
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int | None = None) -> None:
        """Copy checkpoint tensor `name` ("weight" or "bias") into this layer's shard."""
        param = getattr(self, name, None)
        if not isinstance(param, torch.Tensor):
            raise CheckpointFormatError(f"unexpected tensor {name!r} for a dense linear layer")
        self._copy_shard(name, param, tensor, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = dense_linear(x, self.weight, self.bias)  # zili's CPU kernel for decode-sized bf16 inputs, else None
        return F.linear(x, self.weight, self.bias) if y is None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.output_sizes}, bias={self.bias is not None}"

"""A weight-only quantized Linear with the same interface as `zili.layers.linear.Linear`.

Loading contract (what the loader relies on):
- `load_weight(name, tensor, shard)` receives every checkpoint tensor of this layer (qweight,
  scales, weight_packed, bias ...), shard by shard for fused layers; they are staged as read.
- `missing_tensors()` names what the checkpoint did not provide.
- `finish_loading()` decodes the staged tensors with the checkpoint layout's decoder, stacks the
  shards and packs them once into the kernel chosen for the device; the staged tensors are freed.

The checkpoint layout (compressed-tensors, GPTQ, AWQ) is a `WeightDecoder` from zili.compress;
this module knows nothing about file formats.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from zili.errors import CheckpointFormatError
from zili.layers.linear import OutputShards
from zili.layers.quantized.kernels import select_kernel
from zili.layers.quantized.weight import QuantizedWeight, concat_rows


class WeightDecoder(Protocol):
    """Turns one shard's checkpoint tensors into a `QuantizedWeight`."""

    required_tensors: tuple[str, ...]
    optional_tensors: tuple[str, ...]

    def decode(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int) -> QuantizedWeight:
        ...


class QuantLinear(OutputShards, nn.Module):
    """y = x @ W.T + b with W stored quantized; W: (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool,
                 decoder: WeightDecoder | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", kernel: str | None = None):
        super().__init__()
        self._set_output_sizes(out_features)
        self.in_features = in_features
        self.decoder = decoder
        self.kernel_name = kernel
        self.target_device = torch.device(device)
        self.bias = (nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.kernel: nn.Module | None = None
        self._staged: dict[int | None, dict[str, torch.Tensor]] = {}
        self._bias_shards: set[int | None] = set()

    @classmethod
    def from_weight(cls, weight: QuantizedWeight, output_sizes: list[int], bias: torch.Tensor | None,
                    dtype: torch.dtype, kernel: str | None = None) -> "QuantLinear":
        """A ready layer from an in-memory quantized weight (what `zili quantize` produces)."""
        device = weight.codes.device
        layer = cls(weight.in_features, output_sizes, bias is not None, dtype=dtype, device=device, kernel=kernel)
        if bias is not None:
            layer.bias.data.copy_(bias)
        layer.kernel = select_kernel(weight, device, kernel)
        return layer

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int | None = None) -> None:
        if name == "bias" and self.bias is not None:
            self._copy_shard(name, self.bias, tensor, shard)
            self._bias_shards.add(shard)
            return
        if self.decoder is None or name not in (*self.decoder.required_tensors, *self.decoder.optional_tensors):
            expected = ", ".join(self.decoder.required_tensors) if self.decoder else "none"
            raise CheckpointFormatError(
                f"unexpected tensor {name!r} for a quantized linear layer (expected {expected})")
        self._staged.setdefault(shard, {})[name] = tensor

    def _expected_shards(self) -> list[int | None]:
        if None in self._staged or len(self.output_sizes) == 1:
            return [None]
        return list(range(len(self.output_sizes)))

    def missing_tensors(self) -> list[str]:
        """Checkpoint tensors still missing; empty once the layer is fully loaded or built."""
        if self.kernel is not None:
            return []
        shards = self._expected_shards()
        missing = [f"{name}" + (f" (shard {s})" if s is not None else "")
                   for s in shards for name in self.decoder.required_tensors if name not in self._staged.get(s, {})]
        if self.bias is not None and not (None in self._bias_shards or self._bias_shards.issuperset(shards)):
            missing.append("bias")
        return missing

    def finish_loading(self) -> None:
        """Decode, stack and pack the staged checkpoint tensors into the kernel layout."""
        if self.kernel is not None:
            return
        missing = self.missing_tensors()
        if missing:
            raise CheckpointFormatError(f"quantized layer is missing checkpoint tensors: {', '.join(missing)}")
        shards = self._expected_shards()
        sizes = [self.out_features] if shards == [None] else self.output_sizes
        parts = [self.decoder.decode(self._staged[s], size, self.in_features) for s, size in zip(shards, sizes)]
        weight = concat_rows(parts)
        device = self.bias.device if self.bias is not None else self.target_device
        self.kernel = select_kernel(weight, device, self.kernel_name)
        self._staged.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        kernel = getattr(self.kernel, "name", "unloaded")
        return f"in={self.in_features}, out={self.output_sizes}, bias={self.bias is not None}, kernel={kernel}"

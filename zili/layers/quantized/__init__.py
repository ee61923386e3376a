"""Weight-only quantized linear layers: canonical weight form, per-device kernels, the layer."""

from zili.layers.quantized.kernels import select_kernel
from zili.layers.quantized.linear import QuantLinear, WeightDecoder
from zili.layers.quantized.weight import QuantizedWeight

__all__ = ["QuantLinear", "QuantizedWeight", "WeightDecoder", "select_kernel"]

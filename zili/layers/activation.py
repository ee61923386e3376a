"""Activations by their Hugging Face config names, and the fused gated MLP activation."""

import torch
import torch.nn.functional as F

from zili.errors import ModelLoadError

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ModelLoadError(f"hidden_act {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def gated(act, gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: (T, 2 * I) with gate first -> act(gate) * up: (T, I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up

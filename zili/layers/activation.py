"""Activations by their Hugging Face config names, and the fused gated MLP activation."""

import torch
import torch.nn.functional as F
from torch import nn

from zili.errors import ModelLoadError
from zili.kernels import cpu_ext

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# zili/kernels/cpu/rows.h's activation codes, by config name
ACTIVATION_CODES = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu": 2, "relu": 3}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ModelLoadError(f"hidden_act {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def gated(act, gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: (T, 2 * I) with gate first -> act(gate) * up: (T, I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


class GatedActivation(nn.Module):
    """act(gate) * up for gate_up = [gate | up], `act` by config name. bf16 inference on the CPU runs
    zili's C++ row op (one pass instead of three PyTorch ops); `gated` is its fallback and oracle."""

    def __init__(self, name: str):
        super().__init__()
        self.act = get_activation(name)
        self.code = ACTIVATION_CODES[name]

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if cpu_ext.use_row_kernel(gate_up):
            return cpu_ext.gated_activation(gate_up, self.code)
        return gated(self.act, gate_up)

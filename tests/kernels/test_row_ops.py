"""The row ops (cpu/row_ops.cpp: RMSNorm, act(gate) * up) against fp64 references rounded where they round.

Oracle: the op computed in fp64 from the same bf16 values, rounded to bf16 at the places the
PyTorch expressions of zili.layers.norm / zili.layers.activation round (the normalized x, then its
product with the weight; act(gate), then its product with up). The kernels compute in fp32, so they
may land on the other side of a rounding boundary: at most one bf16 ulp (relative 2**-7) per
rounding, and rarely (>= 99% of the values are bitwise equal).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from zili.kernels import cpu_ext
from zili.layers.activation import ACTIVATION_CODES, ACTIVATIONS, GatedActivation
from zili.layers.norm import RMSNorm

ULP = 2.0**-7  # one bf16 ulp, relative


def assert_rounding_twins(got: torch.Tensor, expected: torch.Tensor, roundings: int) -> None:
    assert got.dtype == expected.dtype == torch.bfloat16 and got.shape == expected.shape
    g, e = got.double(), expected.double()
    # + 2**-30: GELU's far tail (~1e-15 for gate < -8), where fp32 exp / erfc lose relative precision
    assert ((g - e).abs() <= roundings * ULP * e.abs() + 2.0**-30).all(), f"max |difference| {(g - e).abs().max()}"
    assert (g == e)[e.abs() > 2.0**-30].double().mean() >= 0.99


def norm_case(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).bfloat16()
    norm = RMSNorm(shape[-1], eps=1e-5)
    norm.weight.data = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).bfloat16()
    return norm, x


def rms_norm_reference(x, weight, eps):
    x64 = x.double()
    normed = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).bfloat16()
    return (weight.double() * normed.double()).bfloat16()


EXACT_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
                     "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def gated_reference(name, gate_up):
    gate, up = gate_up.double().chunk(2, dim=-1)
    return (EXACT_ACTIVATIONS[name](gate).bfloat16().double() * up).bfloat16()


@pytest.mark.parametrize("shape", [(1, 896), (37, 100), (2, 3, 48), (600, 896)])
def test_rms_norm_matches_fp64(cpu_kernels, shape):
    norm, x = norm_case(shape)
    got = cpu_kernels.rms_norm(x, norm.weight, norm.eps)
    assert_rounding_twins(got, rms_norm_reference(x, norm.weight, norm.eps), roundings=2)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", [(1, 2 * 4864), (40, 2 * 4864), (5, 2 * 37), (2, 3, 2 * 16)])
def test_gated_activation_matches_fp64(cpu_kernels, name, shape):
    assert set(EXACT_ACTIVATIONS) == set(ACTIVATIONS)
    gate_up = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).bfloat16()
    got = cpu_kernels.gated_activation(gate_up, ACTIVATION_CODES[name])
    assert_rounding_twins(got, gated_reference(name, gate_up), roundings=2)


def count_calls(monkeypatch, name):
    calls = []
    op = getattr(cpu_ext, name)
    monkeypatch.setattr(cpu_ext, name, lambda *args: calls.append(args) or op(*args))
    return calls


def test_the_layers_take_the_ops_for_bf16_inference_only(cpu_kernels, monkeypatch):
    norm_calls, act_calls = count_calls(monkeypatch, "rms_norm"), count_calls(monkeypatch, "gated_activation")
    norm, x = norm_case((4, 64))
    act = GatedActivation("silu")
    with torch.inference_mode():
        norm(x), act(x)
    assert (len(norm_calls), len(act_calls)) == (1, 1)
    # fp32 values, a strided view, tensors autograd tracks: the PyTorch expressions
    with torch.inference_mode():
        copy.deepcopy(norm).float()(x.float()), act(x.float())
        strided = x[:, ::2]
        RMSNorm(32).bfloat16()(strided), act(strided)
    leaf = x.clone().requires_grad_()
    assert norm(leaf).grad_fn is not None and act(leaf).grad_fn is not None
    assert (len(norm_calls), len(act_calls)) == (1, 1)


def test_bad_inputs_get_clear_errors(cpu_kernels):
    x = torch.randn(3, 8).bfloat16()
    with pytest.raises(RuntimeError, match="weight has 7 values, x rows have 8"):
        cpu_kernels.rms_norm(x, torch.ones(7, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="x must be a contiguous bf16 CPU tensor"):
        cpu_kernels.rms_norm(x.float(), torch.ones(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="must be even"):
        cpu_kernels.gated_activation(torch.randn(3, 7).bfloat16(), 0)
    with pytest.raises(RuntimeError, match="unknown activation code 9"):
        cpu_kernels.gated_activation(x, 9)


def test_rows_split_across_threads_give_the_same_bits(cpu_kernels):
    norm, x = norm_case((600, 896))
    gate_up = (torch.randn(40, 2 * 4864, generator=torch.Generator().manual_seed(2)) * 3).bfloat16()
    threads, runs = torch.get_num_threads(), {}
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            runs[count] = (cpu_kernels.rms_norm(x, norm.weight, norm.eps),
                           cpu_kernels.gated_activation(gate_up, ACTIVATION_CODES["silu"]))
    finally:
        torch.set_num_threads(threads)
    for count, outputs in runs.items():
        assert all(torch.equal(a, e) for a, e in zip(outputs, runs[1])), f"{count} threads differ from one"

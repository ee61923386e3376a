"""The row ops (cpu/row_ops.cpp: RMSNorm, act(gate) * up, rotary) against fp64 references rounded where they round.

Oracle: the op computed in fp64 from the same bf16 values, rounded to bf16 at the places the
PyTorch expressions of zili.layers.norm / zili.layers.activation round (the normalized x, then its
product with the weight; act(gate), then its product with up; each rotary product, then their sum). The kernels compute in fp32, so they
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
from zili.layers.rotary import apply_rotary

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
    calls = {name: count_calls(monkeypatch, name) for name in ("rms_norm", "gated_activation", "rotary")}
    norm, x = norm_case((4, 64))
    act = GatedActivation("silu")
    heads = x.view(4, 2, 32)
    cos, sin = torch.ones(4, 32, dtype=torch.bfloat16), torch.zeros(4, 32, dtype=torch.bfloat16)

    def run_all(norm, x, heads, cos, sin):
        return norm(x), act(x), apply_rotary(heads, cos, sin)

    with torch.inference_mode():
        run_all(norm, x, heads, cos, sin)
    assert {name: len(c) for name, c in calls.items()} == {"rms_norm": 1, "gated_activation": 1, "rotary": 1}
    # fp32 values, strided views, tensors autograd tracks: the PyTorch expressions
    with torch.inference_mode():
        run_all(copy.deepcopy(norm).float(), x.float(), heads.float(), cos.float(), sin.float())
        strided = x[:, ::2]
        RMSNorm(32).bfloat16()(strided), act(strided), apply_rotary(heads, cos[:, ::2], sin[:, ::2])
    leaf = x.clone().requires_grad_()
    outputs = run_all(norm, leaf, leaf.view(4, 2, 32), cos, sin)
    assert all(out.grad_fn is not None for out in outputs)
    assert {name: len(c) for name, c in calls.items()} == {"rms_norm": 1, "gated_activation": 1, "rotary": 1}


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
    heads, angles = x.view(3, 2, 4), torch.zeros(3, 6, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="rotary_dim 6 must be even and at most head_dim 4"):
        cpu_kernels.rotary(heads, angles, angles)
    with pytest.raises(RuntimeError, match=r"cos and sin must be \(3, rotary_dim\)"):
        cpu_kernels.rotary(heads, angles[:2, :4].contiguous(), angles[:2, :4].contiguous())


def test_rows_split_across_threads_give_the_same_bits(cpu_kernels):
    norm, x = norm_case((600, 896))
    gate_up = (torch.randn(40, 2 * 4864, generator=torch.Generator().manual_seed(2)) * 3).bfloat16()
    heads = gate_up.view(40, 76, 128)
    angles = torch.randn(40, 128).bfloat16()
    threads, runs = torch.get_num_threads(), {}
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            runs[count] = (cpu_kernels.rms_norm(x, norm.weight, norm.eps),
                           cpu_kernels.gated_activation(gate_up, ACTIVATION_CODES["silu"]),
                           cpu_kernels.rotary(heads, angles, angles))
    finally:
        torch.set_num_threads(threads)
    for count, outputs in runs.items():
        assert all(torch.equal(a, e) for a, e in zip(outputs, runs[1])), f"{count} threads differ from one"


def rotary_reference(x, cos, sin):
    """apply_rotary in fp64, rounded to bf16 after each product and after the sum, as the bf16 expression."""
    half = cos.shape[-1] // 2
    x64, c, s = x.double(), cos.double()[:, None, :], sin.double()[:, None, :]
    rot = x64[..., : 2 * half]
    turned = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    rounded = lambda t: t.bfloat16().double()  # noqa: E731
    out = (rounded(rot * c) + rounded(turned * s)).bfloat16()
    return torch.cat((out, x[..., 2 * half:]), dim=-1)


@pytest.mark.parametrize("tokens,heads,head_dim,rotary_dim", [(1, 14, 64, 64), (37, 3, 40, 40), (300, 4, 128, 64),
                                                              (5, 2, 80, 48)])
def test_rotary_matches_fp64_on_a_view_of_fused_qkv(cpu_kernels, tokens, heads, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(3)
    qkv = (torch.randn(tokens, (heads + 2) * head_dim, generator=gen) * 2).bfloat16()
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)  # strided, as Attention.forward splits it
    angles = torch.rand(tokens, rotary_dim // 2, generator=gen, dtype=torch.float64) * 6.3
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    got = cpu_kernels.rotary(q, cos, sin)
    assert got.is_contiguous()
    assert_rounding_twins(got, rotary_reference(q, cos, sin), roundings=3)

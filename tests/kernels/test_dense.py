"""The bf16 GEMV kernel (cpu/gemv_bf16.cpp) and `dense_linear` against fp64 matmuls of the same bf16 values.

Tolerance: inputs and weights are bf16, so every product is exact in fp32; the kernel differs from
an exact sum only by fp32 accumulation (|error| <= K * 2**-24 * sum |x| |w|, used with a factor 2
of slack) and, for bf16 outputs, one final rounding (relative 2**-9, bounded here by 2**-8 |y|).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import kernels_off

from zili.kernels.dense import dense_linear
from zili.layers.linear import Linear


def bf16_case(m, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    return x, w, b


def assert_within_bound(y, x, w, bias, rounded_output):
    exact = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    magnitude = x.double().abs() @ w.double().abs().t()
    bound = 2 * x.shape[1] * 2.0**-24 * magnitude + 1e-30
    if rounded_output:
        bound = bound + 2.0**-8 * exact.abs()
    error = (y.double() - exact).abs()
    assert (error <= bound).all(), f"max error/bound {(error / bound).max():.3g}"


@pytest.mark.parametrize("m", [1, 3, 8, 11])
@pytest.mark.parametrize("k,n", [(1, 5), (31, 17), (32, 64), (33, 130), (100, 37), (896, 96)])
def test_bf16_kernel_matches_fp64_of_the_same_values(cpu_kernels, m, k, n):
    x, w, b = bf16_case(m, k, n)
    for bias in (None, b, b.float()):
        y = cpu_kernels.linear_bf16(x, w, bias)
        assert y.shape == (m, n) and y.dtype == torch.bfloat16
        assert_within_bound(y, x, w, bias, rounded_output=True)


def test_fp32_activations_are_rounded_to_bf16_and_give_fp32_outputs(cpu_kernels):
    x, w, _ = bf16_case(3, 70, 40)
    x32 = x.float() + 1e-4 * torch.randn(3, 70)  # not representable in bf16
    y = cpu_kernels.linear_bf16(x32, w, None)
    assert y.dtype == torch.float32
    assert_within_bound(y, x32.bfloat16(), w, None, rounded_output=False)


def test_two_threads_split_the_output_rows(cpu_kernels):
    x, w, b = bf16_case(2, 96, 1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = cpu_kernels.linear_bf16(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y, cpu_kernels.linear_bf16(x, w, b))  # same per-row arithmetic on any thread


def test_bad_arguments_raise(cpu_kernels):
    x, w, b = bf16_case(1, 32, 8)
    with pytest.raises(RuntimeError, match="features"):
        cpu_kernels.linear_bf16(x, w[:, :16].contiguous(), None)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_kernels.linear_bf16(x, w.t().contiguous().t(), None)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_kernels.linear_bf16(x, w, b[:4])


def test_dense_linear_takes_decode_sized_bf16_inputs_only(cpu_kernels, monkeypatch):
    calls = []
    kernel = cpu_kernels.linear_bf16
    monkeypatch.setattr(cpu_kernels, "linear_bf16", lambda *a: calls.append(a[0].shape) or kernel(*a))
    x, w, b = bf16_case(4, 64, 48)
    y = dense_linear(x.view(2, 2, 64), w, b)   # leading dims flattened and restored
    assert y.shape == (2, 2, 48) and calls == [(4, 64)]
    assert_within_bound(y.view(4, 48), x, w, b, rounded_output=True)
    limit = cpu_kernels.MAX_KERNEL_ROWS["bf16"]
    assert dense_linear(torch.randn(limit + 1, 64).bfloat16(), w, b) is None   # prefill: oneDNN
    assert dense_linear(x.float(), w.float(), b.float()) is None                # fp32 model
    assert dense_linear(x, w.t().contiguous().t(), b) is None                   # not row-major
    assert dense_linear(x.requires_grad_(), w, b) is None                       # autograd needs F.linear
    with torch.no_grad():
        assert dense_linear(x, w, b) is not None
    kernels_off(monkeypatch)
    assert dense_linear(x.detach(), w, b) is None


def test_linear_layer_uses_the_kernel_and_keeps_its_contract(cpu_kernels, monkeypatch):
    layer = Linear(96, [64, 32], bias=True).to(torch.bfloat16)
    _, w, b = bf16_case(1, 96, 96)
    layer.load_weight("weight", w[:64], 0)
    layer.load_weight("weight", w[64:], 1)
    layer.load_weight("bias", b, None)
    x = torch.randn(1, 96).bfloat16()
    with torch.inference_mode():
        y = layer(x)
        kernels_off(monkeypatch)
        expected = layer(x)
    assert torch.equal(expected, F.linear(x, w, b))
    assert_within_bound(y, x, w, b, rounded_output=True)
    # the kernel reads the layer's own weight: no packed copy next to it
    assert [name for name, _ in layer.named_buffers()] == [] and layer.weight.dtype == torch.bfloat16

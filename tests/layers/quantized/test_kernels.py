"""Fast CPU kernels against the dequantize-then-matmul reference, and the per-device choice."""

import pytest
import torch

from zili.layers.quantized.kernels import CpuInt4Kernel, CpuInt8Kernel, ReferenceKernel, select_kernel
from zili.layers.quantized.weight import QuantizedWeight


def random_weight(bits, out_features, in_features, group_size, symmetric, seed=0, permuted=False):
    g = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=g).to(torch.uint8)
    scales = torch.rand(out_features, groups, generator=g) * 0.02 + 0.001
    if symmetric:
        zeros = torch.full((out_features, groups), 1 << (bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(0, 1 << bits, (out_features, groups), generator=g).to(torch.uint8)
    perm = torch.randperm(in_features, generator=g) if permuted else None
    return QuantizedWeight(codes, scales, zeros, bits, group_size, perm)


def reference_output(weight, x):
    """x @ W.T with W dequantized by hand in fp64: the oracle for every kernel."""
    w = weight.dense(torch.float64)
    return (x.double() @ w.t())


CASES = [  # bits, out, in, group size, symmetric, permuted
    (4, 32, 64, 32, True, False),
    (4, 48, 128, 64, False, False),
    (4, 16, 96, 96, True, False),     # per-channel (group = in) expressed as 3 groups of 32
    (4, 32, 256, 128, False, True),   # act-order permutation
    (8, 24, 64, 64, True, False),     # per-channel int8
    (8, 40, 128, 32, False, False),   # group-wise asymmetric int8
    (8, 16, 64, 32, True, True),
]


@pytest.mark.parametrize("bits,n,k,group,sym,permuted", CASES)
def test_reference_kernel_matches_hand_dequantization(bits, n, k, group, sym, permuted):
    weight = random_weight(bits, n, k, group, sym, permuted=permuted)
    x = torch.randn(5, k, dtype=torch.float64)
    y = ReferenceKernel(weight)(x)
    torch.testing.assert_close(y, reference_output(weight, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bits,n,k,group,sym,permuted", CASES)
def test_fast_cpu_kernel_equals_reference_in_fp32(bits, n, k, group, sym, permuted):
    weight = random_weight(bits, n, k, group, sym, permuted=permuted)
    kernel_cls = CpuInt4Kernel if bits == 4 else CpuInt8Kernel
    assert kernel_cls.supports(weight, torch.device("cpu"))
    kernel = kernel_cls(weight, compute_dtype=torch.float32)
    x = torch.randn(3, 2, k)  # leading dims are flattened and restored
    y = kernel(x)
    assert y.shape == (3, 2, n) and y.dtype == torch.float32
    expected = reference_output(weight, x.reshape(-1, k)).float().reshape(3, 2, n)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,n,k,group,sym,permuted", CASES)
def test_fast_cpu_kernel_in_bf16_is_close_to_reference(bits, n, k, group, sym, permuted):
    weight = random_weight(bits, n, k, group, sym, permuted=permuted)
    kernel = select_kernel(weight, "cpu")
    # zili's VNNI kernels (tests/kernels) come first where their extension builds
    assert kernel.name in ({"cpu-vnni-int4", "cpu-int4"} if bits == 4 else {"cpu-vnni-int8", "cpu-int8"})
    x = torch.randn(7, k)
    y = kernel(x)
    expected = reference_output(weight, x).float()
    # bf16 activations / scales: ~3 significant digits on outputs of this magnitude
    scale = expected.abs().max()
    assert (y - expected).abs().max() <= 2e-2 * scale


def test_kernel_choice_per_device_and_fallback(monkeypatch):
    monkeypatch.delenv("ZILI_QUANT_KERNEL", raising=False)
    monkeypatch.setattr("zili.kernels.cpu_ext.available", lambda: False)  # PyTorch's; zili's own: tests/kernels
    assert select_kernel(random_weight(4, 32, 64, 32, True), "cpu").name == "cpu-int4"
    assert select_kernel(random_weight(8, 24, 64, 64, True), "cpu").name == "cpu-int8"
    # out_features not a multiple of 16 and a group size the int4 kernel lacks: reference path
    assert select_kernel(random_weight(4, 24, 64, 32, True), "cpu").name == "reference"
    assert select_kernel(random_weight(4, 32, 48, 16, True), "cpu").name == "reference"
    assert not CpuInt4Kernel.supports(random_weight(4, 32, 64, 32, True), torch.device("meta"))
    assert select_kernel(random_weight(4, 32, 64, 32, True), "cpu", "reference").name == "reference"
    monkeypatch.setenv("ZILI_QUANT_KERNEL", "reference")
    assert select_kernel(random_weight(4, 32, 64, 32, True), "cpu").name == "reference"
    with pytest.raises(ValueError, match="unknown quantized kernel"):
        select_kernel(random_weight(4, 32, 64, 32, True), "cpu", "nope")
    with pytest.raises(ValueError, match="does not support"):
        select_kernel(random_weight(4, 24, 64, 32, True), "cpu", "cpu-int4")


def test_kernel_keeps_only_packed_weights():
    weight = random_weight(4, 64, 256, 128, True)
    kernel = CpuInt4Kernel(weight)
    stored = sum(b.numel() * b.element_size() for b in kernel.buffers())
    assert stored < 64 * 256  # under one byte per weight: packed, no dense copy
    assert not any(b.is_floating_point() and b.numel() >= 64 * 256 for b in kernel.buffers())

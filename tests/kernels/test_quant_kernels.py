"""zili's VNNI int8 / int4 kernels (quant_kernels.py, cpu/gemv_quant.cpp) against dequantize-then-matmul.

The only approximation is the int8 quantization of activations per block of B = 128 inputs (64
when the weight group is not a multiple of 128, 32 when it is not one of 64): |x - scale_b * q| <= scale_b / 2 = amax_b / 254.
So for every output, |y - x @ W.T| <= sum_b amax_b / 254 * sum_{k in b} |W[n, k]|, plus fp32
rounding (1e-5 of sum |x| |W|). Activations already on each block's int8 grid make the kernel exact.
"""

import pytest
import torch
from conftest import kernels_off

from zili.kernels.quant_kernels import CpuVnniInt4Kernel, CpuVnniInt8Kernel, pack_int4, unpack_int4
from zili.layers.quantized import QuantLinear, select_kernel
from zili.layers.quantized.weight import QuantizedWeight

KERNELS = {8: CpuVnniInt8Kernel, 4: CpuVnniInt4Kernel}


def random_weight(bits, n, k, group, symmetric=True, permuted=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = k // group
    codes = torch.randint(0, 1 << bits, (n, k), generator=g).to(torch.uint8)
    scales = torch.rand(n, groups, generator=g) * 0.02 + 0.001
    zeros = (torch.full((n, groups), 1 << (bits - 1), dtype=torch.uint8) if symmetric
             else torch.randint(0, 1 << bits, (n, groups), generator=g).to(torch.uint8))
    perm = torch.randperm(k, generator=g) if permuted else None
    return QuantizedWeight(codes, scales, zeros, bits, group, perm)


def activation_block(group):
    return 128 if group % 128 == 0 else 64 if group % 64 == 0 else 32


def error_bound(x, weight):
    """(M, N) worst-case error of int8 activations per block, for x in the weight's column order."""
    w = weight.dequantize(torch.float64)
    block = activation_block(weight.group_size)
    m, k = x.shape
    amax = x.double().view(m, k // block, block).abs().amax(-1)                 # (M, blocks)
    w_abs = w.abs().view(w.shape[0], k // block, block).sum(-1)                 # (N, blocks)
    return amax / 254 @ w_abs.t() + 1e-5 * (x.double().abs() @ w.abs().t())


def reference(x, weight):
    return x.double() @ weight.dense(torch.float64).t()


CASES = [  # bits, N, K, group, symmetric, permuted
    (8, 40, 256, 256, True, False),    # per channel
    (8, 33, 192, 64, False, False),    # asymmetric, N not a multiple of the tile
    (8, 64, 896, 128, True, True),     # act-order permutation
    (4, 48, 256, 128, True, False),
    (4, 17, 192, 64, False, False),    # K = 192: the last packed chunk is half padding
    (4, 96, 896, 128, False, True),
    (4, 16, 384, 384, True, False),    # per channel, activation blocks of 128
    (8, 37, 256, 32, False, False),    # groups of 32: two activation blocks per vpdpbusd
    (8, 21, 160, 32, True, True),      # K = 160: a 32-input tail past the last full 64
    (4, 45, 256, 32, False, False),
    (4, 19, 160, 32, True, True),      # K = 160: one packed chunk holds 32 real inputs
    (4, 10, 224, 32, False, False),    # K = 224: the high half of the last chunk is half padding
    (8, 9, 288, 96, False, False),     # groups of 3 blocks of 32
    (4, 12, 192, 96, True, False),
]


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16, 20, 24])  # > 8: panels of W reused per 8 rows
@pytest.mark.parametrize("bits,n,k,group,symmetric,permuted", CASES)
def test_kernel_is_within_the_activation_quantization_bound(cpu_kernels, m, bits, n, k, group, symmetric, permuted):
    weight = random_weight(bits, n, k, group, symmetric, permuted)
    kernel = KERNELS[bits](weight)
    x = torch.randn(m, k)
    x[:, 5] *= 20  # an outlier feature: block scales keep the other blocks accurate
    y = kernel(x)
    assert y.shape == (m, n) and y.dtype == torch.float32
    x_kernel_order = x if weight.perm is None else x[:, weight.perm]
    error = (y.double() - reference(x, weight)).abs()
    bound = error_bound(x_kernel_order, weight)
    assert (error <= bound).all(), f"max error/bound {(error / bound).max():.3g}"


@pytest.mark.parametrize("bits,n,k,group,symmetric,permuted", CASES)
def test_typical_relative_error_is_about_one_percent(cpu_kernels, bits, n, k, group, symmetric, permuted):
    weight = random_weight(bits, n, k, group, symmetric, permuted)
    x = torch.randn(8, k)
    expected = reference(x, weight)
    relative = (KERNELS[bits](weight)(x).double() - expected).norm() / expected.norm()
    assert relative < 1e-2  # ~ the int8 step of Gaussian activations, far below the worst case


@pytest.mark.parametrize("bits,n,k,group,symmetric,permuted", CASES)
def test_activations_on_the_int8_grid_are_exact(cpu_kernels, bits, n, k, group, symmetric, permuted):
    weight = random_weight(bits, n, k, group, symmetric, permuted)
    block = activation_block(group)
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (3, k), generator=g).float()
    q[:, ::block] = 127                                     # amax of every block is 127 * its scale
    block_scales = 2.0 ** torch.randint(-3, 3, (3, k // block), generator=g).float()  # exact in fp32
    x = q * block_scales.repeat_interleave(block, 1)
    if weight.perm is not None:  # the grid is defined in the kernel's (permuted) column order
        x = x[:, torch.argsort(weight.perm)]
    y = KERNELS[bits](weight)(x)
    magnitude = x.double().abs() @ weight.dense(torch.float64).abs().t()
    assert ((y.double() - reference(x, weight)).abs() <= 1e-6 * magnitude).all()  # fp32 rounding only


def test_bf16_activations_give_bf16_outputs(cpu_kernels):
    weight = random_weight(4, 32, 256, 128)
    x = torch.randn(2, 256).bfloat16()
    y = CpuVnniInt4Kernel(weight)(x.view(1, 2, 256))
    assert y.shape == (1, 2, 32) and y.dtype == torch.bfloat16
    error = (y.view(2, 32).double() - reference(x, weight)).abs()
    assert (error <= error_bound(x.float(), weight) + 2.0**-8 * reference(x, weight).abs()).all()
    half = CpuVnniInt4Kernel(weight)(x.half())  # other dtypes compute in fp32
    assert half.dtype == torch.float16 and torch.allclose(half.float(), y.float(), rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("bits,k,group", [(4, 256, 128), (8, 192, 64), (8, 256, 256), (4, 384, 384), (4, 160, 32)])
def test_one_zero_point_gives_the_bits_of_per_group_zero_scales(cpu_kernels, bits, k, group):
    """Symmetric weights keep one zero point, not (N, G) zero_scales: the same arithmetic, fewer bytes."""
    kernel = KERNELS[bits](random_weight(bits, 37, k, group, symmetric=True))
    assert kernel.zero_scales is None and kernel.zero_point == 1 << (bits - 1)
    zero_scales = kernel.scales * kernel.zero_point  # what the kernel kept before, per group
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    for rows in (x, x[:1]):
        assert torch.equal(cpu_kernels.linear_quant(rows, kernel.weight, kernel.scales, kernel.zero_point, bits, group),
                           cpu_kernels.linear_quant(rows, kernel.weight, kernel.scales, zero_scales, bits, group))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(cpu_kernels.dequantize(kernel.weight, kernel.scales, kernel.zero_point, bits, group,
                                                  slice(2, 30), dtype),
                           cpu_kernels.dequantize(kernel.weight, kernel.scales, zero_scales, bits, group, slice(2, 30),
                                                  dtype))
    asymmetric = KERNELS[bits](random_weight(bits, 37, k, group, symmetric=False))
    assert asymmetric.zero_point is None and asymmetric.zero_scales.shape == asymmetric.scales.shape


@pytest.mark.parametrize("bits", [8, 4])
def test_large_inputs_take_the_dequantized_path(cpu_kernels, monkeypatch, bits):
    weight = random_weight(bits, 40, 192, 64, symmetric=False, permuted=True)
    kernel = KERNELS[bits](weight)
    monkeypatch.setattr("zili.kernels.quant_kernels.DEQUANT_SLICE_ELEMENTS", 192 * 16)  # 3 slices of 16 rows
    m = cpu_kernels.MAX_KERNEL_ROWS["quant"] + 1
    x = torch.randn(m, 192, generator=torch.Generator().manual_seed(bits))
    # fp32 sums of 192 products: the error scales with the terms' magnitudes, not with the (possibly
    # cancelling) result, so an element-wise rtol on the result fails for some draws
    magnitude = x.double().abs() @ weight.dense(torch.float64).abs().t()
    assert ((kernel(x).double() - reference(x, weight)).abs() <= 1e-5 * magnitude).all()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits,n,k,group", [(8, 40, 192, 64), (4, 17, 192, 64), (4, 33, 896, 128), (8, 5, 256, 256),
                                           (8, 7, 160, 32), (4, 9, 160, 32), (4, 6, 224, 32)])
def test_dequantize_op_matches_the_pytorch_dequantization(cpu_kernels, bits, n, k, group, symmetric):
    kernel = KERNELS[bits](random_weight(bits, n, k, group, symmetric=symmetric))
    expected = kernel.dequantized(slice(3, n), torch.float32)      # codes * s - s * z in PyTorch ops
    assert torch.equal(kernel.codes(slice(None)), random_weight(bits, n, k, group, symmetric=symmetric).codes)
    args = (kernel.weight, kernel.scales, kernel.zeros, bits, group, slice(3, n))
    fp32 = cpu_kernels.dequantize(*args, torch.float32)
    bf16 = cpu_kernels.dequantize(*args, torch.bfloat16)
    assert fp32.shape == bf16.shape == (n - 3, k) and bf16.dtype == torch.bfloat16
    assert ((fp32 - expected).abs() <= 1e-6 * expected.abs().max()).all()      # a fused multiply-subtract
    assert ((bf16.float() - expected).abs() <= 2.0**-8 * expected.abs() + 1e-6 * expected.abs().max()).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9])  # tiles of 4, 2 and 1 weight rows
def test_bias_in_the_op(cpu_kernels, bits, rows):
    weight = random_weight(bits, 26, 128, 64)  # 26 rows: a tail after the 4-row tiles
    kernel = (CpuVnniInt8Kernel if bits == 8 else CpuVnniInt4Kernel)(weight)
    x, bias = torch.randn(rows, 128), torch.randn(26)
    with_bias = cpu_kernels.linear_quant(x, kernel.weight, kernel.scales, kernel.zeros, bits, 64, bias)
    torch.testing.assert_close(with_bias, kernel(x) + bias, rtol=0, atol=1e-6)
    with_bias = cpu_kernels.linear_quant(x, kernel.weight, kernel.scales, kernel.zeros, bits, 64, bias.bfloat16())
    torch.testing.assert_close(with_bias, kernel(x) + bias.bfloat16().float(), rtol=0, atol=1e-6)


def test_int4_packing_round_trip_and_memory():
    codes = torch.randint(0, 16, (5, 192), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 128)   # K padded to 256, two codes per byte
    assert torch.equal(unpack_int4(packed, 192), codes)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 64] << 4)  # byte j: inputs j and j + 64 of its chunk
    kernel_bytes = sum(b.numel() * b.element_size() for b in CpuVnniInt4Kernel(random_weight(4, 64, 256, 128)).buffers())
    assert kernel_bytes < 64 * 256  # under one byte per weight: no dense copy


def test_kernel_choice(cpu_kernels, monkeypatch):
    monkeypatch.delenv("ZILI_QUANT_KERNEL", raising=False)
    assert select_kernel(random_weight(4, 32, 256, 128), "cpu").name == "cpu-vnni-int4"
    assert select_kernel(random_weight(8, 32, 256, 64, symmetric=False), "cpu").name == "cpu-vnni-int8"
    assert select_kernel(random_weight(4, 32, 64, 32), "cpu").name == "cpu-vnni-int4"   # groups of 32 too
    assert not CpuVnniInt4Kernel.supports(random_weight(4, 32, 64, 16), torch.device("cpu"))  # not 16
    assert not CpuVnniInt4Kernel.supports(random_weight(4, 32, 256, 128), torch.device("meta"))
    kernels_off(monkeypatch)
    assert select_kernel(random_weight(4, 32, 256, 128), "cpu").name == "cpu-int4"


def test_quant_linear_with_the_kernel(cpu_kernels):
    weight = random_weight(4, 48, 128, 64, symmetric=False)
    bias = torch.randn(48)
    layer = QuantLinear.from_weight(weight, [32, 16], bias, torch.float32)
    assert layer.kernel.name == "cpu-vnni-int4"
    x = torch.randn(3, 128)
    error = (layer(x).double() - reference(x, weight) - bias.double()).abs()
    assert (error <= error_bound(x, weight) + 1e-6).all()


def test_op_with_many_rows_and_scratch_reuse(cpu_kernels):
    """linear_quant itself takes any M: past its per-thread scratch (1M codes) x gets buffers of its own."""
    weight = random_weight(4, 8, 896, 32, symmetric=False)
    kernel = CpuVnniInt4Kernel(weight)
    for m in (1200, 2, 1200, 1):  # large, then small again: the scratch is reused, never stale
        x = torch.randn(m, 896)
        y = cpu_kernels.linear_quant(x, kernel.weight, kernel.scales, kernel.zeros, 4, 32)
        assert y.shape == (m, 8)
        assert ((y.double() - reference(x, weight)).abs() <= error_bound(x, weight)).all()

"""int8 KV quantization: per-element error <= scale / 2 against fp64 arithmetic, full int8 range
used, zeros and tiny vectors handled, dequantize = q * scale, rows independent."""

from __future__ import annotations

import pytest
import torch

from zili.layers.kv_quant import KV_SCALE_DTYPE, SCALE_MIN, dequantize_kv, quantize_kv, round_trip_kv


def rows_of_many_magnitudes(dtype: torch.dtype) -> torch.Tensor:
    """(5, 3, 64): each (token, head) row drawn at its own magnitude, 1e-6 .. 1e4, plus outliers."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 64, generator=gen, dtype=torch.float64)
    magnitudes = 10.0 ** torch.linspace(-6, 4, 15, dtype=torch.float64).view(5, 3, 1)
    x = x * magnitudes
    x[0, 0, 7] *= 50  # one outlier channel, as real K vectors have
    return x.clamp(-6e4, 6e4).to(dtype)  # within fp16's range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_error_per_element_is_at_most_half_the_stored_scale(dtype):
    x = rows_of_many_magnitudes(dtype)
    q, scale = quantize_kv(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == KV_SCALE_DTYPE and scale.shape == x.shape[:-1]
    assert int(q.abs().max()) <= 127  # symmetric: -128 never used
    exact = q.double() * scale.double()[..., None]
    error = (x.double() - exact).abs()
    # x / scale is computed in fp32: allow its rounding (2^-24 relative) on top of the half step
    bound = scale.double()[..., None] / 2 + x.double().abs() * 2.0 ** -23
    assert bool((error <= bound).all()), float((error - bound).max())


def test_rows_above_the_floor_use_the_full_int8_range():
    x = rows_of_many_magnitudes(torch.float32)
    q, scale = quantize_kv(x)
    normal = x.abs().amax(-1) >= 127 * SCALE_MIN
    assert bool(normal.any())
    assert bool((q.abs().amax(-1)[normal] == 127).all())  # the largest element maps to +-127, never clipped


def test_zero_vectors_and_tiny_vectors():
    x = torch.zeros(4, 2, 32)
    x[1, 1] = 1e-7  # far below 127 * SCALE_MIN
    x[2, 0, 3] = -2e-6
    q, scale = quantize_kv(x)
    assert bool(torch.isfinite(scale.float()).all()) and bool((scale.float() > 0).all())
    out = dequantize_kv(q, scale, torch.float32)
    assert torch.equal(out[0], torch.zeros(2, 32))  # zeros come back exactly
    assert float((out - x).abs().max()) <= SCALE_MIN / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_q_times_scale_rounded_once_to_the_compute_dtype(dtype):
    x = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    q, scale = quantize_kv(x)
    out = dequantize_kv(q, scale, dtype)
    assert out.dtype == dtype
    assert torch.equal(out, (q.double() * scale.double()[..., None]).to(dtype))  # fp32 product is exact
    assert torch.equal(round_trip_kv(x), out)


def test_rows_are_quantized_independently():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 2, 16, generator=gen)
    q_all, s_all = quantize_kv(x)
    q_part, s_part = quantize_kv(x[3:5] * 1.0)
    assert torch.equal(q_all[3:5], q_part) and torch.equal(s_all[3:5], s_part)
    x[0] *= 1000  # a loud token does not change its neighbours' scales
    assert torch.equal(quantize_kv(x)[1][1:], s_all[1:])

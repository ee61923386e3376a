"""RTN: round trip within half a quantization step; scales and zero points equal compressed-tensors'."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.utils import calculate_qparams

from zili.compress.rtn import compute_qparams, rtn_quantize
from zili.compress.scheme import QuantizeOptions, QuantScheme
from zili.errors import InvalidRequestError

SCHEMES = [QuantScheme(bits, group, sym) for bits in (4, 8) for group in (32, 64, 128, None) for sym in (True, False)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_round_trip_within_half_a_step(scheme, scale_dtype):
    weight = torch.randn(40, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    weight[3, :7] = 0.0                         # zero runs and an all-zero row
    weight[5] = 0.0
    quantized = rtn_quantize(weight, scheme, scale_dtype)
    group = scheme.group_size_for(256)
    assert quantized.codes.dtype == torch.uint8 and int(quantized.codes.max()) <= scheme.max_code
    assert torch.equal(quantized.scales, quantized.scales.to(scale_dtype).float())   # storable exactly
    if scheme.symmetric:
        assert (quantized.zeros == scheme.mid_code).all()
    step = quantized.scales.repeat_interleave(group, dim=1)
    error = (quantized.dequantize() - weight).abs()
    assert (error <= 0.5 * step * (1 + 1e-3)).all()  # rounding scales up keeps half a step
    assert (quantized.dequantize()[5] == 0).all()


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe().replace(" ", "-"))
def test_qparams_equal_compressed_tensors(scheme):
    weight = torch.randn(24, 128, generator=torch.Generator().manual_seed(2))
    weight[0] = weight[0].abs()                 # a row with no negative value (zero point at the bottom)
    group = scheme.group_size_for(128)
    args = QuantizationArgs(num_bits=scheme.bits, symmetric=scheme.symmetric,
                            strategy="channel" if scheme.group_size is None else "group", group_size=scheme.group_size)
    view = weight.view(24, 128 // group, group)
    their_scales, their_zeros = calculate_qparams(view.amin(-1), view.amax(-1), args)
    scales, zeros = compute_qparams(weight, scheme)
    assert torch.equal(scales, their_scales)
    assert torch.equal(zeros.int() - scheme.mid_code, their_zeros.int())   # theirs are signed


def test_scheme_validation():
    with pytest.raises(InvalidRequestError, match="bits must be 4 or 8") as e:
        QuantScheme(bits=3)
    assert e.value.param == "bits"
    with pytest.raises(InvalidRequestError) as e:
        QuantScheme(bits=4, group_size=0)
    assert e.value.param == "group_size"
    with pytest.raises(InvalidRequestError, match="does not divide the input dimension 96") as e:
        QuantScheme(4, 64).check_divides(96, "down_proj")
    assert e.value.param == "group_size"
    with pytest.raises(InvalidRequestError, match="unknown quantization method 'hqq'") as e:
        QuantizeOptions(method="hqq")
    assert e.value.param == "method"

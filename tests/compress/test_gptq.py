"""GPTQ: Hessian accumulation, reduction to RTN when inputs are uncorrelated, and lower layer
reconstruction error than RTN on correlated inputs (fixed seeds)."""

import pytest
import torch

from zili.compress.gptq import HessianAccumulator, gptq_quantize
from zili.compress.rtn import rtn_quantize
from zili.compress.scheme import QuantScheme


def correlated_inputs(rows, features, seed):
    """Activations with a decaying spectrum and a few loud channels, like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(features, features, generator=g))[0]
    spectrum = torch.logspace(0, -2, features)
    x = torch.randn(rows, features, generator=g) * spectrum @ basis.t()
    x[:, :4] *= 8
    return x


def reconstruction_error(x, weight, quantized):
    return ((x @ weight.t() - x @ quantized.dense().t()) ** 2).sum().item()


def test_hessian_accumulator_is_two_over_n_xtx():
    x = torch.randn(100, 16)
    acc = HessianAccumulator(16)
    for chunk in x.split([30, 50, 20]):
        acc.add(chunk.view(-1, 5, 16) if len(chunk) == 50 else chunk)   # any leading shape
    torch.testing.assert_close(acc.hessian, 2 * x.t() @ x / 100, rtol=1e-5, atol=1e-5)
    assert acc.num_rows == 100


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, True), QuantScheme(4, 64, False), QuantScheme(8, None, True)],
                         ids=lambda s: s.describe())
def test_identity_hessian_gives_rtn(scheme):
    """With uncorrelated unit inputs no error can be fed forward, so GPTQ is exactly RTN."""
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(8))
    ours = gptq_quantize(weight, torch.eye(128), scheme, damp_percent=0.0)
    rtn = rtn_quantize(weight, scheme)
    assert torch.equal(ours.codes, rtn.codes) and torch.equal(ours.scales, rtn.scales)


@pytest.mark.parametrize("scheme,act_order", [
    (QuantScheme(4, 32, True), False), (QuantScheme(4, 64, False), False), (QuantScheme(4, None, True), False),
    (QuantScheme(4, 32, True), True), (QuantScheme(4, 128, False), True), (QuantScheme(8, None, True), False),
], ids=lambda v: v.describe() if isinstance(v, QuantScheme) else ("act-order" if v else "in-order"))
def test_gptq_beats_rtn_on_layer_reconstruction(scheme, act_order):
    x = correlated_inputs(1024, 128, seed=9)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(10)) * 0.05
    hessian = HessianAccumulator(128)
    hessian.add(x)
    gptq = gptq_quantize(weight, hessian.hessian, scheme, act_order=act_order)
    rtn = rtn_quantize(weight, scheme)
    assert gptq.perm is None   # static groups: plain layout, whatever the processing order
    assert reconstruction_error(x, weight, gptq) < 0.8 * reconstruction_error(x, weight, rtn)


def test_dead_inputs_and_block_sizes():
    x = correlated_inputs(512, 64, seed=11)
    x[:, 5] = 0                                   # an input that never fires
    weight = torch.randn(16, 64)
    hessian = HessianAccumulator(64)
    hessian.add(x)
    quantized = gptq_quantize(weight, hessian.hessian, QuantScheme(4, 32, True), block_size=16)
    assert torch.isfinite(quantized.scales).all()
    assert (quantized.dense()[:, 5] == 0).all()
    wide = gptq_quantize(weight, hessian.hessian, QuantScheme(4, 32, True), block_size=128)
    # blocking only defers updates: the same result up to float summation order (rare one-step flips)
    assert (wide.codes != quantized.codes).float().mean() < 0.02
    assert (wide.codes.int() - quantized.codes.int()).abs().max() <= 1
    assert reconstruction_error(x, weight, wide) == pytest.approx(reconstruction_error(x, weight, quantized), rel=0.05)

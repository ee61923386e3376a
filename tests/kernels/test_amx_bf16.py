"""The AMX bf16 matmul (cpu/gemm_amx_bf16.cpp) behind torch.ops.zili_cpu.linear_bf16, against fp64 matmuls
of the same bf16 values (tolerance as in test_dense: fp32 accumulation plus the bf16 output rounding).

`set_bf16_matmul_path` forces a path: "amx" (AMX wherever the CPU and OS allow it), "gemv" (the AVX512-BF16
kernel) or "auto" (by rows of x). On a CPU without AMX the "amx" setting runs gemv_bf16, which these
tests then check the same way.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_dense import assert_within_bound, bf16_case

from zili.kernels import cpu_ext

HAS_AMX = "amx_bf16" in cpu_ext.cpu_flags() and "amx_tile" in cpu_ext.cpu_flags()


@pytest.fixture
def path(cpu_kernels):
    """set(name): the path linear_bf16 takes until the test ends (then "auto" again)."""
    ops = torch.ops.zili_cpu

    def choose(name):
        ops.set_bf16_matmul_path(name)
        return ops

    yield choose
    torch.ops.zili_cpu.set_bf16_matmul_path("auto")


AMX_OR_GEMV = "amx" if HAS_AMX else "gemv"  # what the "amx" setting runs on this CPU


def test_amx_path_is_taken_where_the_cpu_has_it(path):
    ops = path("amx")
    assert ops.bf16_matmul_path(1, 896) == ops.bf16_matmul_path(16, 896) == AMX_OR_GEMV
    ops = path("gemv")
    assert ops.bf16_matmul_path(16, 896) == "gemv"


@pytest.mark.parametrize("m", [1, 2, 5, 8, 15, 16, 17, 24, 31, 32, 33, 40])
@pytest.mark.parametrize("k,n", [(32, 16), (64, 48), (33, 130), (100, 37), (896, 96), (200, 1000), (17, 50)])
def test_amx_matches_fp64_with_n_and_k_tails(path, m, k, n):
    ops = path("amx")
    x, w, b = bf16_case(m, k, n, seed=m * 1000 + k + n)
    for bias in (None, b, b.float()):
        y = ops.linear_bf16(x, w, bias)  # bf16 in, bf16 out
        assert y.shape == (m, n) and y.dtype == torch.bfloat16
        assert_within_bound(y, x, w, bias, rounded_output=True)
    y = ops.linear_bf16(x.float(), w, b)  # fp32 in (rounded to bf16), fp32 out
    assert y.dtype == torch.float32
    assert_within_bound(y, x, w, b, rounded_output=False)


@pytest.mark.parametrize("seed", range(12))
def test_amx_random_shapes(path, seed):
    ops = path("amx")
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(1, 41, (1,), generator=g))
    k = int(torch.randint(1, 700, (1,), generator=g))
    n = int(torch.randint(1, 300, (1,), generator=g))
    x, w, b = bf16_case(m, k, n, seed=seed)
    bias = (None, b, b.float())[seed % 3]
    assert_within_bound(ops.linear_bf16(x, w, bias), x, w, bias, rounded_output=True)
    assert_within_bound(ops.linear_bf16(x.float(), w, bias), x, w, bias, rounded_output=False)


def on_two_threads_then_one(op, *args):
    """op(*args) with 2 threads, then with 1 (the thread count restored after)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y2 = op(*args)
        torch.set_num_threads(1)
        return y2, op(*args)
    finally:
        torch.set_num_threads(threads)


def test_amx_with_a_long_k_and_two_threads(path):
    ops = path("amx")
    x, w, b = bf16_case(16, 4864 + 7, 200)
    y2, y1 = on_two_threads_then_one(ops.linear_bf16, x, w, b)
    assert_within_bound(y2, x, w, b, rounded_output=True)
    assert torch.equal(y1, y2)  # N splits at multiples of 16 rows: the same arithmetic for every row


def test_gemv_fallback_path_matches_too(path):
    ops = path("gemv")
    for m in (1, 9, 16, 33):
        x, w, b = bf16_case(m, 100, 70, seed=m)
        assert ops.bf16_matmul_path(m, 896) == "gemv"
        assert_within_bound(ops.linear_bf16(x, w, b), x, w, b, rounded_output=True)


def test_auto_path_uses_amx_where_available(path):
    ops = path("auto")  # AMX measured ahead of gemv_bf16 from one row on, but for one row of long inputs
    assert ops.bf16_matmul_path(1, 896) == ops.bf16_matmul_path(16, 896) == AMX_OR_GEMV
    assert ops.bf16_matmul_path(2, 4864) == AMX_OR_GEMV and ops.bf16_matmul_path(1, 4864) == "gemv"


def test_amx_after_onednn_used_the_tiles_on_the_same_threads(path):
    ops = path("amx")
    x, w, b = bf16_case(16, 256, 128)
    first = ops.linear_bf16(x, w, b)
    big = torch.randn(64, 512).bfloat16()
    F.linear(big, torch.randn(256, 512).bfloat16())  # oneDNN (AMX where it can): its own tile configuration
    again = ops.linear_bf16(x, w, b)
    assert torch.equal(first, again)
    assert_within_bound(again, x, w, b, rounded_output=True)


def test_environment_switch_turns_amx_off(cpu_kernels):
    code = ("import torch; from zili.kernels import cpu_ext; assert cpu_ext.available(); "
            "torch.ops.zili_cpu.set_bf16_matmul_path('amx'); print(torch.ops.zili_cpu.bf16_matmul_path(16, 896))")
    repo = str(Path(cpu_ext.__file__).resolve().parents[2])
    env = dict(os.environ, ZILI_CPU_AMX="0", PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "gemv"


def test_rows_rule_matches_the_path_the_kernel_takes(path):
    ops = path("auto")
    limit = cpu_ext.MAX_KERNEL_ROWS["bf16"]
    # AMX: the kernels take batched decode up to 64 rows; gemv_bf16 alone beats oneDNN up to 8 only
    assert limit == (64 if ops.bf16_matmul_path(limit, 896) == "amx" else 8)
    assert cpu_ext.has_amx() == (ops.bf16_matmul_path(limit, 896) == "amx")


def gated_reference(ops, x, w, bias):
    """The unfused path: the bf16 gate_up matmul, then the SiLU gate row op."""
    return ops.gated_activation(ops.linear_bf16(x, w, bias), 0)


@pytest.mark.parametrize("m", [1, 3, 8, 16, 33])  # fused up to 8 rows; more take the matmul, then the gate
@pytest.mark.parametrize("k,i", [(896, 64), (100, 48), (33, 16), (4864 + 7, 32)])
def test_silu_gated_matmul_is_bit_for_bit_the_matmul_then_the_gate(path, m, k, i):
    ops = path("amx")
    x, w, b = bf16_case(m, k, 2 * i, seed=m * 100 + k + i)
    for bias in (None, b, b.float()):
        fused = ops.linear_bf16_silu_gated(x, w, bias)
        assert fused.shape == (m, i) and fused.dtype == torch.bfloat16
        assert torch.equal(fused, gated_reference(ops, x, w, bias))
    gate, up = (x.double() @ w.double().t() + b.double()).chunk(2, dim=-1)  # the last one (bias b) near exact
    exact = F.silu(gate) * up
    assert torch.allclose(fused.double(), exact, rtol=0.02, atol=0.02 * exact.abs().max().item())


def test_silu_gated_matmul_splits_alike_on_any_number_of_threads(path):
    ops = path("amx")
    x, w, b = bf16_case(8, 896, 2 * 4864)
    y2, y1 = on_two_threads_then_one(ops.linear_bf16_silu_gated, x, w, b)
    assert torch.equal(y1, y2) and torch.equal(y2, gated_reference(ops, x, w, b))


def test_silu_gated_matmul_falls_back_where_it_cannot_fuse(path):
    ops = path("gemv")  # no AMX path: linear_bf16 then the gate
    x, w, b = bf16_case(5, 96, 2 * 40, seed=3)
    assert torch.equal(ops.linear_bf16_silu_gated(x, w, b), gated_reference(ops, x, w, b))
    ops = path("amx")  # I = 40 is not a multiple of 16 tiles' rows
    assert torch.equal(ops.linear_bf16_silu_gated(x, w, b), gated_reference(ops, x, w, b))

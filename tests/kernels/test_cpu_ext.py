"""Building / loading the extension, the ZILI_CPU_KERNELS switch and the rows dispatch rule."""

import logging

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from zili.kernels import cpu_ext


def test_rows_dispatch_rule(cpu_kernels):
    for kind, limit in cpu_ext.MAX_KERNEL_ROWS.items():
        assert cpu_ext.use_kernel(kind, 1) and cpu_ext.use_kernel(kind, limit)
        assert not cpu_ext.use_kernel(kind, limit + 1)  # prefill-sized inputs go to PyTorch
        assert not cpu_ext.use_kernel(kind, 0)


def test_environment_switch_turns_the_kernels_off(cpu_kernels, monkeypatch):
    monkeypatch.setenv("ZILI_CPU_KERNELS", "0")
    cpu_ext.available.cache_clear()
    assert not cpu_ext.available() and not cpu_ext.use_kernel("bf16", 1)
    monkeypatch.setenv("ZILI_CPU_KERNELS", "1")
    assert not cpu_ext.available()  # read once per process
    cpu_ext.available.cache_clear()
    assert cpu_ext.available()


@pytest.fixture
def fresh_load():
    """Forget the cached load result before and after (a later load finds the cached build)."""
    cpu_ext._loaded.cache_clear()
    cpu_ext.available.cache_clear()
    yield
    cpu_ext._loaded.cache_clear()
    cpu_ext.available.cache_clear()


def test_build_failure_logs_one_warning_and_falls_back(fresh_load, monkeypatch, caplog):
    monkeypatch.delenv("ZILI_CPU_KERNELS", raising=False)
    monkeypatch.setattr(cpu_ext, "missing_cpu_flags", lambda: [])

    def broken_build():
        raise RuntimeError("Error building extension 'zili_cpu_kernels'\nmore compiler output")

    monkeypatch.setattr(cpu_ext, "_build", broken_build)
    with caplog.at_level(logging.WARNING, logger=cpu_ext.__name__):
        assert not cpu_ext.available()
        assert not cpu_ext.available()  # the failure is remembered: one warning, no second build
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "RuntimeError: Error building extension" in warnings[0].getMessage()
    assert "more compiler output" not in warnings[0].getMessage()


def test_cpu_without_the_instructions_builds_nothing(fresh_load, monkeypatch):
    monkeypatch.delenv("ZILI_CPU_KERNELS", raising=False)
    monkeypatch.setattr(cpu_ext, "cpu_flags", lambda: {"avx2", "avx512f"})
    built = []
    monkeypatch.setattr(cpu_ext, "_build", lambda: built.append(True))
    assert not cpu_ext.available()
    assert built == []
    assert "avx512_bf16" in cpu_ext.missing_cpu_flags()


def test_a_build_lock_left_by_a_killed_build_does_not_block_loading(cpu_kernels, fresh_load):
    (cpu_ext.build_directory() / "lock").touch()  # torch's lock file, as a killed build leaves it
    assert cpu_ext.available()
    assert not (cpu_ext.build_directory() / "lock").exists()


def test_the_build_goes_under_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert cpu_ext.build_directory().parent == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert cpu_ext.build_directory().parent != tmp_path


def test_ops_have_shapes_for_tracing(cpu_kernels):
    with FakeTensorMode():
        x, w = torch.empty(3, 64, dtype=torch.bfloat16), torch.empty(40, 64, dtype=torch.bfloat16)
        assert cpu_ext.linear_bf16(x, w).shape == (3, 40)
        packed, scales = torch.empty(40, 64, dtype=torch.uint8), torch.empty(40, 2)
        assert cpu_ext.linear_quant(x, packed, scales, scales, 4, 64).shape == (3, 40)
        dense = cpu_ext.dequantize(packed, scales, scales, 4, 64, slice(8, 24), torch.bfloat16)
        assert dense.shape == (16, 128) and dense.dtype == torch.bfloat16

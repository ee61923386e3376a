"""The `cpu_kernels` fixture: zili's C++ CPU kernels, built once per machine; `kernels_off`.

Tests that need the kernels skip only when the CPU lacks the instructions (the reason names the
missing flags); on a CPU that has them, a failed build is a test failure, not a skip.
"""

from __future__ import annotations

import pytest

from zili.kernels import cpu_ext


@pytest.fixture
def cpu_kernels(monkeypatch):
    missing = cpu_ext.missing_cpu_flags()
    if missing:
        pytest.skip(f"the CPU lacks {', '.join(missing)} (zili's CPU kernels need AVX512 BF16 + VNNI)")
    monkeypatch.delenv("ZILI_CPU_KERNELS", raising=False)
    available = cpu_ext.available  # (a test may patch it: `kernels_off`)
    available.cache_clear()  # the switch is read once per process
    assert available(), "the CPU has the instructions but the extension did not build (see the warning)"
    yield cpu_ext
    available.cache_clear()


def kernels_off(monkeypatch) -> None:
    """What ZILI_CPU_KERNELS=0 at process start does: every caller uses PyTorch's kernels."""
    monkeypatch.setattr(cpu_ext, "available", lambda: False)

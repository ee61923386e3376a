"""Device detection and capabilities: the one place that knows about cpu / cuda / xpu / npu / mps."""

from __future__ import annotations

import os
import platform

import torch


def best_device() -> str:
    """The fastest device PyTorch can use here, falling back to the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    for name in ("xpu", "npu", "mps"):
        backend = getattr(torch, name, None)
        if backend is not None and hasattr(backend, "is_available") and backend.is_available():
            return name
    return "cpu"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (x86 AVX512-BF16/AMX, Arm BF16)."""
    flags = _cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        return True
    return platform.machine() in ("aarch64", "arm64") and "bf16" in flags


def default_dtype(device: str) -> torch.dtype:
    """bf16 where the device computes it natively, fp32 otherwise."""
    kind = torch.device(device).type
    if kind == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype | None, device: str) -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[name]


def free_memory_bytes(device: str) -> int:
    """Memory available for new allocations on `device`."""
    kind = torch.device(device).type
    if kind == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    if kind == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    backend = getattr(torch, kind, None)
    if backend is not None and hasattr(backend, "mem_get_info"):
        return int(backend.mem_get_info()[0])
    raise RuntimeError(f"cannot query free memory on device {device!r}")

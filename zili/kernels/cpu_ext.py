"""Build and load zili's C++ CPU kernels (torch.ops.zili_cpu) on first use.

The sources in zili/kernels/cpu/ are compiled once per machine with PyTorch's extension tooling
(ninja) into a folder under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions, see
`build_directory`) and reloaded from there; a source change triggers a rebuild. They need
AVX-512 with the BF16 and VNNI extensions: on a CPU without them nothing is built. Any build or
load failure logs one warning and zili keeps using PyTorch's own kernels. ZILI_CPU_KERNELS=0
(read once per process) turns the kernels off; ZILI_CPU_AMX=0 only their AMX path (bf16 weights
then go through the AVX512-BF16 kernel, up to its own row limit).

`MAX_KERNEL_ROWS` is the one dispatch rule for the weight kernels. They read every weight once and compute with
AVX-512 dot products, 8 rows of x at a time, or for bf16 weights on a CPU with AMX with tile
products, 32 rows at a time: they win while the weights' bytes dominate (decode, batched decode).
Larger M (prefill, big batches) goes to PyTorch's oneDNN / AMX GEMM, which is compute-rich here;
quantized weights get there through a dequantized slice at a time. The row ops (RMSNorm, rotary,
gated activation) take bf16 rows at any row count (`use_row_kernel`).
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent / "cpu"
SOURCES = ("ops.cpp", "gemv_bf16.cpp", "gemm_amx_bf16.cpp", "gemv_quant.cpp", "dequantize.cpp", "threads.cpp",
           "pool.cpp", "decode_layer.cpp", "row_ops.cpp", "attention_amx.cpp")
# compiler flag -> the /proc/cpuinfo flag that says the CPU runs it
ISA_FLAGS = {
    "-mavx512f": "avx512f",
    "-mavx512bw": "avx512bw",
    "-mavx512vl": "avx512vl",
    "-mavx512bf16": "avx512_bf16",
    "-mavx512vnni": "avx512_vnni",
}
# Let gemm_amx_bf16.cpp use the AMX intrinsics. Not a build requirement: it checks for AMX at run time
# and runs gemv_bf16 on a CPU without it (the compiler never emits AMX instructions of its own).
AMX_FLAGS = ("-mamx-tile", "-mamx-bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def has_amx() -> bool:
    """True where the bf16 kernels take the AMX path (gemm_amx_bf16.cpp reads ZILI_CPU_AMX the same way)."""
    return {"amx_tile", "amx_bf16"} <= cpu_flags() and os.environ.get("ZILI_CPU_AMX", "1") != "0"


# Rows of x up to which the kernels beat PyTorch. bf16: the AMX kernel (gemm_amx_bf16.cpp) vs oneDNN
# bf16, benchmarks/kernels_bench.py --parts amx --threads 1 --clock cpu: ahead on every benchmark
# shape through 64 rows (896 -> 9728: 1.64 vs 2.57 ms at 16 rows, 2.73 vs 3.28 at 64; 896 -> 32000:
# 10.3 vs 10.9 ms at 64), behind at 128 (4.86 vs 4.18 ms). (Without AMX, gemv_bf16 alone crossed
# oneDNN between 8 and 12 rows: the rule then keeps to 8.) int8/int4 (--parts rows, gate_up, one
# thread): the kernels vs dequantize + oneDNN near 28 (int4: 2.1 vs 3.4 ms at 16 rows, 4.2 vs 3.7
# ms at 32).
# The AMX path runs where the CPU has AMX (and the kernel grants it: Linux >= 5.16, as the cpuinfo
# flags then say) unless ZILI_CPU_AMX=0.
MAX_KERNEL_ROWS = {"bf16": 64 if has_amx() else 8, "quant": 24}


def missing_cpu_flags() -> list[str]:
    flags = cpu_flags()
    return [name for name in ISA_FLAGS.values() if name not in flags]


def build_directory() -> Path:
    """Where the extension is built: under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions)."""
    from torch.utils import cpp_extension

    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()  # the latter ignores it
    return Path(root) / f"zili_cpu_kernels-{python}-torch{torch.__version__}"


def _build() -> None:
    """Compile (or reuse the cached build of) the extension and register torch.ops.zili_cpu."""
    from torch.utils import cpp_extension

    try:  # the `ninja` wheel's binary, when the one on PATH is missing
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    folder = build_directory()
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("loading zili CPU kernels from %s (compiled there on first use)", folder)
    # One process builds at a time. flock is released when its holder dies, unlike torch's own
    # "lock" file, which a killed build leaves behind and every later load waits on forever:
    # holding the flock, any such file is stale.
    with open(folder / "zili-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name="zili_cpu_kernels",
            sources=[str(SOURCE_DIR / name) for name in SOURCES],
            extra_cflags=["-O3", *ISA_FLAGS, *AMX_FLAGS, "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )


def _register_fake_kernels() -> None:
    """Output shapes of the ops for tracing (torch.compile, FakeTensorMode): they have no other meta kernels."""
    def linear_shape(x, weight, *args):
        return x.new_empty(x.shape[0], weight.shape[0])

    def dequantize_shape(weight, scales, zero_scales, zero_point, bits, group_size, row_begin, row_end, dtype):
        return weight.new_empty(row_end - row_begin, scales.shape[1] * group_size, dtype=dtype)

    torch.library.register_fake("zili_cpu::linear_bf16", linear_shape)
    torch.library.register_fake("zili_cpu::linear_quant", linear_shape)
    torch.library.register_fake("zili_cpu::linear_bf16_silu_gated",
                                lambda x, weight, bias: x.new_empty(x.shape[0], weight.shape[0] // 2))
    torch.library.register_fake("zili_cpu::dequantize", dequantize_shape)
    torch.library.register_fake("zili_cpu::rms_norm", lambda x, weight, eps: torch.empty_like(x))
    torch.library.register_fake("zili_cpu::gated_activation",
                                lambda gate_up, activation: gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2))
    torch.library.register_fake("zili_cpu::rotary", lambda x, cos, sin: x.new_empty(x.shape))


@functools.cache
def available() -> bool:
    """True when torch.ops.zili_cpu is enabled and loaded (built on the first call). ZILI_CPU_KERNELS
    is read once per process: every linear layer of every step asks."""
    return os.environ.get("ZILI_CPU_KERNELS", "1") != "0" and _loaded()


@functools.cache
def _loaded() -> bool:
    missing = missing_cpu_flags()
    if missing:
        logger.info("zili CPU kernels not built: the CPU lacks %s", ", ".join(missing))
        return False
    try:
        _build()
        _register_fake_kernels()
    except Exception as exc:  # noqa: BLE001 -- any failure means: use PyTorch's kernels
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        logger.warning("zili CPU kernels unavailable, using PyTorch kernels (%s: %s)", type(exc).__name__, first_line)
        return False
    return True


def use_kernel(kind: str, rows: int) -> bool:
    """The dispatch rule: the `kind` ("bf16" or "quant") kernel takes x with `rows` rows."""
    return 0 < rows <= MAX_KERNEL_ROWS[kind] and available()


def use_row_kernel(*tensors: torch.Tensor, strided: tuple[torch.Tensor, ...] = ()) -> bool:
    """The row ops (rms_norm, gated_activation, rotary) take these tensors: bf16 on the CPU, no autograd,
    contiguous (`tensors`) or with contiguous last dimensions only (`strided`: rotary's q / k views).
    They replace several PyTorch elementwise ops each, at any row count (decode to prefill)."""
    everything = (*tensors, *strided)
    if any(t.dtype is not torch.bfloat16 or not t.is_cpu for t in everything):
        return False
    if not all(t.is_contiguous() for t in tensors) or any(t.stride(-1) != 1 for t in strided):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in everything):
        return False  # the ops have no backward
    return available()


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) bf16/fp32 @ weight (N, K) bf16 .T (+ bias) -> (M, N) in x's dtype."""
    return torch.ops.zili_cpu.linear_bf16(x, weight, bias)


def linear_bf16_silu_gated(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 x (M, K), weight (2I, K) = [gate | up] -> bf16(bf16(silu(gate)) * up) (M, I), gate and up = x @ their
    rows .T (+ bias) rounded to bf16: the fused decode layers' gate_up and gate in one pass on AMX (bit for bit
    linear_bf16 then gated_activation, which it runs where AMX does not apply)."""
    return torch.ops.zili_cpu.linear_bf16_silu_gated(x, weight, bias)


def _zero_args(zeros: torch.Tensor | float) -> tuple[torch.Tensor | None, float]:
    """The ops' (zero_scales, zero_point) for `zeros`: scales * zeros (N, G), or one zero point for all groups."""
    return (zeros, 0.0) if isinstance(zeros, torch.Tensor) else (None, float(zeros))


def linear_quant(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | float,
                 bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ W.T for W = (codes - zeros) * scales packed by zili.kernels.quant_kernels; `zeros`: the
    zero_scales (scales * zeros, (N, G)), or the one zero point of every group."""
    return torch.ops.zili_cpu.linear_quant(x, weight, scales, *_zero_args(zeros), bits, group_size, bias)


def dequantize(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | float, bits: int, group_size: int,
               rows: slice, dtype: torch.dtype) -> torch.Tensor:
    """Rows `rows` (a step-1 slice) of a `linear_quant` weight as a dense (rows, K) `dtype` tensor."""
    start, stop, _ = rows.indices(weight.shape[0])
    return torch.ops.zili_cpu.dequantize(weight, scales, *_zero_args(zeros), bits, group_size, start, stop, dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """bf16 x (..., H) -> bf16(weight * bf16(x * rsqrt(mean(x^2) + eps))), contiguous bf16 x and weight."""
    return torch.ops.zili_cpu.rms_norm(x, weight, eps)


def gated_activation(gate_up: torch.Tensor, activation: int) -> torch.Tensor:
    """bf16 gate_up (..., 2I) = [gate | up] -> bf16(bf16(act(gate)) * up) (..., I); `activation` is an
    ACTIVATION_CODES value."""
    return torch.ops.zili_cpu.gated_activation(gate_up, activation)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """bf16 x (T, heads, head_dim), channels contiguous; contiguous bf16 cos / sin (T, rotary_dim) -> x with
    rotate-half rotary on its first rotary_dim channels, as zili.layers.rotary.apply_rotary (contiguous)."""
    return torch.ops.zili_cpu.rotary(x, cos, sin)

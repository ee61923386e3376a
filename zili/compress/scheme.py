"""What a quantization run does: the scheme (bits, groups, symmetry) and the method's options.

Both are validated on construction; bad values raise InvalidRequestError naming the parameter.
They are recorded in the output's config.json, never in a file name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zili.errors import InvalidRequestError
from zili.validation import require, require_each

METHODS = ("rtn", "gptq", "awq")
BITS = (4, 8)


@dataclass(frozen=True)
class QuantScheme:
    """Weight-only integer quantization of Linear layers."""

    bits: int = 4
    """Bits per weight: 4 or 8."""
    group_size: int | None = 128
    """Input columns sharing one scale / zero point; None = one per output channel."""
    symmetric: bool = True
    """Symmetric: zero point fixed at 2**(bits-1); asymmetric: a zero point per group."""

    def __post_init__(self):
        require(self.bits in BITS, "bits", f"bits must be 4 or 8, got {self.bits}")
        require(self.group_size is None or (isinstance(self.group_size, int) and self.group_size > 0), "group_size",
                f"group size must be a positive integer or None (per channel), got {self.group_size!r}")

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def mid_code(self) -> int:
        """The symmetric zero point, 2**(bits-1)."""
        return 1 << (self.bits - 1)

    def group_size_for(self, in_features: int) -> int:
        """Columns per group for a weight with `in_features` inputs (all of them per channel)."""
        return in_features if self.group_size is None else self.group_size

    def check_divides(self, in_features: int, where: str) -> None:
        if self.group_size is not None and in_features % self.group_size:
            fits = [str(g) for g in (256, 128, 64, 32, 16, 8) if in_features % g == 0][:3]
            raise InvalidRequestError(
                f"group size {self.group_size} does not divide the input dimension {in_features} of {where}; "
                f"choose {', '.join(fits) + ' or ' if fits else ''}'channel' (per-channel)",
                param="group_size")

    def describe(self) -> str:
        groups = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits} {groups} {'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class QuantizeOptions:
    """One `zili quantize` run."""

    method: str = "rtn"
    """rtn, gptq or awq."""
    scheme: QuantScheme = field(default_factory=QuantScheme)
    quantize_lm_head: bool = False
    """Also quantize lm_head (unties it from the embeddings when they are shared)."""
    act_order: bool = False
    """GPTQ: process columns by decreasing Hessian diagonal (static groups, so no g_idx is needed)."""
    damp_percent: float = 0.01
    """GPTQ: dampening added to the Hessian diagonal, as a fraction of its mean."""
    block_size: int = 128
    """GPTQ: columns per lazy-update block."""
    calib_windows: int = 64
    """Calibration token windows (GPTQ / AWQ)."""
    calib_window_tokens: int = 512
    """Tokens per calibration window (at most the model's context)."""
    awq_grid: int = 20
    """AWQ: number of alpha values tried in [0, 1)."""
    awq_max_tokens: int = 2048
    """AWQ: calibration tokens kept per layer for the scale and clipping searches."""
    seed: int = 0

    def __post_init__(self):
        require(self.method in METHODS, "method",
                f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")
        require(0 <= self.damp_percent < 1, "damp_percent", "damp_percent must be in [0, 1)")
        require_each(self, ("block_size", "calib_windows", "calib_window_tokens", "awq_grid", "awq_max_tokens"),
                     lambda value: value > 0, "{name} must be positive")

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq")

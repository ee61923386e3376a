"""`zili quantize MODEL -o OUT --method rtn|gptq|awq --bits 4|8 [--group-size N|channel]`: write a
quantized copy of a model (compressed-tensors pack-quantized, loadable by zili and vLLM)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zili.devices import DTYPES


PER_CHANNEL = 0


def parse_group_size(value: str) -> int:
    """'channel' (or -1 / 0) -> PER_CHANNEL, else the integer."""
    if value.lower() in ("channel", "per-channel", "-1", "0"):
        return PER_CHANNEL
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer or 'channel', got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from zili.compress.scheme import METHODS, QuantizeOptions

    defaults = QuantizeOptions()
    parser.add_argument("model", nargs="?", default=None, type=Path,
                        help="model folder to quantize (default: the bundled demo model)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="folder for the quantized model")
    parser.add_argument("--method", default="rtn", help=f"{', '.join(METHODS)} (default: rtn)")
    parser.add_argument("--bits", type=int, default=4, help="4 or 8 (default: 4)")
    parser.add_argument("--group-size", type=parse_group_size, default=None,
                        help="input columns per scale: 32, 64, 128 ... or 'channel' (default: 128 for "
                             "4-bit, or the largest power of two below it that fits the model; channel for 8-bit)")
    symmetry = parser.add_mutually_exclusive_group()
    symmetry.add_argument("--sym", dest="symmetric", action="store_true", default=None,
                          help="symmetric (no zero points; default for rtn and gptq)")
    symmetry.add_argument("--asym", dest="symmetric", action="store_false",
                          help="asymmetric, a zero point per group (default for awq)")
    parser.add_argument("--calib", type=Path, default=None,
                        help="calibration text for gptq / awq (default: the demo model's held-out text)")
    parser.add_argument("--calib-windows", type=int, default=defaults.calib_windows,
                        help=f"calibration windows (default: {defaults.calib_windows})")
    parser.add_argument("--calib-window-tokens", type=int, default=defaults.calib_window_tokens,
                        help=f"tokens per calibration window (default: {defaults.calib_window_tokens})")
    parser.add_argument("--act-order", action="store_true", help="gptq: columns by decreasing activation energy")
    parser.add_argument("--damp", type=float, default=defaults.damp_percent,
                        help=f"gptq: Hessian dampening fraction (default: {defaults.damp_percent})")
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="also quantize lm_head (embeddings always stay in full precision)")
    parser.add_argument("--device", default="cpu", help="device to calibrate on (default: cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                        help="calibration compute dtype (default: float32); weights and scales are "
                             "saved in the checkpoint's dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from zili.compress.quantize import fitting_group_size, quantize_model
    from zili.compress.scheme import QuantizeOptions, QuantScheme
    from zili.config import ModelConfig
    from zili.llm import default_model_path

    model = args.model or default_model_path()
    group_size = args.group_size
    if group_size is None and args.bits == 4:  # 128 where it fits every layer, else the largest that does
        group_size = fitting_group_size(ModelConfig.from_folder(model))
        if group_size != 128:
            print(f"note: group size {group_size}, the largest power of two up to 128 that divides every "
                  "layer's input dimension", file=sys.stderr)
    group_size = None if group_size in (None, PER_CHANNEL) else group_size
    symmetric = args.symmetric if args.symmetric is not None else args.method != "awq"
    options = QuantizeOptions(method=args.method, scheme=QuantScheme(args.bits, group_size, symmetric),
                              quantize_lm_head=args.quantize_lm_head, act_order=args.act_order,
                              damp_percent=args.damp, calib_windows=args.calib_windows,
                              calib_window_tokens=args.calib_window_tokens)
    calib = args.calib
    if calib is None and options.needs_calibration:
        calib = default_model_path() / "heldout.txt"
    result = quantize_model(model, args.output, options, calib=calib, device=args.device, dtype=args.dtype,
                            overwrite=args.overwrite, progress=True)
    calibration = f", calibrated on {result.calibration_tokens} tokens" if result.calibration_tokens else ""
    print(f"wrote {result.output}: {args.method} {options.scheme.describe()}, {result.quantized_layers} "
          f"layers, {result.size_bytes / 2**20:.1f} MiB{calibration}, {result.seconds:.1f} s", file=sys.stderr)
    return 0

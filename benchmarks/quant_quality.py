"""Quantization quality on the bundled demo model: held-out perplexity of bf16, int8 RTN and int4
RTN / GPTQ / AWQ, as a markdown table (for docs/benchmarks.md).

    python benchmarks/quant_quality.py                       # demo model, Shakespeare held-out text
    python benchmarks/quant_quality.py --model DIR --text FILE --calib FILE --group-size 128 --out table.md

Calibration (GPTQ / AWQ) reads the training corpus, never the evaluated text. The int4 group size
is the requested one if it divides every Linear input of the model, else the largest power of two
that does (the table says which). Goals checked: int8 within 0.5% of bf16; GPTQ and AWQ recover
at least half of RTN's perplexity gap to bf16.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from zili.compress.quantize import quantize_model  # noqa: E402
from zili.compress.scheme import QuantizeOptions, QuantScheme  # noqa: E402
from zili.config import ModelConfig  # noqa: E402
from zili.eval.perplexity import perplexity  # noqa: E402
from zili.models.loader import load_model  # noqa: E402
from zili.models.tokenizer import Tokenizer  # noqa: E402

DEMO = REPO / "models" / "zili-demo"
CORPUS = REPO / "data" / "shakespeare"


def linear_inputs(config: ModelConfig) -> list[int]:
    return [config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size]


def pick_group_size(config: ModelConfig, wanted: int) -> int:
    size = wanted
    while size > 1 and any(dim % size for dim in linear_inputs(config)):
        size //= 2
    return size


def evaluate(folder: Path, ids: list[int], window: int, dtype: torch.dtype):
    model, _ = load_model(folder, device="cpu", dtype=dtype)
    result = perplexity(model, ids, window)
    del model
    gc.collect()
    return result


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO)
    parser.add_argument("--text", type=Path, default=None, help="evaluated text (default: the model's heldout.txt)")
    parser.add_argument("--calib", type=Path, default=CORPUS / "train.txt", help="calibration text")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--asym", action="store_true", help="asymmetric int4 (default: symmetric)")
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    parser.add_argument("--no-per-channel-rows", dest="per_channel_rows", action="store_false",
                        help="skip the extra int4 per-channel RTN / GPTQ / AWQ rows")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = ModelConfig.from_folder(args.model)
    text_path = args.text or args.model / "heldout.txt"
    ids = Tokenizer.from_folder(args.model).encode(text_path.read_text(encoding="utf-8"))
    ids = ids[: args.max_tokens] if args.max_tokens else ids
    window = min(config.max_position_embeddings, len(ids))
    group = pick_group_size(config, args.group_size)
    symmetric = not args.asym
    calib = dict(calib_windows=args.calib_windows, calib_window_tokens=min(512, config.max_position_embeddings))
    int4 = QuantScheme(4, group, symmetric)
    variants = [
        ("bf16", None),
        ("int8 RTN", QuantizeOptions("rtn", QuantScheme(8, None, True))),
        ("int4 RTN", QuantizeOptions("rtn", int4)),
        ("int4 GPTQ", QuantizeOptions("gptq", int4, **calib)),
        ("int4 GPTQ act-order", QuantizeOptions("gptq", int4, act_order=True, **calib)),
        ("int4 AWQ", QuantizeOptions("awq", int4, **calib)),
    ]
    if args.per_channel_rows:  # a coarser int4 shows the calibrated methods' gains more clearly
        channel = QuantScheme(4, None, symmetric)
        variants += [("int4 RTN per-channel", QuantizeOptions("rtn", channel)),
                     ("int4 GPTQ per-channel", QuantizeOptions("gptq", channel, **calib)),
                     ("int4 AWQ per-channel", QuantizeOptions("awq", channel, **calib))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="quant-quality-") as work:
        for name, options in variants:
            folder, seconds = args.model, 0.0
            if options is not None:
                folder = Path(work) / name.replace(" ", "-")
                start = time.perf_counter()
                quantize_model(args.model, folder, options, calib=args.calib, progress=False)
                seconds = time.perf_counter() - start
            result = evaluate(folder, ids, window, torch.bfloat16)
            rows.append((name, options, result, seconds, folder_mib(folder)))
            print(f"{name}: perplexity {result.perplexity:.4f} ({result.seconds:.1f} s)", file=sys.stderr)

    base = rows[0][2].perplexity
    rtn4 = next(r[2].perplexity for r in rows if r[0] == "int4 RTN")
    lines = [
        f"Model `{args.model.name}` ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"intermediate {config.intermediate_size}); held-out text `{text_path.name}`, {rows[0][2].tokens} tokens "
        f"scored, window {window}, stride {rows[0][2].stride}; bf16 activations; calibration: "
        f"{args.calib_windows} windows of `{args.calib.name}`; checkpoint dtype {config.torch_dtype} "
        "(embeddings and norms stay in it).",
        "",
    ]
    if group != args.group_size:
        lines += [f"int4 uses group size {group}: {args.group_size} does not divide every Linear input "
                  f"({', '.join(map(str, linear_inputs(config)))}).", ""]
    lines += ["| variant | scheme | perplexity | vs bf16 | RTN gap recovered | checkpoint MiB | quantize s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    rtn_of = {"": rtn4, " per-channel": next((r[2].perplexity for r in rows if r[0] == "int4 RTN per-channel"), None)}
    for name, options, result, seconds, mib in rows:
        scheme = "-" if options is None else options.scheme.describe()
        delta = f"{100 * (result.perplexity / base - 1):+.2f}%"
        recovered = "-"
        rtn = rtn_of[" per-channel" if name.endswith("per-channel") else ""]
        if name.startswith("int4") and "RTN" not in name and rtn > base:
            recovered = f"{100 * (rtn - result.perplexity) / (rtn - base):.0f}%"
        lines.append(f"| {name} | {scheme} | {result.perplexity:.3f} | {delta} | {recovered} | {mib:.1f} | "
                     f"{seconds:.0f} |")
    int8 = next(r[2].perplexity for r in rows if r[0] == "int8 RTN")
    gptq = next(r[2].perplexity for r in rows if r[0] == "int4 GPTQ")
    awq = next(r[2].perplexity for r in rows if r[0] == "int4 AWQ")
    half_gap = base + (rtn4 - base) / 2
    lines += ["", f"Goals: int8 within 0.5% of bf16: {'met' if abs(int8 / base - 1) <= 0.005 else 'missed'}; "
                  f"GPTQ recovers half of RTN's gap: {'met' if gptq <= half_gap else 'missed'}; "
                  f"AWQ: {'met' if awq <= half_gap else 'missed'}."]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

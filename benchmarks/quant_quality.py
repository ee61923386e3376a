"""Quantization quality on the bundled demo model: held-out perplexity of bf16, int8 RTN and int4
RTN / GPTQ / AWQ, as a markdown table (for docs/benchmarks.md).

    python benchmarks/quant_quality.py                       # demo model, Shakespeare held-out text
    python benchmarks/quant_quality.py --model DIR --text FILE --calib FILE --group-size 128 --out table.md

Calibration (GPTQ / AWQ) never sees the evaluated text: without --calib, the held-out text is cut
in two at a line break, the first half calibrates and the second half is evaluated. The int4 group size
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

from zili.compress.quantize import fitting_group_size, linear_input_sizes, quantize_model  # noqa: E402
from zili.compress.scheme import QuantizeOptions, QuantScheme  # noqa: E402
from zili.config import ModelConfig  # noqa: E402
from zili.eval.full_sequence import FullSequenceAttention  # noqa: E402
from zili.eval.perplexity import perplexity, window_spans  # noqa: E402
from zili.models.loader import load_model  # noqa: E402
from zili.models.tokenizer import Tokenizer  # noqa: E402

DEMO = REPO / "models" / "zili-demo"


@torch.no_grad()
def kl_to_reference(model, reference, ids: list[int], window: int, stride: int) -> float:
    """Mean KL(reference || model) in nats per scored token, over the perplexity windows: a far
    more sensitive measure of what quantization changed than perplexity itself."""
    tokens = torch.tensor(ids)
    total, count = 0.0, 0
    for begin, end, first in window_spans(len(tokens), window, stride):
        part, positions = tokens[begin:end], torch.arange(end - begin)
        logprobs = [torch.log_softmax(m.compute_logits(m(part, positions, FullSequenceAttention())[first - 1:-1]), -1)
                    for m in (reference, model)]
        total += float((logprobs[0].exp() * (logprobs[0] - logprobs[1])).sum())
        count += logprobs[0].shape[0]
    return total / count


def evaluate(folder: Path, reference, ids: list[int], window: int, dtype: torch.dtype):
    model, _ = load_model(folder, device="cpu", dtype=dtype)
    result = perplexity(model, ids, window)
    kl = kl_to_reference(model, reference, ids, window, result.stride)
    del model
    gc.collect()
    return result, kl


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO)
    parser.add_argument("--text", type=Path, default=None, help="evaluated text (default: the model's heldout.txt)")
    parser.add_argument("--calib", type=Path, default=None,
                        help="calibration text (default: the first half of the held-out text)")
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
    text = text_path.read_text(encoding="utf-8")
    work_dir = tempfile.TemporaryDirectory(prefix="quant-quality-")
    calib_note, eval_note = (f"`{args.calib.name}`", f"`{text_path.name}`") if args.calib else (
        f"the first half of `{text_path.name}`", f"the second half of `{text_path.name}`")
    if args.calib is None:
        cut = text.find("\n", len(text) // 2) + 1
        args.calib = Path(work_dir.name) / "calibration.txt"
        args.calib.write_text(text[:cut], encoding="utf-8")
        text = text[cut:]
    ids = Tokenizer.from_folder(args.model).encode(text)
    ids = ids[: args.max_tokens] if args.max_tokens else ids
    window = min(config.max_position_embeddings, len(ids))
    group = fitting_group_size(config, args.group_size)
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
    reference, _ = load_model(args.model, device="cpu", dtype=torch.bfloat16)
    rows = {}
    with work_dir as work:
        for name, options in variants:
            folder, seconds = args.model, 0.0
            if options is not None:
                folder = Path(work) / name.replace(" ", "-")
                start = time.perf_counter()
                quantize_model(args.model, folder, options, calib=args.calib, progress=False)
                seconds = time.perf_counter() - start
            result, kl = evaluate(folder, reference, ids, window, torch.bfloat16)
            rows[name] = (options, result, kl, seconds, folder_mib(folder))
            print(f"{name}: perplexity {result.perplexity:.4f}, KL {kl:.2e} ({result.seconds:.1f} s)", file=sys.stderr)

    first = rows["bf16"][1]
    base = first.perplexity
    lines = [
        f"Model `{args.model.name}` ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"intermediate {config.intermediate_size}); evaluated on {eval_note}, {first.tokens} tokens "
        f"scored, window {window}, stride {first.stride}; bf16 activations; calibration: "
        f"up to {args.calib_windows} windows of {calib_note}; checkpoint dtype {config.torch_dtype} "
        "(embeddings and norms stay in it). KL: mean KL(bf16 || variant) per token, in millinats.",
        "",
    ]
    if group != args.group_size:
        lines += [f"int4 uses group size {group}: {args.group_size} does not divide every Linear input "
                  f"({', '.join(map(str, linear_input_sizes(config).values()))}).", ""]
    lines += ["| variant | scheme | perplexity | vs bf16 | KL (mnats) | RTN ppl gap recovered | RTN KL recovered "
              "| checkpoint MiB | quantize s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def rtn_row(name: str) -> str:
        return "int4 RTN per-channel" if name.endswith("per-channel") else "int4 RTN"

    def recovered(name: str, index: int, zero: float) -> float | None:
        """Fraction of RTN's loss (ppl gap when index=1, KL when 2) the variant wins back."""
        if not name.startswith("int4") or "RTN" in name or rtn_row(name) not in rows:
            return None
        rtn = rows[rtn_row(name)][index]
        rtn, value = (rtn.perplexity, rows[name][index].perplexity) if index == 1 else (rtn, rows[name][index])
        return (rtn - value) / (rtn - zero) if rtn > zero else None

    for name, (options, result, kl, seconds, mib) in rows.items():
        scheme = "-" if options is None else options.scheme.describe()
        ppl_back, kl_back = recovered(name, 1, base), recovered(name, 2, 0.0)
        lines.append(f"| {name} | {scheme} | {result.perplexity:.3f} | {100 * (result.perplexity / base - 1):+.2f}% "
                     f"| {1000 * kl:.2f} | {'-' if ppl_back is None else f'{100 * ppl_back:.0f}%'} "
                     f"| {'-' if kl_back is None else f'{100 * kl_back:.0f}%'} | {mib:.1f} | {seconds:.0f} |")
    int8_gap = rows["int8 RTN"][1].perplexity / base - 1
    rtn_gap = rows["int4 RTN"][1].perplexity / base - 1
    goals = [f"int8 within 0.5% of bf16: {'met' if abs(int8_gap) <= 0.005 else 'missed'} ({100 * int8_gap:+.2f}%)"]
    for method in ("GPTQ", "AWQ"):
        ppl_back, kl_back = recovered(f"int4 {method}", 1, base), recovered(f"int4 {method}", 2, 0.0)
        if rtn_gap < 0.001:
            verdict = f"perplexity gap not measurable (int4 RTN within 0.1% of bf16); KL recovered {100 * kl_back:.0f}%"
        else:
            verdict = f"{'met' if ppl_back >= 0.5 else 'missed'} ({100 * ppl_back:.0f}% of the perplexity gap)"
        goals.append(f"int4 {method} recovers half of RTN's gap: {verdict}")
    lines += ["", "Goals: " + "; ".join(goals) + "."]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

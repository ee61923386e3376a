"""zili against transformers on an accelerator: the GPU table of issue 7 (PERFORMANCE.md's workload).

bf16 batch-1 decode (128 tokens after a short prompt), prefill (512 tokens) and a batch of 16, each
engine in its own process (offline_zili.py / offline_transformers.py with --device), `--reps` rounds
that alternate the engines; the decode bound is the device memory's read rate over a buffer the size
of the weights (a sum, timed with the device synchronized), as on the CPU. llama.cpp is not built
here: the device machine has no network and no llama.cpp source build for CUDA.

One command on the device machine (its python3 holds PyTorch with CUDA, transformers, tokenizers,
safetensors and sentencepiece; the checkpoint is made there when missing):

    PYTHONPATH=. python3 benchmarks/gpu_bench.py --device cuda --out $OUT/benchmarks-gpu.md

Prints the table and one JSON object; --out also writes the table (markdown) and, beside it, the JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common import MODEL_DIR, log, median, run_child, safetensors_bytes_per_token
from make_checkpoint import make_checkpoint


def device_read_gbps(num_bytes: int, device: str, reps: int) -> list[float]:
    """GB/s of a sum over a float32 buffer of num_bytes on `device` (the read that decode's weights need)."""
    buffer = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if buffer.is_cuda else (lambda: None)
    buffer.sum()
    sync()
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        buffer.sum()
        sync()
        rates.append(buffer.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return rates


def measure(args: argparse.Namespace) -> dict:
    model = make_checkpoint(Path(args.model))
    weight_bytes = safetensors_bytes_per_token(model)
    common = ["--model", str(model), "--device", args.device, "--reps", "1", "--figures", "prefill,decode,batch",
              "--prefill-tokens", str(args.prefill_tokens), "--decode-tokens", str(args.decode_tokens),
              "--batch", str(args.batch)]
    rounds: dict[str, list[dict]] = {"zili": [], "transformers": []}
    bandwidth: list[float] = []
    for rep in range(1, args.reps + 1):
        bandwidth += device_read_gbps(weight_bytes, args.device, 5)
        log(f"round {rep}/{args.reps}: read {max(bandwidth):.0f} GB/s best so far")
        rounds["zili"].append(run_child("offline_zili.py", [*common, "--grouped-steps", "0"], f"gpu-zili-{rep}", 3600))
        rounds["transformers"].append(run_child("offline_transformers.py", common, f"gpu-transformers-{rep}", 3600))
    figures = {engine: {key: median([r[key] for r in results]) for key in ("decode_tok_s", "prefill_tok_s",
                                                                             "batch_tok_s")}
               for engine, results in rounds.items()}
    best = max(bandwidth)
    return {"device": args.device, "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
            else "cpu", "torch": torch.__version__, "weight_bytes": weight_bytes, "read_gbps_best": best,
            "read_gbps_median": median(bandwidth), "bound_tok_s": best * 1e9 / weight_bytes, "figures": figures,
            "settings": {"prefill_tokens": args.prefill_tokens, "decode_tokens": args.decode_tokens,
                         "batch": args.batch, "reps": args.reps}, "rounds": rounds}


def table(result: dict) -> list[str]:
    zili, peer = result["figures"]["zili"], result["figures"]["transformers"]
    bound, settings = result["bound_tok_s"], result["settings"]
    lines = [f"{result['device_name']} ({result['device']}), torch {result['torch']}: read "
             f"{result['read_gbps_best']:.0f} GB/s best over {result['weight_bytes'] / 1e6:.0f} MB of weights, "
             f"a decode bound of {bound:.0f} tok/s.", "",
             f"Median of {settings['reps']} rounds, engines alternated.", "",
             "| figure (bf16) | zili | transformers | zili / transformers | zili % of bound |", "|---|---|---|---|---|"]
    for name, key in ((f"decode tok/s, batch 1, {settings['decode_tokens']} tokens", "decode_tok_s"),
                      (f"prefill tok/s, {settings['prefill_tokens']} tokens", "prefill_tok_s"),
                      (f"throughput tok/s, batch of {settings['batch']}", "batch_tok_s")):
        share = f"{100 * zili[key] / bound:.0f}%" if key == "decode_tok_s" else "—"
        lines.append(f"| {name} | {zili[key]:,.1f} | {peer[key]:,.1f} | {zili[key] / peer[key]:.2f}x | {share} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", help="write the table here (markdown) and the JSON beside it")
    args = parser.parse_args(argv)
    result = measure(args)
    lines = table(result)
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.write_text("\n".join(["# zili on an accelerator (benchmarks/gpu_bench.py)", "", *lines, ""]))
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""zili's CPU kernels (zili/kernels) against PyTorch's, per layer and for a whole decode.

1. Per-layer GEMV at M=1 on the benchmark model's shapes: GB/s of weights read per second for
   torch bf16 F.linear, zili bf16, torch _weight_int8pack_mm, zili int8, torch
   _weight_int4pack_mm_for_cpu, zili int4 (group 128), next to the streaming-read bandwidth of a
   buffer as large as the weights cycled through. Each variant cycles through enough copies of
   the layer to fill that buffer, so the weights come from DRAM as in a real decode step.
2. AMX table (--parts amx): bf16 x bf16 at M = 1..32 rows (--amx-rows) on every benchmark shape, zili's
   AMX kernel vs its AVX512-BF16 gemv_bf16 vs F.linear (oneDNN), in ms and GB/s of weights read; sets
   the AMX / gemv crossover (gemm_amx_bf16.cpp kAmxMinRows) and MAX_KERNEL_ROWS["bf16"].
3. Rows sweep (gate_up shape): time per call at M = 1..32 for each path, the crossover that sets
   zili.kernels.cpu_ext.MAX_KERNEL_ROWS.
4. quant (--parts quant): zili's int8 / int4 kernels alone (torch.ops.zili_cpu.linear_quant) at M = 1, 2, 4, 8, 16
   on the four layer shapes, int8 per channel, int4 groups of 128 and of 32, next to zili bf16:
   GB/s of weight bytes (codes + scales + zero_scales where the zero points vary) per second against
   the streaming read, and the fixed cost of one call (a 16-row layer whose weights stay in cache;
   next to it, the cost of a trivial op through the same dispatcher) that every one of the 96 linears
   of a token pays.
5. Whole-model batch-1 decode tok/s through zili.LLM's engine (128 tokens after a 16-token
   prompt, one child process per run) with and without the kernels (ZILI_CPU_KERNELS=0), bf16
   and, where benchmarks/work/quantized/ has them, int8 / int4; "% of bound" = tok/s x weight
   bytes / the streaming-read bandwidth measured over a buffer as large as the weights.

    python benchmarks/kernels_bench.py [--threads 2] [--reps 5] [--parts layers,amx,rows,quant,model]

Timings are medians; the load average is reported because the machine may be shared. On a busy
machine, `--threads 1 --clock cpu` times this thread's CPU time instead of wall time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bandwidth import read_bandwidth
from common import MODEL_DIR, QUANT_DIR, REPO_DIR, RESULTS_DIR, emit, log, median, safetensors_bytes_per_token

sys.path.insert(0, str(REPO_DIR))
from zili.huge_pages import move_to_huge_pages  # noqa: E402
from zili.kernels import cpu_ext  # noqa: E402
from zili.kernels.quant_kernels import CpuVnniInt4Kernel, CpuVnniInt8Kernel  # noqa: E402
from zili.layers.quantized.weight import QuantizedWeight  # noqa: E402

# name -> (K = in_features, N = out_features) of the benchmark model (hidden 896, intermediate 4864)
SHAPES = {"qkv": (896, 1152), "o_proj": (896, 896), "gate_up": (896, 9728), "down": (4864, 896),
          "lm_head": (896, 32000)}
GROUP = 128


def quantized(weight: torch.Tensor, bits: int, group: int) -> QuantizedWeight:
    """Symmetric round-to-nearest quantization of a float (N, K) weight."""
    n, k = weight.shape
    w = weight.float().view(n, k // group, group)
    half = 1 << (bits - 1)
    scales = w.abs().amax(-1).clamp_min(1e-8) / (half - 1)
    codes = (torch.round(w / scales[..., None]) + half).clamp(0, 2 * half - 1).to(torch.uint8).view(n, k)
    return QuantizedWeight(codes, scales, torch.full_like(codes[:, :k // group], half), bits, group)


def variants(weight: torch.Tensor) -> dict:
    """name -> (weight bytes, state, call(x, state)); x is bf16 (M, K), as in a bf16 decode."""
    n, k = weight.shape
    q8, q4 = quantized(weight, 8, k), quantized(weight, 4, GROUP)
    int8 = (q8.codes.to(torch.int16) - 128).to(torch.int8)
    int4_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.codes.to(torch.int32), 2)
    offsets = (8 - q4.zeros.float()) * q4.scales
    int4_sz = torch.stack([q4.scales, offsets], -1).transpose(0, 1).bfloat16().contiguous()
    z8, z4 = CpuVnniInt8Kernel(q8), CpuVnniInt4Kernel(q4)
    scale_bytes = lambda q: q.scales.numel() * 4  # noqa: E731
    return {
        "torch-bf16": (2 * n * k, weight, lambda x, w: F.linear(x, w)),
        "zili-bf16": (2 * n * k, weight, lambda x, w: cpu_ext.linear_bf16(x, w)),
        "torch-int8": (n * k + 2 * n, (int8, q8.scales.view(-1).bfloat16()),
                       lambda x, s: torch.ops.aten._weight_int8pack_mm(x, *s)),
        "zili-int8": (n * k + 2 * scale_bytes(q8), z8, lambda x, z: z.kernel_matmul(x)),
        "torch-int4": (n * k // 2 + int4_sz.numel() * 2, (int4_packed, int4_sz),
                       lambda x, s: torch.ops.aten._weight_int4pack_mm_for_cpu(x, s[0], GROUP, s[1])),
        "zili-int4": (n * k // 2 + 2 * scale_bytes(q4), z4, lambda x, z: z.kernel_matmul(x)),
        "zili-int4-dequant": (n * k // 2 + 2 * scale_bytes(q4), z4, lambda x, z: z.dequantized_matmul(x)),
    }


def copies_of(state, count: int) -> list:
    """`count` independent copies (the same values, separate memory) of a weight state."""
    def clone(s):
        if isinstance(s, torch.Tensor):
            return s.clone()
        if isinstance(s, tuple):
            return tuple(clone(t) for t in s)
        if isinstance(s, float):  # a zero point shared by every group
            return s
        copy = type(s).__new__(type(s))
        copy.__dict__.update(s.__dict__)
        copy._buffers = {name: None if b is None else b.clone() for name, b in s._buffers.items()}
        return copy
    copies = [state] + [clone(state) for _ in range(count - 1)]
    on_huge_pages(copies)
    return copies


def on_huge_pages(states: list) -> None:
    """Every tensor of `states` onto huge-page arenas, as zili's loader places a model's weights (the
    streaming-read figure beside it reads huge pages too, where the system has them)."""
    holder = torch.nn.Module()
    def collect(s):
        if isinstance(s, torch.Tensor):
            holder.register_buffer(f"t{len(holder._buffers)}", s)
        elif isinstance(s, tuple):
            for t in s:
                collect(t)
        elif isinstance(s, float):
            pass
        else:
            for b in s.buffers():
                collect(b)
    for s in states:
        collect(s)
    move_to_huge_pages(holder)


CLOCK = time.perf_counter  # --clock cpu: this thread's CPU time (one thread; robust to a busy machine)


def seconds_per_call(call, states: list, x: torch.Tensor, reps: int) -> float:
    for state in states:  # warm-up pass
        call(x, state)
    samples = []
    for _ in range(reps):
        start = CLOCK()
        for state in states:
            call(x, state)
        samples.append((CLOCK() - start) / len(states))
    return median(samples)


def streaming_read(num_bytes: int, reps: int) -> dict:
    """GB/s of a float32 sum over `num_bytes` (bandwidth.read_bandwidth), timed with CLOCK."""
    return read_bandwidth(num_bytes, torch.get_num_threads(), reps, clock=CLOCK)


def layer_table(target_bytes: int, reps: int, names: list[str]) -> list[dict]:
    rows = []
    for layer, (k, n) in SHAPES.items():
        weight = (torch.randn(n, k) * 0.02).bfloat16()
        x = torch.randn(1, k).bfloat16()
        for name, (nbytes, state, call) in variants(weight).items():
            if name not in names:
                continue
            states = copies_of(state, max(1, math.ceil(target_bytes / nbytes)))
            seconds = seconds_per_call(call, states, x, reps)
            rows.append({"layer": layer, "K": k, "N": n, "variant": name, "bytes": nbytes,
                         "us": seconds * 1e6, "gbps": nbytes / seconds / 1e9})
            log(f"{layer:8s} {name:18s} {seconds * 1e6:9.1f} us {nbytes / seconds / 1e9:6.1f} GB/s")
            del states
    return rows


def rows_sweep(target_bytes: int, reps: int, ms: list[int], names: list[str]) -> list[dict]:
    k, n = SHAPES["gate_up"]
    weight = (torch.randn(n, k) * 0.02).bfloat16()
    results = []
    for name, (nbytes, state, call) in variants(weight).items():
        if name not in names:
            continue
        states = copies_of(state, max(1, math.ceil(target_bytes / nbytes)))
        for m in ms:
            seconds = seconds_per_call(call, states, torch.randn(m, k).bfloat16(), reps)
            results.append({"variant": name, "M": m, "us": seconds * 1e6})
            log(f"gate_up M={m:3d} {name:18s} {seconds * 1e6:9.1f} us")
        del states
    return results


def amx_table(target_bytes: int, reps: int, ms: list[int]) -> list[dict]:
    """bf16 weight x bf16 x at M rows on every benchmark shape: zili's AMX kernel, zili's AVX512-BF16
    gemv_bf16 and F.linear (oneDNN), interleaved per repetition (torch.ops.zili_cpu.set_bf16_matmul_path
    forces the zili path); GB/s of weights read."""
    ops = torch.ops.zili_cpu
    paths = {"zili-amx": "amx", "zili-gemv": "gemv"}
    rows = []
    try:
        for layer, (k, n) in SHAPES.items():
            weight = (torch.randn(n, k) * 0.02).bfloat16()
            nbytes = 2 * n * k
            weights = copies_of(weight, max(1, math.ceil(target_bytes / nbytes)))
            for m in ms:
                x = torch.randn(m, k).bfloat16()
                samples: dict[str, list[float]] = {name: [] for name in (*paths, "torch-bf16")}
                for rep in range(reps + 1):  # the first pass warms up
                    for name in samples:
                        if name in paths:
                            ops.set_bf16_matmul_path(paths[name])
                            call = cpu_ext.linear_bf16
                        else:
                            call = F.linear
                        start = CLOCK()
                        for w in weights:
                            call(x, w)
                        if rep:
                            samples[name].append((CLOCK() - start) / len(weights))
                cells = []
                for name, times in samples.items():
                    seconds, best = median(times), min(times)
                    rows.append({"layer": layer, "K": k, "N": n, "M": m, "variant": name, "bytes": nbytes,
                                 "us": seconds * 1e6, "gbps": nbytes / seconds / 1e9, "best_gbps": nbytes / best / 1e9})
                    cells.append(f"{name} {seconds * 1e3:7.3f} ms {nbytes / seconds / 1e9:5.1f} GB/s")
                log(f"{layer:8s} M={m:3d} " + "  ".join(cells))
            del weights
    finally:
        ops.set_bf16_matmul_path("auto")
    return rows
QUANT_FORMATS = {"int8": (8, None), "int4-g128": (4, 128), "int4-g32": (4, 32)}  # name -> (bits, group; None: per channel)


def quant_table(target_bytes: int, reps: int, ms: list[int]) -> dict:
    """Per-layer rate of linear_quant (and of linear_bf16, for scale) at each M, plus its fixed cost per call."""
    rows = []
    for layer, (k, n) in SHAPES.items():
        if layer == "lm_head":  # not quantized in the benchmark checkpoints
            continue
        weight = (torch.randn(n, k) * 0.02).bfloat16()
        formats = {"zili-bf16": (16, None)} | QUANT_FORMATS
        for name, (bits, group) in formats.items():
            if bits == 16:
                state, nbytes = weight, 2 * n * k
                call = lambda x, w: cpu_ext.linear_bf16(x, w)  # noqa: E731
            else:
                group = group or k
                kernel = (CpuVnniInt8Kernel if bits == 8 else CpuVnniInt4Kernel)(quantized(weight, bits, group))
                state = (kernel.weight, kernel.scales, kernel.zeros)
                nbytes = sum(t.numel() * t.element_size() for t in state if isinstance(t, torch.Tensor))
                call = lambda x, s, bits=bits, group=group: cpu_ext.linear_quant(x, *s, bits, group)  # noqa: E731
            states = copies_of(state, max(1, math.ceil(target_bytes / nbytes)))
            for m in ms:
                seconds = seconds_per_call(call, states, torch.randn(m, k).bfloat16(), reps)
                rows.append({"layer": layer, "K": k, "N": n, "format": name, "M": m, "bytes": nbytes,
                             "us": seconds * 1e6, "gbps": nbytes / seconds / 1e9})
                log(f"{layer:8s} {name:10s} M={m:2d} {seconds * 1e6:8.1f} us {nbytes / seconds / 1e9:6.1f} GB/s")
            del states
    fixed = {}
    x = torch.randn(1, 896).bfloat16()
    for name, (bits, group) in QUANT_FORMATS.items():
        group = group or 896
        kernel = (CpuVnniInt8Kernel if bits == 8 else CpuVnniInt4Kernel)(
            quantized((torch.randn(16, 896) * 0.02).bfloat16(), bits, group))
        state = (kernel.weight, kernel.scales, kernel.zeros)
        fixed[name] = seconds_per_call(lambda x, s, b=bits, g=group: cpu_ext.linear_quant(x, *s, b, g), [state] * 2000,
                                       x, reps) * 1e6
    fixed["trivial-op"] = seconds_per_call(lambda x, s: torch.ops.aten.add.Tensor(x, x), [None] * 2000, x, reps) * 1e6
    log("fixed cost per call (16 x 896 weight, in cache): "
        + ", ".join(f"{name} {us:.2f} us" for name, us in fixed.items()))
    return {"layers": rows, "fixed_us": fixed}


def quant_markdown(result: dict, bandwidth: float) -> list[str]:
    table = result["quant"]
    ms = sorted({row["M"] for row in table["layers"]})
    lines = ["| layer (K -> N) | format | MB | " + " | ".join(f"M={m}" for m in ms) + " |",
             "|---|---|---|" + "---|" * len(ms)]
    for layer in dict.fromkeys(row["layer"] for row in table["layers"]):
        for name in dict.fromkeys(row["format"] for row in table["layers"]):
            cells = {row["M"]: row for row in table["layers"] if row["layer"] == layer and row["format"] == name}
            first = next(iter(cells.values()))
            lines.append(f"| {layer} ({first['K']} -> {first['N']}) | {name} | {first['bytes'] / 1e6:.2f} | "
                         + " | ".join(f"{cells[m]['us']:.0f} us {cells[m]['gbps']:.1f} GB/s "
                                      f"({100 * cells[m]['gbps'] / bandwidth:.0f}%)" for m in ms) + " |")
    lines += ["", "fixed cost per call: " + ", ".join(f"{k} {v:.2f} us" for k, v in table["fixed_us"].items()), ""]
    return lines


def decode_child(folder: str, tokens: int, reps: int) -> dict:
    """In a fresh process: batch-1 decode tok/s of `folder` through zili.LLM's engine (steps after the first token)."""
    from zili.llm import LLM
    from zili.sampling_params import SamplingParams

    llm = LLM(folder, dtype="bfloat16", max_model_len=tokens + 64)
    prompt = list(range(3, 19))  # a short prompt (16 tokens)
    kernels = sorted({type(m.kernel).__name__ for m in llm.model.modules() if hasattr(m, "kernel")
                      and isinstance(m.kernel, torch.nn.Module)})
    samples = []
    for rep in range(reps + 1):  # the first run warms up
        params = SamplingParams(max_tokens=1 + tokens, temperature=0.0, ignore_eos=True)
        request_id = llm.engine.add_request(None, prompt, params).request_id
        produced, start = 0, None
        while produced < 1 + tokens:
            for output in llm.engine.step():
                if output.request_id == request_id:
                    produced = len(output.outputs[0].token_ids)
            if start is None and produced >= 1:
                start = CLOCK()
        if rep:
            samples.append(tokens / (CLOCK() - start))
    return {"decode_tok_s": median(samples), "samples": samples, "quant_kernels": kernels}


def decode_tok_s(folder, kernels: bool, args) -> dict:
    env = dict(os.environ, ZILI_CPU_KERNELS="1" if kernels else "0")
    command = [sys.executable, __file__, "--decode-child", str(folder), "--threads", str(args.threads),
               "--clock", args.clock, "--model-reps", str(args.model_reps), "--decode-tokens", str(args.decode_tokens)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO_DIR, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"decode child failed: {done.stderr.strip().splitlines()[-3:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def model_table(args, precisions: list[str]) -> list[dict]:
    folders = {"bf16": MODEL_DIR, "int8": QUANT_DIR / "int8", "int4": QUANT_DIR / "int4"}
    rows = []
    for precision in precisions:
        folder = folders[precision]
        if not (folder / "config.json").exists():
            log(f"skip {precision}: no checkpoint at {folder} (benchmarks/make_checkpoint.py, zili quantize)")
            continue
        weight_bytes = safetensors_bytes_per_token(folder)
        bandwidth = streaming_read(weight_bytes, 5)["best_gbps"]
        for kernels in (False, True):  # a fresh bandwidth probe per precision
            result = decode_tok_s(folder, kernels, args)
            tok_s = result["decode_tok_s"]
            row = {"precision": precision, "zili_kernels": kernels, "decode_tok_s": tok_s,
                   "samples": result["samples"], "quant_kernels": result["quant_kernels"], "weight_bytes": weight_bytes,
                   "bandwidth_gbps": bandwidth, "bound_tok_s": bandwidth * 1e9 / weight_bytes,
                   "pct_of_bound": 100 * tok_s * weight_bytes / (bandwidth * 1e9)}
            rows.append(row)
            log(f"decode {precision} kernels={kernels}: {tok_s:.1f} tok/s "
                f"({row['pct_of_bound']:.0f}% of {row['bound_tok_s']:.1f} tok/s bound)")
    return rows


def markdown(result: dict) -> str:
    """The layer and model tables of a result, as markdown."""
    bandwidth = result["bandwidth"]["best_gbps"]
    lines = [f"streaming read over {result['target_bytes'] / 1e6:.0f} MB: {bandwidth:.1f} GB/s "
             f"({result['threads']} thread(s), {result['clock']} clock, load average at start "
             f"{', '.join(f'{x:.1f}' for x in result['load_average_at_start'])})", ""]
    if result.get("layers"):
        names = list(dict.fromkeys(row["variant"] for row in result["layers"]))
        lines += ["| layer (K -> N) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for layer in dict.fromkeys(row["layer"] for row in result["layers"]):
            rows = {row["variant"]: row for row in result["layers"] if row["layer"] == layer}
            first = next(iter(rows.values()))
            cells = [f"{rows[n]['gbps']:.1f} GB/s ({100 * rows[n]['gbps'] / bandwidth:.0f}%)" for n in names]
            lines.append(f"| {layer} ({first['K']} -> {first['N']}) | " + " | ".join(cells) + " |")
        lines.append("")
    if result.get("amx"):
        names = list(dict.fromkeys(row["variant"] for row in result["amx"]))
        lines += ["| layer (K -> N) | M | " + " | ".join(f"{n} ms (GB/s; best)" for n in names) + " |",
                  "|---" * (len(names) + 2) + "|"]
        for key in dict.fromkeys((row["layer"], row["M"]) for row in result["amx"]):
            rows = {row["variant"]: row for row in result["amx"] if (row["layer"], row["M"]) == key}
            first = next(iter(rows.values()))
            cells = [f"{rows[n]['us'] / 1e3:.3f} ({rows[n]['gbps']:.1f}; {rows[n]['best_gbps']:.1f})" for n in names]
            lines.append(f"| {key[0]} ({first['K']} -> {first['N']}) | {key[1]} | " + " | ".join(cells) + " |")
        lines.append("")
    if result.get("quant"):
        lines += quant_markdown(result, bandwidth)
    if result.get("model"):
        lines += ["| precision | zili kernels | decode tok/s | % of bandwidth bound |", "|---|---|---|---|"]
        lines += [f"| {r['precision']} | {'on' if r['zili_kernels'] else 'off'} | {r['decode_tok_s']:.1f} | "
                  f"{r['pct_of_bound']:.0f}% of {r['bound_tok_s']:.1f} |" for r in result["model"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--parts", default="layers,amx,rows,quant,model")
    parser.add_argument("--variants", default="torch-bf16,zili-bf16,torch-int8,zili-int8,torch-int4,zili-int4")
    parser.add_argument("--target-bytes", type=int, default=0,
                        help="weights cycled through per layer measurement (default: the bf16 model's)")
    parser.add_argument("--rows", default="1,2,4,8,12,16,24,32", help="M values of the rows sweep")
    parser.add_argument("--amx-rows", default="1,2,4,8,16,32", help="M values of the amx part")
    parser.add_argument("--quant-rows", default="1,2,4,8,16", help="M values of the quant part")
    parser.add_argument("--precisions", default="bf16,int8,int4")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: per-call CPU time of the (single) thread, for a machine shared with other work")
    parser.add_argument("--model-reps", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-child", metavar="MODEL", help=argparse.SUPPRESS)  # one model measurement
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if args.threads != 1:
            parser.error("--clock cpu measures one thread: use --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    if args.decode_child:
        emit(decode_child(args.decode_child, args.decode_tokens, args.model_reps))
        return 0
    if not cpu_ext.available():
        log("zili CPU kernels unavailable on this machine; nothing to compare")
        return 1
    target = args.target_bytes or (safetensors_bytes_per_token(MODEL_DIR) if MODEL_DIR.exists() else 774_000_000)
    result: dict = {"threads": args.threads, "clock": args.clock, "load_average_at_start": os.getloadavg(), "target_bytes": target}
    names = args.variants.split(",")
    bandwidth = streaming_read(target, args.reps)
    result["bandwidth"] = bandwidth
    log(f"read bandwidth over {target / 1e6:.0f} MB: best {bandwidth['best_gbps']:.1f} GB/s, "
        f"median {bandwidth['median_gbps']:.1f}")
    if "layers" in parts:
        result["layers"] = layer_table(target, args.reps, names)
    if "amx" in parts:
        result["amx"] = amx_table(target, args.reps, [int(m) for m in args.amx_rows.split(",")])
    if "rows" in parts:
        sweep_names = names + ["zili-int4-dequant"]
        result["rows"] = rows_sweep(target, args.reps, [int(m) for m in args.rows.split(",")], sweep_names)
    if "quant" in parts:
        result["quant"] = quant_table(target, args.reps, [int(m) for m in args.quant_rows.split(",")])
    if "model" in parts:
        result["model"] = model_table(args, args.precisions.split(","))
    result["load_average_at_end"] = os.getloadavg()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "kernels.json").write_text(json.dumps(result, indent=1))
    print(markdown(result), file=sys.stderr)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

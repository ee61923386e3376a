"""Shared helpers of the benchmark harness: paths, statistics, child processes, weight bytes.

Every generated file lives under benchmarks/work/ (gitignored). Each measurement that loads a
model runs in its own child process so peak RSS is per engine and one engine's threads never
share a process with another's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / "work"
MODEL_DIR = WORK_DIR / "model"
QUANT_DIR = WORK_DIR / "quantized"          # zili int8 / int4 checkpoints
GGUF_DIR = WORK_DIR / "gguf"                 # llama.cpp BF16 / Q8_0 / Q4_0 files
RESULTS_DIR = WORK_DIR / "results"
LOG_DIR = WORK_DIR / "logs"

PRECISIONS = ("bf16", "int8", "int4")
GGUF_TYPE = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}  # zili precision -> llama.cpp peer
# the decode profile's category for the fused C++ decoder layers (profile_decode.py), which report.py
# counts with the GEMVs as weight readers
FUSED_LAYERS = "fused decode step (C++: layers, attention, norms, lm_head)"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def peak_rss_bytes() -> int:
    """Peak resident set size of the calling process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(script: str, args: list[str], log_name: str, timeout_s: float, nice: int = 0) -> dict:
    """Run benchmarks/<script> in a fresh interpreter; it prints one JSON object as its last line."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(BENCH_DIR / script), *args]
    if nice:
        command = ["nice", "-n", str(nice), *command]
    log(" ".join(command[-len(args) - 1:]))
    with open(LOG_DIR / f"{log_name}.log", "w") as stderr:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                              timeout=timeout_s, cwd=REPO_DIR)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{script} failed (exit {done.returncode}); see {LOG_DIR / (log_name + '.log')}")
    return json.loads(lines[-1])


def offline_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every offline engine script (offline_zili.py, offline_transformers.py) takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (benchmarks/gpu_bench.py)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16, help="short prompt before decode")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--figures", default="prefill,decode,batch")
    return parser


def offline_figures(args: argparse.Namespace, result: dict, prompt, prompts, token_times, timed_generate) -> None:
    """Measure an offline engine's prefill / decode / batch figures into `result`, the same way for
    every engine: prefill = prompt tokens / time to the first new token; decode = N / (time of new
    token N+1 - time of new token 1) after a short prompt; batch = batch x N new tokens / wall time
    of one generate. Each is the median of args.reps samples, the samples kept beside it.

    The engine comes as four callables: prompt(length) -> one random prompt, prompts(batch, length)
    -> a batch of them, token_times(prompt, new_tokens) -> seconds from submission to each new
    token, timed_generate(prompts, new_tokens) -> wall seconds of one generate of the batch.
    """
    figures = set(args.figures.split(","))
    token_times(prompt(8), 4)  # warm-up (and any compilation)
    if "prefill" in figures:  # time to the first token of a long prompt
        samples = [args.prefill_tokens / token_times(prompt(args.prefill_tokens), 1)[0] for _ in range(args.reps)]
        result["prefill_tok_s"] = median(samples)
        result["prefill_samples"] = samples
    if "decode" in figures:  # the steps after the first token: 1 + N new tokens give N decode steps
        samples = []
        for _ in range(args.reps):
            times = token_times(prompt(args.prompt_tokens), 1 + args.decode_tokens)
            samples.append(args.decode_tokens / (times[-1] - times[0]))
        result["decode_tok_s"] = median(samples)
        result["decode_samples"] = samples
    if "batch" in figures:
        samples = []
        for _ in range(args.reps):
            batch = prompts(args.batch, args.prompt_tokens)
            samples.append(args.batch * args.decode_tokens / timed_generate(batch, args.decode_tokens))
        result["batch_tok_s"] = median(samples)
        result["batch_samples"] = samples
        result["batch"] = args.batch
    result["peak_rss_bytes"] = peak_rss_bytes()


def emit(result: dict) -> None:
    """The last stdout line of a child measurement script."""
    print(json.dumps(result), flush=True)


def safetensors_bytes_per_token(folder: Path) -> int:
    """Bytes of weights a batch-1 decode step reads: every tensor once, the input embedding not at
    all when a separate lm_head exists (a lookup reads one row); a tied embedding is the lm_head."""
    sizes: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                sizes[name] = end - start
    has_lm_head = any(name.startswith("lm_head.") for name in sizes)
    return sum(size for name, size in sizes.items()
               if not (has_lm_head and name.startswith("model.embed_tokens.")))


def gguf_bytes_per_token(path: Path, llama_cpp_source: Path) -> int:
    """The same count for a GGUF file, read with the gguf-py that ships with llama.cpp."""
    sys.path.insert(0, str(llama_cpp_source / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    has_output = "output.weight" in tensors
    return sum(size for name, size in tensors.items() if not (has_output and name == "token_embd.weight"))


def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_gib, 1), "isa": isa,
            "os": platform.platform(), "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}

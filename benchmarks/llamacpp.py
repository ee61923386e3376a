"""The llama.cpp peer: convert the benchmark checkpoint to GGUF and time it with llama-bench.

GGUF BF16 comes from llama.cpp's own convert_hf_to_gguf.py; Q8_0 and Q4_0 from llama-quantize
on the BF16 file (what a llama.cpp user would do). Timing: `llama-bench -t T -p 512 -n 128 -r N`
(pp512 = prefill, tg128 = batch-1 decode); the median of its per-repetition samples is reported.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common import GGUF_DIR, LOG_DIR, REPO_DIR, log, median
from servers import RssMonitor


def gguf_path(quant_type: str) -> Path:
    return GGUF_DIR / f"model-{quant_type.lower()}.gguf"


def convert(model_dir: Path, peers: dict, quant_types: tuple[str, ...]) -> dict[str, Path]:
    """GGUF files for `quant_types` (BF16, Q8_0, Q4_0), created when missing."""
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    bf16 = gguf_path("BF16")
    if not bf16.exists():
        log(f"converting {model_dir} to {bf16.name}")
        with open(LOG_DIR / "convert_hf_to_gguf.log", "w") as out:
            subprocess.run([sys.executable, peers["convert"], str(model_dir), "--outtype", "bf16",
                            "--outfile", str(bf16)], check=True, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_DIR)
    paths = {"BF16": bf16}
    for quant_type in quant_types:
        target = gguf_path(quant_type)
        if quant_type != "BF16" and not target.exists():
            log(f"llama-quantize {bf16.name} -> {target.name}")
            with open(LOG_DIR / f"llama-quantize-{quant_type}.log", "w") as out:
                subprocess.run([peers["llama-quantize"], str(bf16), str(target), quant_type],
                               check=True, stdout=out, stderr=subprocess.STDOUT)
        paths[quant_type] = target
    return paths


def bench(binary: str, gguf: Path, threads: int, reps: int, prefill_tokens: int, decode_tokens: int,
          figures: set[str]) -> dict:
    """{'prefill_tok_s', 'decode_tok_s', samples, peak_rss_bytes} from one llama-bench run."""
    command = [binary, "-m", str(gguf), "-t", str(threads), "-r", str(reps), "-o", "json",
               "-p", str(prefill_tokens if "prefill" in figures else 0),
               "-n", str(decode_tokens if "decode" in figures else 0)]
    log(" ".join(command))
    with open(LOG_DIR / f"llama-bench-{gguf.stem}.log", "w") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
        with RssMonitor(process.pid) as rss:
            stdout, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({process.returncode}); see {LOG_DIR}")
    result: dict = {"engine": "llama.cpp", "threads": threads, "peak_rss_bytes": rss.peak_bytes}
    for test in json.loads(stdout):
        samples = [float(x) for x in test.get("samples_ts") or [test["avg_ts"]]]
        key = "prefill" if test["n_prompt"] > 0 and test["n_gen"] == 0 else "decode"
        result[f"{key}_tok_s"] = median(samples)
        result[f"{key}_samples"] = samples
        result.setdefault("build", f"{test.get('build_commit', '?')} ({test.get('build_number', '?')})")
        result.setdefault("backend", test.get("backends") or test.get("backend"))
        result.setdefault("cpu_info", test.get("cpu_info"))
    return result

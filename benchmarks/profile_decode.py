"""Where zili's decode time goes, per step: matmuls vs attention vs the rest vs Python.

Drives the engine's step loop on the benchmark checkpoint (`--rows` requests, 1 by default, short
prompts, then decode steps) three ways:

1. wall clock: ms per decode step without any profiler (the figure the others are shares of);
2. torch.profiler with Python stacks: each aten op's self CPU time is charged to the innermost
   zili source file on its stack (layers/linear.py -> matmul, engine/paged_attention.py ->
   attention, ...), so the categories follow zili's own code; "host overhead" = wall time per
   step minus all op time (Python, scheduling, tensor building, dispatch between ops);
   The fused C++ step's parts are ops of their own (zili_cpu::qkv_proj, ::attention, ::o_proj,
   ::gate_up, ::activation, ::down_proj, ::rms_norm, ::lm_head): their total time per step, and for
   the matmuls the weight bytes they read, give each part's read rate;
3. optionally py-spy (`--py-spy`, a benchmark-only tool: `pip install py-spy`): sampled native
   + Python stacks, charged the same way, and split into time inside native code vs the Python
   interpreter.

    python benchmarks/profile_decode.py --model benchmarks/work/model [--rows 16] [--steps 64] [--py-spy]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from common import FUSED_LAYERS, LOG_DIR, emit, median

# zili source file (suffix match on the stack frame's file) -> category; first match wins,
# checked from the innermost zili frame outwards.
CATEGORIES = (
    ("zili/kernels/", "matmul (GEMV)"),      # zili's own CPU kernels (dense and quantized)
    ("layers/quantized", "matmul (GEMV)"),
    ("compress/", "matmul (GEMV)"),
    ("layers/linear.py", "matmul (GEMV)"),
    ("kernels/dense.py", "matmul (GEMV)"),
    ("kernels/quant_kernels.py", "matmul (GEMV)"),
    ("paged_attention.py", "attention"),
    ("layers/attention.py", "attention"),
    ("layers/rotary.py", "rotary"),
    ("layers/norm.py", "rmsnorm"),
    ("layers/activation.py", "activation"),
    ("layers/sampler.py", "sampling"),
    ("engine/model_runner.py", "runner (inputs, logits)"),
    ("engine/fused_decode.py", FUSED_LAYERS),
    ("models/", "model glue (embedding, residual adds)"),
    ("engine/", "engine (scheduler, outputs)"),
)
OTHER = "other"
MATMUL = "matmul (GEMV)"
# A matmul op outside attention is a weight GEMV wherever it is called from (e.g. the lm_head).
MATMUL_OP_MARKERS = ("aten::mm", "aten::addmm", "aten::linear", "aten::mv", "pack_mm", "gemm", "gemv")


# The fused step's parts (zili/kernels/cpu/decode_layer.cpp), in the order a layer runs them.
PHASES = ("zili_cpu::rms_norm", "zili_cpu::qkv_proj", "zili_cpu::attention", "zili_cpu::o_proj",
          "zili_cpu::gate_up", "zili_cpu::activation", "zili_cpu::down_proj", "zili_cpu::lm_head")
FUSED_STEP = "zili_cpu::decode_step"


def phase_weight_bytes(model) -> dict[str, int]:
    """Bytes of weights (with their scales) each matmul part of the fused step reads per step."""
    def nbytes(modules) -> int:
        seen, total = set(), 0
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                if tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    total += tensor.numel() * tensor.element_size()
        return total
    layers = model.model.layers
    return {"zili_cpu::qkv_proj": nbytes(layer.self_attn.qkv_proj for layer in layers),
            "zili_cpu::o_proj": nbytes(layer.self_attn.o_proj for layer in layers),
            "zili_cpu::gate_up": nbytes(layer.mlp.gate_up_proj for layer in layers),
            "zili_cpu::down_proj": nbytes(layer.mlp.down_proj for layer in layers),
            "zili_cpu::lm_head": nbytes([model.lm_head])}


def categorize(frames: list[str]) -> str:
    """frames: innermost first; each names its source file ('zili/layers/linear.py(45): forward')."""
    for frame in frames:
        if "zili/" not in frame:
            continue
        for suffix, category in CATEGORIES:
            if suffix in frame:
                return category
    return OTHER


def build_engine(model: str, threads: int, max_model_len: int):
    from zili.llm import LLM
    torch.set_num_threads(threads)
    return LLM(model, dtype="bfloat16", max_model_len=max_model_len)


def decode_steps(llm, prompt_tokens: int, steps: int, around=contextlib.nullcontext(), rows: int = 1) -> list[float]:
    """Prefill `rows` random prompts, then time `steps` decode steps (seconds each) of all of them inside
    `around`."""
    from zili.sampling_params import SamplingParams
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    engine = llm.engine
    for _ in range(rows):
        prompt = torch.randint(3, llm.config.vocab_size, (prompt_tokens,), generator=generator).tolist()
        engine.add_request(None, prompt, params)
    started: set[str] = set()
    while len(started) < rows:  # prefill, up to every row's first token
        started.update(out.request_id for out in engine.step() if out.outputs[0].token_ids)
    durations = []
    with around:
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            durations.append(time.perf_counter() - start)
    return durations


def torch_profile(llm, prompt_tokens: int, steps: int, rows: int = 1) -> dict:
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU], with_stack=True, record_shapes=False)
    durations = decode_steps(llm, prompt_tokens, steps, around=prof, rows=rows)
    by_category: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, float] = collections.defaultdict(float)
    phases: dict[str, float] = collections.defaultdict(float)
    fused_step_ms = 0.0
    for event in prof.events():
        if event.name in PHASES:
            phases[event.name] += event.cpu_time_total / 1e3
        elif event.name == FUSED_STEP:
            fused_step_ms += event.cpu_time_total / 1e3
        if "::" not in event.name or ".py(" in event.name:  # ops only: aten::, zili_cpu:: (zili/kernels), ...
            continue
        # Python frames are events too (named 'path(line): function'); the parent chain of an op
        # is its stack, innermost first.
        frames, parent = [], event.cpu_parent
        while parent is not None:
            if ".py(" in parent.name:
                frames.append(parent.name)
            parent = parent.cpu_parent
        category = categorize(frames)
        if category != "attention" and any(m in event.name for m in MATMUL_OP_MARKERS):
            category = MATMUL
        by_category[category] += event.self_cpu_time_total / 1e3  # ms
        by_op[event.name] += event.self_cpu_time_total / 1e3
    profiled_ms = sum(durations) * 1e3
    num = len(durations)
    per_token = {k: v / num for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])}
    ops = {k: v / num for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:15]}
    result = {"steps": num, "wall_ms_per_token_under_profiler": profiled_ms / num,
              "op_ms_per_token": per_token, "top_ops_ms_per_token": ops}
    if phases:  # the fused step's parts, per step; the rest of it: embedding, rotary rows, argmax, checks
        result["fused_step_ms"] = fused_step_ms / num
        result["fused_parts_ms"] = {name: phases[name] / num for name in PHASES if name in phases}
        result["fused_parts_weight_bytes"] = phase_weight_bytes(llm.model)
    return result


def py_spy_profile(args: argparse.Namespace) -> dict:
    """Re-run this script under `py-spy record --native`; charge samples to categories."""
    binary = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(binary):
        return {"error": "py-spy not installed (pip install py-spy)"}
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "stacks.txt")
        command = [binary, "record", "--native", "-r", "200", "-f", "raw", "-o", raw, "--",
                   sys.executable, __file__, "--model", args.model, "--threads", str(args.threads),
                   "--steps", str(args.steps), "--prompt-tokens", str(args.prompt_tokens), "--rows", str(args.rows),
                   "--loop-only"]
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with open(LOG_DIR / "py-spy.log", "w") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
        if done.returncode != 0 or not os.path.exists(raw):
            return {"error": f"py-spy failed ({done.returncode}); see {LOG_DIR / 'py-spy.log'}"}
        lines = open(raw).read().splitlines()
    samples: dict[str, int] = collections.defaultdict(int)
    native = python = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")[::-1]  # innermost first
        if not any("decode_steps" in f for f in frames):  # loading, warm-up: not the decode loop
            continue
        n = int(count)
        samples[categorize(frames)] += n
        if frames and (".py:" in frames[0] or ".py)" in frames[0]):
            python += n
        else:
            native += n
    total = sum(samples.values()) or 1
    return {"samples": total, "share_by_category": {k: v / total for k, v in
                                                    sorted(samples.items(), key=lambda kv: -kv[1])},
            "share_native": native / total, "share_python_interpreter": python / total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rows", type=int, default=1, help="requests decoded together")
    parser.add_argument("--precision", default="bf16", help="label only; the checkpoint decides")
    parser.add_argument("--py-spy", action="store_true", help="also sample with py-spy")
    parser.add_argument("--loop-only", action="store_true", help=argparse.SUPPRESS)  # py-spy's child
    args = parser.parse_args(argv)

    llm = build_engine(args.model, args.threads, args.prompt_tokens + args.steps + 64)
    decode_steps(llm, args.prompt_tokens, 8, rows=args.rows)  # warm-up
    if args.loop_only:
        for _ in range(3):
            decode_steps(llm, args.prompt_tokens, args.steps, rows=args.rows)
        return 0
    walls = [median(decode_steps(llm, args.prompt_tokens, args.steps, rows=args.rows)) for _ in range(3)]
    wall_ms = median(walls) * 1e3
    result: dict = {"engine": "zili", "precision": args.precision, "threads": args.threads, "rows": args.rows,
                    "wall_ms_per_token": wall_ms, "decode_tok_s": args.rows * 1e3 / wall_ms}
    result["torch_profiler"] = torch_profile(llm, args.prompt_tokens, args.steps, args.rows)
    ops_ms = sum(result["torch_profiler"]["op_ms_per_token"].values())
    result["torch_profiler"]["host_overhead_ms_per_token"] = (
        result["torch_profiler"]["wall_ms_per_token_under_profiler"] - ops_ms)
    if args.py_spy:
        del llm
        result["py_spy"] = py_spy_profile(args)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

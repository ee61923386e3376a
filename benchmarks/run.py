"""`make bench`: set up the peers, build the workload, measure zili and the peers in one run, report.

    python benchmarks/run.py                          # everything (tens of minutes on 2 cores)
    python benchmarks/run.py --only decode --reps 5   # a subset: bandwidth,decode,prefill,batch,server,profile
    python benchmarks/run.py --skip-server --engines zili,llama.cpp --precisions bf16,int4
    python benchmarks/report.py                       # re-render docs/benchmarks.md from the last run

Steps: benchmarks/setup_peers.py (pip tools, llama.cpp build), make_checkpoint.py (random
weights), `zili quantize` (int8 / int4), GGUF conversion (BF16 / Q8_0 / Q4_0), read bandwidth,
offline figures (each engine in its own process), servers, profiles of zili's decode (bf16 at 1 and 16 rows, int4)
(benchmarks/profile_decode.py), then docs/benchmarks.md and
docs/benchmarks.png. A step that cannot run (a zili part not there yet) is recorded under
"Not measured" and the rest goes on. Results: benchmarks/work/results/<date>.json and latest.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import llamacpp
import setup_peers
from common import (GGUF_DIR, GGUF_TYPE, MODEL_DIR, PRECISIONS, QUANT_DIR, REPO_DIR, RESULTS_DIR, gguf_bytes_per_token,
                    log, machine_description, median, run_child, safetensors_bytes_per_token)
from load_client import summarize
from report import headline_table, write_report
from servers import free_port, llama_server_command, measure_server, zili_serve_command

FIGURES = ("bandwidth", "decode", "prefill", "batch", "server", "profile")
ENGINES = ("zili", "llama.cpp", "transformers")
BITS = {"int8": 8, "int4": 4}
# lm_head (the tied embedding) as llama.cpp's files hold it: Q8_0 quantizes it to 8 bits, so zili's int8
# does too (`--quantize-lm-head`); Q4_0 keeps it at 6.6 bits (Q6_K), which zili's int4 scheme (4 bits) would
# undercut, so zili's int4 keeps it in bf16 (more bytes per token than llama.cpp reads).
QUANTIZE_LM_HEAD = {"int8": True, "int4": False}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(FIGURES), help=f"comma list of {', '.join(FIGURES)}")
    parser.add_argument("--skip-server", action="store_true", help="same as leaving `server` out of --only")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="offline precisions")
    parser.add_argument("--server-precisions", default="bf16", help="precisions for the server figure")
    parser.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="compute threads per engine")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--skip-setup", action="store_true", help="do not run setup_peers.py")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="llama.cpp compile jobs")
    parser.add_argument("--fresh-models", action="store_true",
                        help="recreate the checkpoint, zili's int8 / int4 folders and the GGUF files")
    parser.add_argument("--note", default="", help="a remark printed at the top of the report")
    parser.add_argument("--no-report", action="store_true", help="measure only; keep docs/ untouched")
    args = parser.parse_args(argv)
    args.figures = {f for f in args.only.split(",") if f} - ({"server"} if args.skip_server else set())
    args.engines = [e for e in args.engines.split(",") if e]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.server_precisions = [p for p in args.server_precisions.split(",") if p]
    for name, values, allowed in (("--only", args.figures, FIGURES), ("--engines", args.engines, ENGINES),
                                  ("--precisions", args.precisions + args.server_precisions, PRECISIONS)):
        unknown = set(values) - set(allowed)
        if unknown:
            parser.error(f"{name}: unknown {sorted(unknown)}; choose from {', '.join(allowed)}")
    return args


class Run:
    """Collects results and errors; `step` runs one part and records a failure instead of stopping."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.results: dict = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_description(), "note": args.note, "errors": [],
            "settings": {k: getattr(args, k) for k in ("reps", "threads", "prefill_tokens", "decode_tokens",
                                                       "streams", "engines", "precisions", "server_precisions")},
        }
        self.results["settings"]["figures"] = sorted(args.figures)

    def step(self, label: str, func, *func_args):
        log(f"== {label}")
        started = time.perf_counter()
        try:
            value = func(*func_args)
            log(f"   {label}: done in {time.perf_counter() - started:.0f}s")
            return value
        except Exception as e:  # noqa: BLE001 - one failing part must not lose the others
            message = f"{label}: {type(e).__name__}: {e}"
            log("   " + message)
            if message not in self.results["errors"]:
                self.results["errors"].append(message)
            return None

    def node(self, engine: str, precision: str) -> dict:
        return self.results.setdefault(engine, {}).setdefault(precision, {})

    def put(self, engine: str, precision: str, values: dict) -> None:
        self.node(engine, precision).update(values)


def setup(args: argparse.Namespace) -> None:
    command = [sys.executable, str(Path(__file__).parent / "setup_peers.py"), "--jobs", str(args.jobs)]
    if "llama.cpp" not in args.engines:
        command.append("--skip-llama-cpp")
    subprocess.run(command, check=True)


def make_checkpoint() -> None:
    subprocess.run([sys.executable, str(Path(__file__).parent / "make_checkpoint.py"), "--out", str(MODEL_DIR)],
                   check=True)


def zili_quantize(precision: str) -> Path:
    """A zili int8 / int4 checkpoint of the benchmark model via `zili quantize` (created once; its
    defaults: RTN, symmetric, int8 per channel, int4 groups of 128, embeddings kept in bf16; lm_head
    as QUANTIZE_LM_HEAD says)."""
    lm_head = QUANTIZE_LM_HEAD[precision]
    out = QUANT_DIR / (f"{precision}-lmhead" if lm_head else precision)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    command = [sys.executable, "-m", "zili.cli", "quantize", str(MODEL_DIR), "--bits", str(BITS[precision]),
               "--output", str(out)] + (["--quantize-lm-head"] if lm_head else [])
    if out.exists():  # a run interrupted half-way
        command.append("--overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    log(" ".join(command[2:]))
    subprocess.run(command, check=True, cwd=REPO_DIR)
    return out


def quant_scheme(folder: Path) -> str | None:
    """A short description of a zili checkpoint's quantization_config (None for bf16)."""
    config = json.loads((folder / "config.json").read_text()).get("quantization_config")
    if not config:
        return None
    groups = config.get("config_groups", {})
    weights = next(iter(groups.values()), {}).get("weights", {}) if groups else {}
    if weights:
        group = weights.get("group_size") or "channel"
        method = (config.get("zili") or {}).get("method") or config.get("quant_method", "?")
        lm_head = "bf16 lm_head" if "lm_head" in config.get("ignore", []) else "quantized lm_head"
        return (f"{method} int{weights.get('num_bits')} group {group} {'sym' if weights.get('symmetric') else 'asym'}, "
                f"{lm_head}")
    return json.dumps(config)[:120]


def zili_model(precision: str) -> Path:
    return MODEL_DIR if precision == "bf16" else zili_quantize(precision)


def versions(peers: dict) -> dict:
    found = {}
    for package in ("zili", "torch", "transformers"):
        try:
            from importlib.metadata import version
            found[package] = version(package)
        except Exception:  # noqa: BLE001
            found[package] = "not installed"
    try:
        found["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                      cwd=REPO_DIR).stdout.strip()
    except OSError:
        pass
    if peers:
        found["llama.cpp"] = f"vendored in llama-cpp-python {peers['llama_cpp_version']}"
    return found


def prepare_models(run: Run, peers: dict, precisions: list[str]) -> tuple[dict, dict]:
    """zili checkpoints and GGUF files per precision, with the weight bytes a decode step reads."""
    zili_paths, ggufs = {}, {}
    if "zili" in run.args.engines:
        for precision in precisions:
            path = run.step(f"zili {precision} checkpoint", zili_model, precision)
            if path:
                zili_paths[precision] = path
                run.put("zili", precision, {"bytes_per_token": safetensors_bytes_per_token(path),
                                            "quant_scheme": quant_scheme(path)})
    if "llama.cpp" in run.args.engines:
        if not peers:
            run.results["errors"].append("llama.cpp: not built (run benchmarks/setup_peers.py)")
            return zili_paths, ggufs
        files = run.step("GGUF conversion", llamacpp.convert, MODEL_DIR, peers,
                         tuple(GGUF_TYPE[p] for p in precisions)) or {}
        for precision in precisions:
            if GGUF_TYPE[precision] in files:
                ggufs[precision] = files[GGUF_TYPE[precision]]
                weight_bytes = gguf_bytes_per_token(ggufs[precision], Path(peers["llama_cpp_source"]))
                run.put("llama.cpp", precision, {"quant_type": GGUF_TYPE[precision], "bytes_per_token": weight_bytes})
    return zili_paths, ggufs


def measure_bandwidth(run: Run, label: str = "") -> None:
    """One streaming-read figure per precision, over a buffer of that precision's weight bytes. Called once
    per round of the offline figures: the bound of each round's decode is that round's read (the host's
    load drifts over minutes), and the bandwidth figure is the best read of all rounds."""
    for precision in run.args.precisions:
        size = (run.results.get("zili", {}).get(precision, {}).get("bytes_per_token")
                or run.results.get("llama.cpp", {}).get(precision, {}).get("bytes_per_token"))
        if size:
            bw = run.step(f"read bandwidth over {size / 1e6:.0f} MB{label}", run_child, "bandwidth.py",
                          ["--bytes", str(size), "--threads", str(run.args.threads), "--reps", "5"],
                          f"bandwidth-{precision}", 600)
            if bw:
                node = run.results.setdefault("bandwidth", {}).setdefault(precision, {})
                rounds = node.get("rounds_gbps", []) + [bw["best_gbps"]]
                if bw["best_gbps"] >= node.get("best_gbps", 0.0):
                    node.update(bw)
                node["rounds_gbps"] = rounds


def merge(node: dict, out: dict) -> None:
    """Fold one measurement into `node`: samples accumulate (figure = their median), peak RSS is the max."""
    for key, value in out.items():
        if key.endswith("_samples"):
            node.setdefault(key, []).extend(value)
            node[key.removesuffix("_samples") + "_tok_s"] = median(node[key])
        elif key == "peak_rss_bytes":
            node[key] = max(node.get(key, 0), value)
        elif key == "rounds":
            node.setdefault(key, []).extend(value)
        elif not key.endswith("_tok_s"):
            node[key] = value


def measure_offline(run: Run, peers: dict, zili_paths: dict, ggufs: dict) -> None:
    """`reps` rounds; each round measures every engine once, so all engines see the same
    background load (on a shared machine it drifts over minutes)."""
    args = run.args
    figures = [f for f in ("decode", "prefill", "batch") if f in args.figures]
    common_args = ["--threads", str(args.threads), "--reps", "1", "--prefill-tokens", str(args.prefill_tokens),
                   "--decode-tokens", str(args.decode_tokens), "--batch", str(args.streams)]
    for rep in range(1, args.reps + 1):
        if "bandwidth" in args.figures:
            measure_bandwidth(run, f" (round {rep}/{args.reps})")
        for precision in args.precisions:
            if precision in zili_paths:
                wanted = [f for f in figures if f != "batch" or precision == "bf16"]
                out = run.step(f"zili offline {precision} (round {rep}/{args.reps})", run_child, "offline_zili.py",
                               ["--model", str(zili_paths[precision]), "--precision", precision,
                                "--figures", ",".join(wanted), *common_args], f"zili-{precision}", 7200)
                if out:
                    merge(run.node("zili", precision), out)
            if precision in ggufs and {"decode", "prefill"} & set(figures):
                out = run.step(f"llama-bench {GGUF_TYPE[precision]} (round {rep}/{args.reps})", llamacpp.bench,
                               peers["llama-bench"], ggufs[precision], args.threads, 1, args.prefill_tokens,
                               args.decode_tokens, set(figures))
                if out:
                    merge(run.node("llama.cpp", precision), out)
        if "transformers" in args.engines and "bf16" in args.precisions:
            out = run.step(f"transformers offline bf16 (round {rep}/{args.reps})", run_child,
                           "offline_transformers.py",
                           ["--model", str(MODEL_DIR), "--figures", ",".join(figures), *common_args],
                           "transformers-bf16", 7200)
            if out:
                merge(run.node("transformers", "bf16"), out)


def measure_servers(run: Run, peers: dict, zili_paths: dict, ggufs: dict) -> None:
    """`reps` rounds; each round starts every server in turn, loads it once, stops it."""
    args = run.args
    load = (args.streams, args.decode_tokens, 1)
    servers = run.results.setdefault("server", {})
    for rep in range(1, args.reps + 1):
        for precision in args.server_precisions:
            if precision in zili_paths:
                port = free_port()
                command = zili_serve_command(zili_paths[precision], port, args.streams, args.threads)
                out = run.step(f"zili serve {precision} (round {rep}/{args.reps})", measure_server,
                               f"zili-{precision}", command, port, ("/ready", "/health"),
                               zili_paths[precision].name, *load, rep)
                if out:
                    merge(servers.setdefault("zili", {}).setdefault(precision, {}), out)
            if precision in ggufs:
                port = free_port()
                command = llama_server_command(peers["llama-server"], ggufs[precision], port, args.streams,
                                               args.threads, context_per_stream=512)
                out = run.step(f"llama-server {GGUF_TYPE[precision]} (round {rep}/{args.reps})", measure_server,
                               f"llama-server-{precision}", command, port, ("/health",), "model", *load, rep)
                if out:
                    merge(servers.setdefault("llama-server", {}).setdefault(precision, {}), out)
    for by_precision in servers.values():  # pool the rounds of all server runs
        for node in by_precision.values():
            node.update(summarize(node["rounds"], args.streams, args.decode_tokens))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run(args)
    if not args.skip_setup:
        run.step("set up peers", setup, args)
    peers = setup_peers.peer_paths() if setup_peers.peers_ready() else {}
    run.results["versions"] = versions(peers)
    if args.fresh_models:
        for folder in (MODEL_DIR, QUANT_DIR, GGUF_DIR):
            shutil.rmtree(folder, ignore_errors=True)
    run.step("benchmark checkpoint", make_checkpoint)
    server_precisions = args.server_precisions if "server" in args.figures else []
    zili_paths, ggufs = prepare_models(run, peers, list(dict.fromkeys(args.precisions + server_precisions)))
    if "bandwidth" in args.figures and not {"decode", "prefill", "batch"} & args.figures:
        measure_bandwidth(run)  # otherwise once per round of the offline figures
    if {"decode", "prefill", "batch"} & args.figures:
        measure_offline(run, peers, zili_paths, ggufs)
    if "server" in args.figures:
        measure_servers(run, peers, zili_paths, ggufs)
    if "profile" in args.figures and "bf16" in zili_paths:
        out = run.step("profile zili bf16 decode", run_child, "profile_decode.py",
                       ["--model", str(zili_paths["bf16"]), "--threads", str(args.threads), "--py-spy"],
                       "profile-bf16", 3600)
        if out:
            run.results["profile"] = out
        out = run.step(f"profile zili bf16 decode, {args.streams} rows", run_child, "profile_decode.py",
                       ["--model", str(zili_paths["bf16"]), "--threads", str(args.threads), "--rows", str(args.streams),
                        "--steps", str(args.decode_tokens)], "profile-bf16-batch", 3600)
        if out:
            run.results["profile_batch"] = out
    if "profile" in args.figures and "int4" in zili_paths:
        out = run.step("profile zili int4 decode", run_child, "profile_decode.py",
                       ["--model", str(zili_paths["int4"]), "--threads", str(args.threads), "--precision", "int4"],
                       "profile-int4", 3600)
        if out:
            run.results["profile_int4"] = out

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for path in (RESULTS_DIR / f"{stamp}.json", RESULTS_DIR / "latest.json"):
        path.write_text(json.dumps(run.results, indent=1))
    if not args.no_report:
        write_report(run.results)
        log("wrote docs/benchmarks.md and docs/benchmarks.png")
    print("\n".join(headline_table(run.results)))
    if run.results["errors"]:
        log("not measured: " + "; ".join(run.results["errors"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

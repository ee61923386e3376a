"""Render a results dict (see run.py) as docs/benchmarks.md plus a PNG chart.

    python benchmarks/report.py [benchmarks/work/results/latest.json]   # re-render without measuring

Missing figures show as "—" (engine not available yet, or a subset run); ratios are zili / peer
from the same run; "% of bound" = decode tok/s x weight bytes read per token / read bandwidth.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from common import FUSED_LAYERS, GGUF_TYPE, PRECISIONS, REPO_DIR, RESULTS_DIR, median

DOC_PATH = REPO_DIR / "docs" / "benchmarks.md"
CHART_PATH = REPO_DIR / "docs" / "benchmarks.png"
# Goals of issue 7: (label, engine pair, figure, precision, minimum ratio)
GOALS = [
    *[(f"decode {p} vs llama.cpp {GGUF_TYPE[p]}", "llama.cpp", "decode_tok_s", p, 1.2) for p in PRECISIONS],
    ("prefill 512 bf16 vs llama.cpp BF16", "llama.cpp", "prefill_tok_s", "bf16", 3.0),
    ("decode bf16 vs transformers", "transformers", "decode_tok_s", "bf16", 2.0),
]


def get(results: dict, *keys, default=None):
    node = results
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def fmt(value, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def ratio(a, b) -> float | None:
    return a / b if a and b else None


def bound_percent(results: dict, engine: str, precision: str, figure: str = "decode") -> float | None:
    """Decode tok/s (`figure`: "decode", or "grouped_decode" for zili's num_scheduler_steps run) as a share of
    bandwidth / weight bytes per token: per round against that round's read bandwidth (the median over
    rounds) where both were measured each round, else against the best read."""
    tok_s = get(results, engine, precision, f"{figure}_tok_s")
    weight_bytes = get(results, engine, precision, "bytes_per_token")
    gbps = get(results, "bandwidth", precision, "best_gbps")
    if not (tok_s and weight_bytes and gbps):
        return None
    samples = get(results, engine, precision, f"{figure}_samples") or []
    rounds = get(results, "bandwidth", precision, "rounds_gbps") or []
    if samples and len(samples) == len(rounds):
        return median([100.0 * t * weight_bytes / (bw * 1e9) for t, bw in zip(samples, rounds)])
    return 100.0 * tok_s * weight_bytes / (gbps * 1e9)


def server_ratio(results: dict, peer: str) -> float | None:
    zili = get(results, "server", "zili", "bf16", "throughput_tok_s")
    if peer == "transformers":
        return ratio(zili, get(results, "transformers", "bf16", "batch_tok_s"))
    return ratio(zili, get(results, "server", "llama-server", "bf16", "throughput_tok_s"))


def goal_rows(results: dict) -> list[str]:
    rows = []
    for label, peer, figure, precision, target in GOALS:
        value = ratio(get(results, "zili", precision, figure), get(results, peer, precision, figure))
        rows.append(_goal_row(label, value, target, "x"))
    for precision in PRECISIONS:
        rows.append(_goal_row(f"decode {precision} % of bandwidth bound", bound_percent(results, "zili", precision),
                              85.0, "%"))
    rows.append(_goal_row("16 streams: zili serve vs llama-server (bf16)", server_ratio(results, "llama-server"),
                          3.0, "x"))
    rows.append(_goal_row("16 requests: zili serve vs transformers static batch", server_ratio(results, "transformers"),
                          3.0, "x"))
    return rows


def _goal_row(label: str, value: float | None, target: float, unit: str) -> str:
    status = "—" if value is None else ("reached" if value >= target else "not yet")
    shown = fmt(value, 0 if unit == "%" else 2, unit)
    return f"| {label} | >= {fmt(target, 0 if unit == '%' else 1, unit)} | {shown} | {status} |"


def offline_table(results: dict, figure: str) -> list[str]:
    decode = figure == "decode_tok_s"
    header = "| precision | zili tok/s | llama.cpp tok/s | zili / llama.cpp | transformers tok/s | zili / transformers |"
    if decode:
        header += " zili % of bound | llama.cpp % of bound | weight MB/token (zili / llama.cpp) |"
    lines = [header, header_rule(header)]
    for precision in PRECISIONS:
        zili = get(results, "zili", precision, figure)
        peer = get(results, "llama.cpp", precision, figure)
        hf = get(results, "transformers", precision, figure)
        row = (f"| {precision} (llama.cpp {GGUF_TYPE[precision]}) | {fmt(zili)} | {fmt(peer)} | "
               f"{fmt(ratio(zili, peer), 2, 'x')} | {fmt(hf)} | {fmt(ratio(zili, hf), 2, 'x')} |")
        if decode:
            mb = [get(results, e, precision, "bytes_per_token") for e in ("zili", "llama.cpp")]
            row += (f" {fmt(bound_percent(results, 'zili', precision), 0, '%')} |"
                    f" {fmt(bound_percent(results, 'llama.cpp', precision), 0, '%')} |"
                    f" {fmt(mb[0] and mb[0] / 1e6, 0)} / {fmt(mb[1] and mb[1] / 1e6, 0)} |")
        lines.append(row)
    return lines


def grouped_section(results: dict) -> list[str]:
    """zili's decode and batch figures again with num_scheduler_steps (opt-in multi-step greedy decoding)."""
    steps = next((get(results, "zili", p, "grouped_steps") for p in PRECISIONS
                  if get(results, "zili", p, "grouped_steps")), None)
    if not steps:
        return []
    header = ("| precision | decode tok/s, default | decode tok/s, grouped | gain | grouped % of bound | "
              "grouped / llama.cpp |")
    lines = [f"### zili with num_scheduler_steps={steps} (opt-in)", "", header, header_rule(header)]
    for precision in PRECISIONS:
        default = get(results, "zili", precision, "decode_tok_s")
        grouped = get(results, "zili", precision, "grouped_decode_tok_s")
        if grouped is None:
            continue
        percent = bound_percent(results, "zili", precision, "grouped_decode")
        lines.append(f"| {precision} | {fmt(default)} | {fmt(grouped)} | {fmt(ratio(grouped, default), 2, 'x')} | "
                     f"{fmt(percent, 0, '%')} | {fmt(ratio(grouped, get(results, 'llama.cpp', precision, 'decode_tok_s')), 2, 'x')} |")
    batch = get(results, "zili", "bf16", "grouped_batch_tok_s")
    hf = get(results, "transformers", "bf16", "batch_tok_s")
    lines += ["", f"{steps} greedy decode steps per engine step, each row's argmax fed back in C++: Python runs once "
              "per group instead of once per token. Tokens then reach a stream in groups, and a request that arrives "
              "meanwhile waits up to a group to start, so it is off by default."]
    if batch:
        lines.append(f"`LLM.generate` on {get(results, 'zili', 'bf16', 'batch')} requests with it: {fmt(batch)} tok/s "
                     f"({fmt(ratio(batch, get(results, 'zili', 'bf16', 'batch_tok_s')), 2, 'x')} the default, "
                     f"{fmt(ratio(batch, hf), 2, 'x')} transformers' static batch).")
    return lines + [""]


def header_rule(header: str) -> str:
    return "|" + "---|" * (header.count("|") - 1)


def server_table(results: dict) -> list[str]:
    header = ("| server | precision | throughput tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
              "tokens / request | peak RSS MB |")
    lines = [header, header_rule(header)]
    for name in ("zili", "llama-server"):
        for precision, run in sorted((get(results, "server", name) or {}).items()):
            label = precision if name == "zili" else GGUF_TYPE.get(precision, precision)
            lines.append(
                f"| {name} | {label} | {fmt(run.get('throughput_tok_s'))} | "
                f"{fmt(_ms(run.get('ttft_p50_s')), 0)} / {fmt(_ms(run.get('ttft_p99_s')), 0)} | "
                f"{fmt(_ms(run.get('tpot_p50_s')), 1)} / {fmt(_ms(run.get('tpot_p99_s')), 1)} | "
                f"{run.get('tokens_per_request', '—')} | {fmt(_mb(run.get('peak_rss_bytes')), 0)} |")
    batch = get(results, "transformers", "bf16")
    if batch and batch.get("batch_tok_s"):
        lines.append(f"| transformers (static batch of {batch.get('batch')}, offline, no server) | bf16 | "
                     f"{fmt(batch['batch_tok_s'])} | — | — | — | {fmt(_mb(batch.get('peak_rss_bytes')), 0)} |")
    zili_batch = get(results, "zili", "bf16")
    if zili_batch and zili_batch.get("batch_tok_s"):
        lines.append(f"| zili `LLM.generate` (batch of {zili_batch.get('batch')}, offline, no server) | bf16 | "
                     f"{fmt(zili_batch['batch_tok_s'])} | — | — | — | {fmt(_mb(zili_batch.get('peak_rss_bytes')), 0)} |")
    return lines


def fused_parts_table(torch_prof: dict, gbps: float | None) -> list[str]:
    """The fused C++ step's parts (torch.profiler ops of decode_layer.cpp), with the matmuls' read rates."""
    parts, weights = torch_prof.get("fused_parts_ms") or {}, torch_prof.get("fused_parts_weight_bytes") or {}
    step = torch_prof.get("fused_step_ms")
    if not parts or not step:
        return []
    lines = ["", f"Inside the fused C++ step ({fmt(step, 2)} ms under the profiler), each part's total per step; "
             "the matmuls' read rate = their weight bytes / time:", "",
             "| part | ms / step | share of the C++ step | weights MB | read GB/s | % of the read bandwidth |",
             "|---|---|---|---|---|---|"]
    for name, ms in [*parts.items(), ("rest (argument checks, the layer loop, logits widened to fp32)",
                                      step - sum(parts.values()))]:
        nbytes = weights.get(name)
        rate = nbytes / (ms / 1e3) / 1e9 if nbytes and ms else None
        lines.append(f"| {name.replace('zili_cpu::', '')} | {fmt(ms, 2)} | {fmt(100 * ms / step, 0, '%')} | "
                     f"{fmt(nbytes and nbytes / 1e6, 0)} | {fmt(rate, 1)} | "
                     f"{fmt(rate and gbps and 100 * rate / gbps, 0, '%')} |")
    return lines


def profile_section(results: dict, key: str = "profile") -> list[str]:
    """Where one decode step's time goes (benchmarks/profile_decode.py), at 1 row or at `rows`."""
    prof = results.get(key)
    if not prof:
        return []
    torch_prof = prof.get("torch_profiler", {})
    wall = prof.get("wall_ms_per_token")
    under = torch_prof.get("wall_ms_per_token_under_profiler")
    rows, precision = prof.get("rows", 1), prof.get("precision", "bf16")
    title = (f"## Where zili's batch-1 {precision} decode time goes" if rows == 1 else
             f"## Where a {rows}-row {precision} decode step's time goes ({rows} requests decoded together)")
    lines = [title, "",
             f"{fmt(wall, 1)} ms per step without a profiler ({fmt(prof.get('decode_tok_s'))} tok/s), "
             f"{fmt(under, 1)} ms under torch.profiler. Op self-time per step, charged to the innermost zili "
             "file on the op's Python stack; host overhead = wall time minus all op time (Python, scheduling, "
             "input building, dispatch).", "",
             "| part | ms / step | share of the step |", "|---|---|---|"]
    parts = dict(torch_prof.get("op_ms_per_token", {}))
    parts["host overhead (not inside any op)"] = torch_prof.get("host_overhead_ms_per_token")
    for name, ms in parts.items():
        lines.append(f"| {name} | {fmt(ms, 2)} | {fmt(ms and under and 100 * ms / under, 0, '%')} |")
    ops_ms = sum(torch_prof.get("op_ms_per_token", {}).values())
    op_ms = torch_prof.get("op_ms_per_token", {})
    fused_ms = op_ms.get(FUSED_LAYERS)
    gemv_ms = (op_ms.get("matmul (GEMV)") or 0) + (fused_ms or 0) or None
    weight_bytes = get(results, "zili", prof.get("precision", "bf16"), "bytes_per_token")
    gbps = get(results, "bandwidth", prof.get("precision", "bf16"), "best_gbps")
    if wall and ops_ms:
        lines += ["", f"Without the profiler, host overhead is about wall - op time = {fmt(wall - ops_ms, 1)} ms per "
                  "step (the profiler's own cost inflates the row above)."]
    if gemv_ms and weight_bytes and gbps and rows == 1:
        rate = weight_bytes / (gemv_ms / 1e3) / 1e9
        readers = "The fused decode step (layers, attention, norms and the lm_head GEMV)" if fused_ms \
            else "The GEMVs"
        lines += [f"{readers} read all weights ({fmt(weight_bytes / 1e6, 0)} MB) in {fmt(gemv_ms, 1)} ms: "
                  f"{fmt(rate, 1)} GB/s, {fmt(100 * rate / gbps, 0, '%')} of the measured read bandwidth; the bound "
                  f"for the whole step is {fmt(weight_bytes / (gbps * 1e9) * 1e3, 1)} ms."]
    lines += fused_parts_table(torch_prof, gbps)
    top = torch_prof.get("top_ops_ms_per_token", {})
    if top:
        lines += ["", "Top ops: " + ", ".join(f"`{k}` {v:.2f} ms" for k, v in list(top.items())[:8]) + "."]
    spy = prof.get("py_spy") or {}
    if spy.get("share_by_category"):
        shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in spy["share_by_category"].items())
        lines += ["", f"py-spy ({spy.get('samples')} samples of the decode loop, native stacks): {shares}; "
                  f"{100 * spy.get('share_python_interpreter', 0):.0f}% of samples in the Python interpreter, "
                  f"{100 * spy.get('share_native', 0):.0f}% in native code."]
    elif spy.get("error"):
        lines += ["", f"py-spy: {spy['error']}"]
    return lines + [""]


def _ms(seconds):
    return seconds * 1000 if seconds is not None else None


def _mb(num_bytes):
    return num_bytes / 1e6 if num_bytes else None


def headline_table(results: dict) -> list[str]:
    """The short table for the README: decode per precision, prefill, 16 streams, against both peers."""
    settings = results.get("settings", {})
    header = "| figure | zili | llama.cpp | zili / llama.cpp | transformers | zili / transformers |"
    rows = [(f"decode tok/s, batch 1, {p} ({GGUF_TYPE[p]})", get(results, "zili", p, "decode_tok_s"),
             get(results, "llama.cpp", p, "decode_tok_s"), get(results, "transformers", p, "decode_tok_s"))
            for p in PRECISIONS]
    rows.append((f"prefill tok/s, {settings.get('prefill_tokens', 512)} tokens, bf16",
                 get(results, "zili", "bf16", "prefill_tok_s"), get(results, "llama.cpp", "bf16", "prefill_tok_s"),
                 get(results, "transformers", "bf16", "prefill_tok_s")))
    rows.append((f"throughput tok/s, {settings.get('streams', 16)} streams, bf16 (servers; transformers: "
                 "static batch)", get(results, "server", "zili", "bf16", "throughput_tok_s"),
                 get(results, "server", "llama-server", "bf16", "throughput_tok_s"),
                 get(results, "transformers", "bf16", "batch_tok_s")))
    lines = [header, header_rule(header)]
    for label, zili, peer, hf in rows:
        lines.append(f"| {label} | {fmt(zili)} | {fmt(peer)} | {fmt(ratio(zili, peer), 2, 'x')} | {fmt(hf)} | "
                     f"{fmt(ratio(zili, hf), 2, 'x')} |")
    return lines


def run_lines(results: dict, settings: dict) -> list[str]:
    runs = results.get("runs")
    if not runs:
        return [f"Generated by `make bench` (`python benchmarks/run.py`) on {results.get('date', '?')}. Every "
                "figure is from this one run on this machine; ratios are zili / peer measured in the same run. "
                f"Median of {settings.get('reps', '?')} repetitions; each repetition measures every engine in "
                "turn, so all engines see the same background load.", ""]
    lines = ["Generated by `python benchmarks/report.py` from several runs of `benchmarks/run.py` on this machine; "
             "a later run's figures replace an earlier run's (zili and each peer of a ratio always come from the "
             "same run):", ""]
    lines += [f"- {run['date']}: {', '.join(run.get('figures') or [])} (load average at start "
              f"{run.get('load_average_at_start')}). {run.get('note', '')}" for run in runs]
    return lines + [""]


PAGE_NAMES = {"2m": "2 MiB pages", "4k": "4 KiB pages"}


def bandwidth_text(probe: dict) -> str:
    """'27.1 GB/s best, 26.8 median on 2 MiB pages (4 KiB pages: 19.2 / 18.8)': the bound first."""
    text = f"{fmt(probe.get('best_gbps'))} GB/s best, {fmt(probe.get('median_gbps'))} median"
    if len(probe.get("rounds_gbps", [])) > 1:
        text += f" (best per round: {' / '.join(fmt(r) for r in probe['rounds_gbps'])})"
    others = {name: b for name, b in probe.get("by_page", {}).items() if name != probe.get("pages")}
    if probe.get("pages"):
        text += f" on {PAGE_NAMES.get(probe['pages'], probe['pages'])}"
    for name, b in others.items():
        text += f" ({PAGE_NAMES.get(name, name)}: {fmt(b.get('best_gbps'))} / {fmt(b.get('median_gbps'))})"
    return text


def render_markdown(results: dict) -> str:
    machine = results.get("machine", {})
    versions = results.get("versions", {})
    bandwidth = results.get("bandwidth", {})
    bw_text = "; ".join(f"{p}: {bandwidth_text(b)} over {fmt(b.get('bytes', 0) / 1e6, 0)} MB"
                        for p, b in bandwidth.items()) or "—"
    settings = results.get("settings", {})
    out = [
        "# zili benchmarks",
        "",
        *run_lines(results, settings),
        f"**Machine:** {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"{machine.get('memory_gib', '?')} GiB RAM, ISA {', '.join(machine.get('isa', []))}; {machine.get('os', '')}. "
        + ("" if results.get("runs") else
           f"Load average when the run started: {machine.get('load_average_at_start', '?')}; ")
        + f"threads per engine: {settings.get('threads', '?')}.",
        "",
        *([f"> **Note:** {results['note']}", ""] if results.get("note") else []),
        "**Versions:** " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
        "**Workload** (docs PERFORMANCE.md): random-weight Llama, hidden 896, intermediate 4864, 24 layers, "
        "14 heads, 2 KV heads, vocab 32000, tied embeddings (~387M parameters), created by "
        "`benchmarks/make_checkpoint.py`; llama.cpp runs the same weights converted to GGUF. Generation length "
        "is fixed (EOS ignored).",
        "",
        f"**Read bandwidth** (streaming read, buffer the size of the weights; the bound uses the faster "
        f"page size, and zili keeps its weights on 2 MiB pages): {bw_text}.",
        "",
        *headline_table(results),
        "",
        "![benchmarks](benchmarks.png)",
        "",
        f"## Batch-1 decode ({settings.get('decode_tokens', 128)} new tokens after a short prompt)",
        "",
        *offline_table(results, "decode_tok_s"),
        "",
        "% of bound = decode tok/s x weight bytes read per token / read bandwidth, each round against the read "
        "of the same round (the median over rounds is shown; the tied embedding is read once, as the output head).",
        "",
        *grouped_section(results),
        f"## Prefill ({settings.get('prefill_tokens', 512)}-token prompt)",
        "",
        *offline_table(results, "prefill_tok_s"),
        "",
        f"## Server: {settings.get('streams', 16)} concurrent streams x {settings.get('decode_tokens', 128)} tokens",
        "",
        *server_table(results),
        "",
        "Throughput = all generated tokens / wall time of a round of concurrent streaming requests "
        "(`benchmarks/load_client.py`, the same client for both servers); TTFT and TPOT pooled over all "
        "requests of all rounds; peak RSS summed over the server's process tree.",
        "",
        *profile_section(results),
        *profile_section(results, "profile_batch"),
        *profile_section(results, "profile_int4"),
        "## Goals (issue 7)",
        "",
        "| goal | target | measured | status |",
        "|---|---|---|---|",
        *goal_rows(results),
        "",
    ]
    if results.get("errors"):
        out += ["## Not measured in this run", "", *[f"- {e}" for e in results["errors"]], ""]
    schemes = "; ".join(f"{p}: {get(results, 'zili', p, 'quant_scheme')}" for p in PRECISIONS[1:]
                        if get(results, "zili", p, "quant_scheme"))
    out += ["## Method", "",
            "- zili: `zili.llm.LLM` and its engine (`benchmarks/offline_zili.py`) and `zili serve`; int8 / int4 "
            f"checkpoints from `zili quantize` with its defaults ({schemes or 'not made in this run'}; embeddings "
            "stay bf16, so the tied output head is read in bf16).",
            "- llama.cpp: `llama-bench -t T -p 512 -n 128 -r N` and `llama-server -np 16`, built from the "
            "llama-cpp-python source package with AVX-512 and without AMX (`benchmarks/setup_peers.py`).",
            "- transformers: `generate` in bf16 (`benchmarks/offline_transformers.py`); its 16-request figure is "
            "a static batch, as in PERFORMANCE.md.",
            "- Decode tok/s for zili and transformers = 128 / (time of new token 129 - time of new token 1), from "
            "per-token timestamps, so the prompt's prefill is not counted (llama-bench's tg128 times the same "
            "steps); prefill tok/s = 512 / time to the first new token.",
            ""]
    return "\n".join(out)


def render_chart(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results.get("settings", {})
    engines = (("zili", "#2a7"), ("llama.cpp", "#37c"), ("transformers", "#c73"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (("decode tok/s, batch 1", "decode_tok_s"),
              (f"prefill tok/s, {settings.get('prefill_tokens', 512)} tokens", "prefill_tok_s"))
    for ax, (title, figure) in zip(axes, panels):
        width = 0.27
        for offset, (engine, color) in enumerate(engines):
            values = [get(results, engine, p, figure) or 0 for p in PRECISIONS]
            bars = ax.bar([i + (offset - 1) * width for i in range(len(PRECISIONS))], values, width,
                          label=engine, color=color)
            ax.bar_label(bars, labels=[f"{v:.0f}" if v else "" for v in values], fontsize=7)
        ax.set_xticks(range(len(PRECISIONS)), [f"{p}\n({GGUF_TYPE[p]})" for p in PRECISIONS])
        ax.set_title(title)
        ax.legend(fontsize=8)
    labels, values, colors = [], [], []
    for name, label, color in (("zili", "zili serve", "#2a7"), ("llama-server", "llama-server", "#37c")):
        for precision, run in sorted((get(results, "server", name) or {}).items()):
            labels.append(f"{label}\n{precision}")
            values.append(run.get("throughput_tok_s") or 0)
            colors.append(color)
    hf = get(results, "transformers", "bf16", "batch_tok_s")
    if hf:
        labels.append("transformers\nstatic batch")
        values.append(hf)
        colors.append("#c73")
    bars = axes[2].bar(range(len(values)), values, color=colors)
    axes[2].bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=7)
    axes[2].set_xticks(range(len(values)), labels, fontsize=8)
    axes[2].set_title(f"{settings.get('streams', 16)} concurrent streams, tok/s")
    fig.suptitle(f"zili vs peers, {results.get('machine', {}).get('cores', '?')} cores, {results.get('date', '')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, doc_path: Path = DOC_PATH, chart_path: Path = CHART_PATH) -> None:
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(render_markdown(results))
    try:
        render_chart(results, chart_path)
    except ImportError:
        print("[report] matplotlib missing: no chart (run benchmarks/setup_peers.py)", file=sys.stderr)


def merge_runs(runs: list[dict]) -> dict:
    """Later runs override earlier ones figure by figure (e.g. a quiet re-run of decode on top of a
    full run); the report lists every run with its date, figures and note."""
    def deep_merge(base: dict, newer: dict) -> dict:
        for key, value in newer.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                deep_merge(base[key], value)
            else:
                base[key] = value
        return base

    merged: dict = {}
    for run in runs:
        deep_merge(merged, json.loads(json.dumps(run)))
    merged["errors"] = [f"({run.get('date')}) {e}" for run in runs for e in run.get("errors", [])]
    merged["runs"] = [{"date": run.get("date"), "figures": run.get("settings", {}).get("figures"),
                       "note": run.get("note", ""), "load_average_at_start":
                       run.get("machine", {}).get("load_average_at_start")} for run in runs]
    merged["note"] = ""
    return merged


def main(argv: list[str] | None = None) -> int:
    """report.py [RESULTS.json ...]: render one run (default: latest.json) or several merged in order."""
    argv = sys.argv[1:] if argv is None else argv
    sources = [Path(a) for a in argv] or [RESULTS_DIR / "latest.json"]
    runs = [json.loads(source.read_text()) for source in sources]
    results = runs[0] if len(runs) == 1 else merge_runs(runs)
    write_report(results)
    print("\n".join(headline_table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

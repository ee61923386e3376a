"""`zili serve [MODEL]`: OpenAI-compatible HTTP API and web chat page (see zili/serve/)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from zili.commands.common import add_engine_arguments, add_model_arguments
from zili.errors import ZiliError


def _size(text: str) -> str:
    return text  # parsed by the engine ("4GiB" or bytes); kept as given


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--api-key", default=os.environ.get("ZILI_API_KEY"),
                        help="require this key on every route but /health and /ready (default: $ZILI_API_KEY)")
    parser.add_argument("--served-model-name", action="append", default=[], dest="served_model_names",
                        help="name clients use in `model` (repeatable; default: the folder name)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="requests running at once")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting; more get 503 + Retry-After")
    parser.add_argument("--queue-timeout", type=float, default=60.0, help="seconds a request may wait in the queue")
    parser.add_argument("--kv-cache-memory", type=_size, default=None, help='KV cache size, e.g. "4GiB"')
    parser.add_argument("--max-model-len", type=int, default=None, help="context length limit")
    parser.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="request body limit")
    parser.add_argument("--allowed-origin", action="append", default=[], dest="allowed_origins",
                        help="enable CORS for this exact origin (repeatable; default: CORS off)")
    parser.add_argument("--allowed-host", action="append", default=None, dest="allowed_hosts",
                        help="accepted Host header name (repeatable; default: loopback names when bound to loopback)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish on SIGTERM")
    parser.add_argument("--in-process", action="store_true",
                        help="run the engine in the HTTP process (debugging; slower on few cores)")
    parser.add_argument("--no-access-log", action="store_false", dest="access_log")
    parser.add_argument("--fault-injection", action="append", default=[], help=argparse.SUPPRESS)
    parser.set_defaults(run=run)


def _check_weights(model: Path) -> None:
    """Refuse pickle-only folders and lying safetensors headers before binding a port.

    Reads headers only; the engine process checks again when it loads.
    """
    from zili.models.loader import weight_files
    from zili.models.safetensors_check import read_header

    for path in weight_files(model):
        read_header(path)


def run(args: argparse.Namespace) -> int:
    from zili.llm import default_model_path
    from zili.serve.server import run_server
    from zili.serve.settings import ServeSettings

    if args.fault_injection and os.environ.get("ZILI_TEST_MODE") != "1":
        raise ZiliError("--fault-injection is only available in test mode")
    model = Path(args.model) if args.model else default_model_path()
    if not (model / "config.json").is_file():
        raise ZiliError(f"{model} is not a model folder (no config.json)")
    _check_weights(model)
    settings = ServeSettings(
        model=model, host=args.host, port=args.port, api_key=args.api_key,
        served_model_names=args.served_model_names, max_num_seqs=args.max_num_seqs, max_queue=args.max_queue,
        queue_timeout_s=args.queue_timeout, kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len, num_scheduler_steps=args.num_scheduler_steps,
        max_body_bytes=args.max_body_bytes, allowed_origins=args.allowed_origins, allowed_hosts=args.allowed_hosts,
        drain_timeout_s=args.drain_timeout, in_process=args.in_process, access_log=args.access_log,
        device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
        fault_injection=args.fault_injection)
    return run_server(settings)

"""The training loop: tokenizer, model, AdamW with warmup + cosine, gradient accumulation,
mixed precision, validation, checkpoints, data parallelism, and the exported model folder.

`train(TrainOptions(...))` runs one job end to end. Ctrl-C (or SIGTERM) asks the loop to stop
at the next step boundary: it writes a checkpoint and returns; `resume=True` continues it on
the same loss curve (model, optimizer, data order and step count all come back).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from zili.devices import best_device, cpu_has_native_bf16, parse_dtype
from zili.errors import InvalidRequestError
from zili.train import checkpoint as ckpt
from zili.train.data import read_corpus, sample_batch, split_validation
from zili.train.distributed import DistEnv, init_distributed, worker_threads
from zili.train.evaluate import windowed_nll
from zili.train.model import CausalLMLoss, build_training_model
from zili.train.presets import TrainConfig
from zili.train.tokenizer_training import EOS_TOKEN, save_tokenizer, train_bpe

CALIBRATION_STEPS = 5
"""Steps timed before a --time-budget run first sets its schedule length."""
REFIT_INTERVAL = 10
"""A --time-budget run re-fits max_steps to its measured speed every this many steps, so the
cosine still ends on time when the machine gets busier or quieter."""
DEADLINE_SLACK = 1.1
"""A time-budget run ends (and exports) at the latest at budget * this."""
OUTPUT_FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "heldout.txt", "training_report.json", "README.md", "train.log",
                ckpt.CHECKPOINT_DIR, ckpt.CHECKPOINT_DIR + ".tmp", ckpt.CHECKPOINT_DIR + ".old"}


@dataclass
class TrainOptions:
    corpus: Path
    output: Path
    config: TrainConfig
    val_file: Path | None = None
    """Validation text; default: the last 2% of the corpus, cut at a line start."""
    resume: bool = False
    overwrite: bool = False
    time_budget_s: float | None = None
    """Wall-clock budget: max_steps (at most the config's) is fitted to the measured speed."""
    precision: str = "auto"
    """auto (bf16 autocast where the device computes bf16 natively), bf16 or fp32."""
    device: str | None = None
    save_dtype: str = "bfloat16"
    data_card: Path | None = None
    """Markdown about the data (source, licence) pasted into the model card."""
    command: str | None = None
    """The command line that produced the model, quoted in the model card."""
    sample_prompts: tuple[str, ...] = ("The", "I will")
    keep_checkpoint: bool = False
    """Keep OUT/checkpoint after a finished run (it is always kept after an interruption)."""
    progress: bool = True


@dataclass
class TrainResult:
    output: Path
    step: int
    finished: bool
    """False when the run stopped early and left a checkpoint to resume."""
    history: list[dict] = field(default_factory=list)
    """{"step", "loss", "lr"} per optimizer step (loss averaged over processes and micro-batches)."""
    val_history: list[dict] = field(default_factory=list)
    report: dict | None = None


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to config.lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_autocast(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise InvalidRequestError(f"precision must be auto, bf16 or fp32 (got {precision!r})", param="precision")
    if precision == "fp32":
        return None
    if precision == "bf16" or torch.device(device).type != "cpu" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


class StopRequest:
    """SIGINT / SIGTERM set `requested`; the loop stops at the next step boundary.

    A second Ctrl-C raises KeyboardInterrupt at once. Handlers are only installed from the main
    thread (signal's rule) and restored on exit.
    """

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("stopping after this step to write a checkpoint (Ctrl-C again to abort)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_output(out: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        ckpt.read_checkpoint_state(out)
        return
    if out.exists() and not out.is_dir():
        raise InvalidRequestError(f"output {out} exists and is not a folder", param="output")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise InvalidRequestError(f"output folder {out} already exists and is not empty; pass --overwrite to "
                                  "replace it, or --resume to continue its checkpoint", param="output")
    foreign = [name for name in entries if name not in OUTPUT_FILES]
    if foreign:
        raise InvalidRequestError(f"refusing to overwrite {out}: it holds files a training run does not write "
                                  f"({', '.join(foreign[:5])})", param="output")


def encode(tokenizer: HFTokenizer, text: str) -> torch.Tensor:
    """(N,) int32 token ids; the corpus' <|endoftext|> strings become the EOS token."""
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.int32)


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: str) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms). Fused kernels where available."""
    params = list(model.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def train(opts: TrainOptions, on_step: Callable[[int, float], bool] | None = None) -> TrainResult:
    """Run a training job. `on_step(step, loss) -> True` asks to stop (as Ctrl-C does)."""
    out = Path(opts.output)
    check_output(out, opts.resume, opts.overwrite)
    config = ckpt.config_from_checkpoint(ckpt.read_checkpoint_state(out)["config"]) if opts.resume else opts.config
    text = read_corpus(opts.corpus)
    if opts.val_file is not None:
        val_text = read_corpus(opts.val_file, param="val_file")
    else:
        text, val_text = split_validation(text)
    device = opts.device or best_device()
    autocast_dtype = resolve_autocast(opts.precision, device)
    save_dtype = parse_dtype(opts.save_dtype, device)
    env = init_distributed(torch.device(device).type)
    try:
        return _run(opts, config, out, text, val_text, device, autocast_dtype, save_dtype, env, on_step)
    finally:
        env.close()


def _prepare_tokenizer(opts: TrainOptions, config: TrainConfig, out: Path, text: str, env: DistEnv) -> HFTokenizer:
    if env.is_main and not opts.resume:
        if opts.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        save_tokenizer(train_bpe(text.split(EOS_TOKEN), config.vocab_size), out, config.context_length)
    env.barrier()
    return HFTokenizer.from_file(str(out / "tokenizer.json"))


def _run(opts, config, out, text, val_text, device, autocast_dtype, save_dtype, env: DistEnv, on_step):
    torch.set_num_threads(worker_threads(env.world_size))
    tokenizer = _prepare_tokenizer(opts, config, out, text, env)
    train_tokens, val_tokens = encode(tokenizer, text), encode(tokenizer, val_text)
    if len(train_tokens) <= config.context_length:
        raise InvalidRequestError(f"the corpus has {len(train_tokens)} tokens; training needs more than the "
                                  f"context length ({config.context_length})", param="corpus")
    if len(val_tokens) < 2:
        raise InvalidRequestError("the validation text has fewer than 2 tokens", param="val_file")

    torch.manual_seed(config.seed)
    model = build_training_model(config, device)
    optimizer = make_optimizer(model, config, device)
    generator = torch.Generator().manual_seed(config.seed + 1)
    state = {"step": 0, "tokens": 0, "elapsed_s": 0.0, "history": [], "val_history": []}
    if opts.resume:
        state.update(ckpt.load_checkpoint(out, model, optimizer, generator))
    loss_module = CausalLMLoss(model)
    if env.active:
        loss_module = DistributedDataParallel(loss_module)

    def evaluate() -> float:
        model.eval()
        total, count = windowed_nll(model, val_tokens, config.context_length, env.rank, env.world_size,
                                    autocast_dtype)
        model.train()
        total, count = env.all_sum([total, count])
        return total / count

    def save() -> None:
        if env.is_main:
            ckpt.save_checkpoint(out, model, optimizer, generator, {**state, "config": config.to_dict()})
        env.barrier()

    step = state["step"]
    tokens_per_step = config.tokens_per_step * env.world_size
    run_start, elapsed_before = time.perf_counter(), state["elapsed_s"]
    # a time budget fits max_steps to the speed measured from the end of the first step on
    fit_budget = bool(opts.time_budget_s) and not opts.resume
    upper_steps, timing_start = config.max_steps, None
    bar = tqdm(total=config.max_steps, initial=step, unit="step", desc="training",
               disable=not (opts.progress and env.is_main), dynamic_ncols=True)
    stopped = False
    with StopRequest() as stop, bar:
        while step < config.max_steps:
            step_start = time.perf_counter()
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(config.grad_accum):
                batch = sample_batch(train_tokens, config.batch_size, config.context_length, generator,
                                     env.rank, env.world_size).to(device)
                last = micro == config.grad_accum - 1
                sync = loss_module.no_sync() if env.active and not last else contextlib.nullcontext()
                with sync:
                    with torch.autocast(torch.device(device).type, dtype=autocast_dtype or torch.float32,
                                        enabled=autocast_dtype is not None):
                        loss = loss_module(batch)
                    (loss / config.grad_accum).backward()
                loss_sum += loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            user_stop = bool(on_step and on_step(step, loss_sum / config.grad_accum))
            loss_total, stop_votes = env.all_sum([loss_sum / config.grad_accum, float(stop.requested or user_stop)])
            mean_loss = loss_total / env.world_size
            now = time.perf_counter()
            state["step"], state["tokens"] = step, state["tokens"] + tokens_per_step
            state["elapsed_s"] = elapsed_before + now - run_start
            state["history"].append({"step": step, "loss": mean_loss, "lr": lr})
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / (now - step_start):.0f}")

            if fit_budget and timing_start is None:
                timing_start = (step, now)
            elif fit_budget and (step - timing_start[0]) % REFIT_INTERVAL == CALIBRATION_STEPS % REFIT_INTERVAL:
                per_step = (now - timing_start[1]) / (step - timing_start[0])  # evals included
                config = _fit_budget(config, upper_steps, opts.time_budget_s - state["elapsed_s"], per_step, step,
                                     env)
                bar.total = config.max_steps
            if opts.time_budget_s and state["elapsed_s"] > opts.time_budget_s * DEADLINE_SLACK:
                config = replace(config, max_steps=step)  # the budget is spent: end (and export) here
            if step % config.eval_interval == 0 or step == config.max_steps:
                val_loss = evaluate()
                state["val_history"].append({"step": step, "loss": val_loss, "perplexity": math.exp(val_loss)})
                if env.is_main:
                    tqdm.write(f"step {step}: train loss {mean_loss:.4f}, val loss {val_loss:.4f} "
                               f"(ppl {math.exp(val_loss):.2f}), {state['tokens']:,} tokens, "
                               f"{state['elapsed_s']:.0f}s")
            if stop_votes:
                stopped = True
                break
            if step % config.checkpoint_interval == 0 and step < config.max_steps:
                save()
    save()
    result = TrainResult(out, step, finished=not stopped, history=state["history"],
                         val_history=state["val_history"])
    if stopped:
        if env.is_main:
            tqdm.write(f"checkpoint written at step {step}; continue with --resume")
        return result
    if env.is_main:
        from zili.train.report import write_report  # loads the exported model; only needed at the end

        ckpt.export_model(out, model, config, save_dtype)
        (out / "heldout.txt").write_text(val_text)
        result.report = write_report(out, opts, config, state, env.world_size, autocast_dtype, device)
        if not opts.keep_checkpoint:
            shutil.rmtree(out / ckpt.CHECKPOINT_DIR, ignore_errors=True)
    env.barrier()
    return result


def _fit_budget(config: TrainConfig, upper_steps: int, remaining_s: float, per_step_s: float, step: int,
                env: DistEnv) -> TrainConfig:
    """max_steps so the rest of the run fits the time left, at most `upper_steps`."""
    steps = env.broadcast_int(max(step + 1, min(upper_steps, step + int(remaining_s / per_step_s))))
    if env.is_main and steps != config.max_steps:
        tqdm.write(f"time budget: {per_step_s:.2f}s per step, training for {steps} steps")
    return replace(config, max_steps=steps)

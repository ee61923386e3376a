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
    """AdamW; weight decay on matrices only (not norms). Fused kernels on CPU and CUDA."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = torch.device(device).type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def train(opts: TrainOptions, on_step: Callable[[int, float], bool] | None = None) -> TrainResult:
    """Run a training job. `on_step(step, loss) -> True` asks to stop (as Ctrl-C does).

    Everything that can be refused (output folder, corpus, options) is checked before any
    process writes anything or joins the process group.
    """
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
        trainer = Trainer(opts, config, text, val_text, device, autocast_dtype, env)
        finished = trainer.run(on_step)
        result = TrainResult(out, trainer.step, finished, trainer.state["history"], trainer.state["val_history"])
        if finished:
            result.report = trainer.export(save_dtype)
        elif env.is_main:
            tqdm.write(f"checkpoint written at step {trainer.step}; continue with --resume")
        return result
    finally:
        env.close()


class Trainer:
    """One training job: data, model, optimizer and the loop state every process shares.

    `state` is what a checkpoint stores besides tensors: step, tokens seen, elapsed seconds and
    the loss history; `config` may change its max_steps when a time budget is fitted.
    """

    def __init__(self, opts: TrainOptions, config: TrainConfig, text: str, val_text: str, device: str,
                 autocast_dtype: torch.dtype | None, env: DistEnv):
        self.opts, self.config, self.out, self.env = opts, config, Path(opts.output), env
        self.device, self.autocast_dtype, self.val_text = device, autocast_dtype, val_text
        torch.set_num_threads(worker_threads(env.world_size))
        tokenizer = self._prepare_tokenizer(text)
        self.train_tokens, self.val_tokens = encode(tokenizer, text), encode(tokenizer, val_text)
        if len(self.train_tokens) <= config.context_length:
            raise InvalidRequestError(f"the corpus has {len(self.train_tokens)} tokens; training needs more than "
                                      f"the context length ({config.context_length})", param="corpus")
        if len(self.val_tokens) < 2:
            raise InvalidRequestError("the validation text has fewer than 2 tokens", param="val_file")
        torch.manual_seed(config.seed)
        self.model = build_training_model(config, device)
        self.optimizer = make_optimizer(self.model, config, device)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.state = {"step": 0, "tokens": 0, "elapsed_s": 0.0, "history": [], "val_history": []}
        if opts.resume:
            self.state.update(ckpt.load_checkpoint(self.out, self.model, self.optimizer, self.generator))
        loss_module = CausalLMLoss(self.model)
        self.loss_module = DistributedDataParallel(loss_module) if env.active else loss_module

    @property
    def step(self) -> int:
        return self.state["step"]

    def _prepare_tokenizer(self, text: str) -> HFTokenizer:
        """Rank 0 trains and saves the tokenizer (a resumed run reuses it); every rank reads the file."""
        if self.env.is_main and not self.opts.resume:
            if self.opts.overwrite and self.out.exists():
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            save_tokenizer(train_bpe(text.split(EOS_TOKEN), self.config.vocab_size), self.out,
                           self.config.context_length)
        self.env.barrier()
        return HFTokenizer.from_file(str(self.out / "tokenizer.json"))

    def _autocast(self):
        return torch.autocast(torch.device(self.device).type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches -> (lr, this process's mean loss)."""
        config = self.config
        lr = lr_at(self.step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            batch = sample_batch(self.train_tokens, config.batch_size, config.context_length, self.generator,
                                 self.env.rank, self.env.world_size).to(self.device)
            last = micro == config.grad_accum - 1
            # DDP all-reduces gradients on the last micro-batch only
            sync = self.loss_module.no_sync() if self.env.active and not last else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    loss = self.loss_module(batch)
                (loss / config.grad_accum).backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, loss_sum / config.grad_accum

    def evaluate(self) -> float:
        """Mean validation NLL (nats per token), the windows shared among the processes."""
        self.model.eval()
        total, count = windowed_nll(self.model, self.val_tokens, self.config.context_length, self.env.rank,
                                    self.env.world_size, self.autocast_dtype)
        self.model.train()
        total, count = self.env.all_sum([total, count])
        return total / count

    def save(self) -> None:
        if self.env.is_main:
            ckpt.save_checkpoint(self.out, self.model, self.optimizer, self.generator,
                                 {**self.state, "config": self.config.to_dict()})
        self.env.barrier()

    def run(self, on_step: Callable[[int, float], bool] | None = None) -> bool:
        """Train to max_steps (True) or until a stop request (False); a checkpoint is saved either way."""
        opts, env, state = self.opts, self.env, self.state
        tokens_per_step = self.config.tokens_per_step * env.world_size
        run_start, elapsed_before = time.perf_counter(), state["elapsed_s"]
        budget = _BudgetFit(opts.time_budget_s, self.config.max_steps, env) if opts.time_budget_s else None
        bar = tqdm(total=self.config.max_steps, initial=self.step, unit="step", desc="training",
                   disable=not (opts.progress and env.is_main), dynamic_ncols=True)
        with StopRequest() as stop, bar:
            while self.step < self.config.max_steps:
                step_start = time.perf_counter()
                lr, loss = self.train_step()
                step = self.step + 1
                user_stop = bool(on_step and on_step(step, loss))
                loss_total, stop_votes = env.all_sum([loss, float(stop.requested or user_stop)])
                now = time.perf_counter()
                state["step"], state["tokens"] = step, state["tokens"] + tokens_per_step
                state["elapsed_s"] = elapsed_before + now - run_start
                state["history"].append({"step": step, "loss": loss_total / env.world_size, "lr": lr})
                bar.update(1)
                bar.set_postfix(loss=f"{loss_total / env.world_size:.3f}", lr=f"{lr:.2e}",
                                tok_s=f"{tokens_per_step / (now - step_start):.0f}")
                if budget:
                    self.config = budget.fit(self.config, step, state["elapsed_s"], now, resumed=opts.resume)
                    bar.total = self.config.max_steps
                if step % self.config.eval_interval == 0 or step == self.config.max_steps:
                    self._validate()
                if stop_votes:
                    self.save()
                    return False
                if step % self.config.checkpoint_interval == 0 and step < self.config.max_steps:
                    self.save()
        self.save()
        return True

    def _validate(self) -> None:
        val_loss = self.evaluate()
        state = self.state
        state["val_history"].append({"step": self.step, "loss": val_loss, "perplexity": math.exp(val_loss)})
        if self.env.is_main:
            tqdm.write(f"step {self.step}: train loss {state['history'][-1]['loss']:.4f}, val loss {val_loss:.4f} "
                       f"(ppl {math.exp(val_loss):.2f}), {state['tokens']:,} tokens, {state['elapsed_s']:.0f}s")

    def export(self, save_dtype: torch.dtype) -> dict | None:
        """Rank 0 writes the model folder, heldout.txt and the report; returns the report there."""
        report = None
        if self.env.is_main:
            from zili.train.report import write_report  # loads the exported model; only needed at the end

            ckpt.export_model(self.out, self.model, self.config, save_dtype)
            (self.out / "heldout.txt").write_text(self.val_text)
            report = write_report(self.out, self.opts, self.config, self.state, self.env.world_size,
                                  self.autocast_dtype, self.device)
            if not self.opts.keep_checkpoint:
                shutil.rmtree(self.out / ckpt.CHECKPOINT_DIR, ignore_errors=True)
        self.env.barrier()
        return report


class _BudgetFit:
    """Fits max_steps to a wall-clock budget from the measured speed (evaluation included).

    Timing starts after the first step (start-up costs); max_steps is set after
    CALIBRATION_STEPS more and re-fitted every REFIT_INTERVAL steps, never above the config's
    own max_steps. Past budget * DEADLINE_SLACK the run ends at once. A resumed run keeps its
    step count and only honours the deadline.
    """

    def __init__(self, budget_s: float, upper_steps: int, env: DistEnv):
        self.budget_s, self.upper_steps, self.env = budget_s, upper_steps, env
        self.start: tuple[int, float] | None = None

    def fit(self, config: TrainConfig, step: int, elapsed_s: float, now: float, resumed: bool) -> TrainConfig:
        if self.env.broadcast_int(int(elapsed_s > self.budget_s * DEADLINE_SLACK)):  # ranks must agree
            return replace(config, max_steps=step)  # the budget is spent: end (and export) here
        if resumed:
            return config
        if self.start is None:
            self.start = (step, now)
            return config
        done = step - self.start[0]
        if done % REFIT_INTERVAL != CALIBRATION_STEPS % REFIT_INTERVAL:
            return config
        per_step_s = (now - self.start[1]) / done
        steps = step + int((self.budget_s - elapsed_s) / per_step_s)
        steps = self.env.broadcast_int(max(step + 1, min(self.upper_steps, steps)))
        if self.env.is_main and steps != config.max_steps:
            tqdm.write(f"time budget: {per_step_s:.2f}s per step, training for {steps} steps")
        return replace(config, max_steps=steps)

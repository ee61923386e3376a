"""The `zili` command end to end, in subprocesses: generate, chat over stdin, and clean errors.

A few real subprocesses (started together, since each pays the torch import) cover the entry
point, stdin/stdout and exit codes; the other cases call `zili.cli.main` in this process, the same
code path. Every expected output comes from the reference loop on the same folder. Runs use fp32:
in bf16 the engine's paged attention and the reference's dense attention round differently, so
greedy picks may legitimately differ on near-ties.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tiny_models import copy_checkpoint, make_checkpoint
from zili.generation import generate_tokens
from zili.models.generation_config import GenerationDefaults
from zili.models.loader import load_model
from zili.models.tokenizer import Tokenizer
from zili.sampling_params import SamplingParams

ZILI = Path(sys.executable).parent / "zili"
PROMPT = "Hello world"
MAX_TOKENS = 8
TIMEOUT_S = 120


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def start(args: list[str], stdin: str | None = None) -> tuple[subprocess.Popen, str | None]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.Popen([str(ZILI), *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", env=env)
    return proc, stdin


def finish(started: tuple[subprocess.Popen, str | None]) -> Result:
    proc, stdin = started
    stdout, stderr = proc.communicate(stdin or "", timeout=TIMEOUT_S)
    return Result(proc.returncode, stdout, stderr)


def run_all(commands: dict[str, tuple[list[str], str | None]]) -> dict[str, Result]:
    started = {name: start(args, stdin) for name, (args, stdin) in commands.items()}
    return {name: finish(proc) for name, proc in started.items()}


# ---- fixtures: a checkpoint, its reference replies, broken copies, the subprocess runs ---------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli"), "Qwen2ForCausalLM", seed=3)


@pytest.fixture(scope="module")
def reference(folder):
    """(tokenizer, reply(prompt_ids) -> greedy text of the reference loop)."""
    model, _ = load_model(folder, device="cpu", dtype=torch.float32)
    tokenizer = Tokenizer.from_folder(folder)
    eos = GenerationDefaults.from_folder(folder).eos_token_ids
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)

    def reply(prompt_ids: list[int]) -> str:
        tokens = [s.token_id for s in generate_tokens(model, prompt_ids, params, eos, max_model_len=256)]
        return tokenizer.decode(tokens)

    return tokenizer, reply


def _write_header(path: Path, header: dict, data_bytes: int) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes)


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


ERROR_CASES = {
    # name: (how to damage a copy of the checkpoint, words the message must contain)
    "missing-folder": (None, ["model folder not found"]),
    "missing-config": (lambda f: (f / "config.json").unlink(), ["no config.json"]),
    "config-not-json": (lambda f: (f / "config.json").write_text("{oops"), ["not valid JSON"]),
    "unknown-architecture": (lambda f: _edit_config(f, architectures=["BertModel"]),
                             ["'BertModel' is not supported", "LlamaForCausalLM", "Qwen3ForCausalLM"]),
    "missing-weights": (lambda f: (f / "model.safetensors").unlink(), ["no *.safetensors"]),
    "pickle-only": (lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"), ["pickle"]),
    "truncated": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
                  ["truncated"]),
    "lying-header": (lambda f: _write_header(f / "model.safetensors", {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, 24), ["overlap"]),
    "shape-mismatch": (lambda f: _edit_config(f, intermediate_size=96), ["shape mismatch", "mlp"]),
}


@pytest.fixture(scope="module")
def broken_folders(folder, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("errors")
    folders = {}
    for name, (damage, _) in ERROR_CASES.items():
        folders[name] = base / "does-not-exist"
        if damage is not None:
            folders[name] = copy_checkpoint(folder, base / name)
            damage(folders[name])
    return folders


SAMPLING = ["--max-tokens", MAX_TOKENS, "--temperature", 0, "--dtype", "float32"]
CHAT_INPUT = "Hello\nHow are you?\n/reset\nNew topic\n"   # then EOF
SUBPROCESS_ERROR_CASES = ["missing-folder", "truncated"]


@pytest.fixture(scope="module")
def runs(folder, broken_folders):
    """The real `zili` processes, all started at once."""
    commands = {
        "generate": (["generate", folder, PROMPT, *SAMPLING], None),
        "chat": (["chat", folder, *SAMPLING], CHAT_INPUT),
        "debug": (["generate", "--debug", broken_folders["missing-folder"], "hi"], None),
    }
    for name in SUBPROCESS_ERROR_CASES:
        commands[name] = (["generate", broken_folders[name], "hi", "--max-tokens", 2], None)
    return run_all(commands)


def run_in_process(args: list, capsys, monkeypatch=None, stdin: str | None = None) -> Result:
    """`zili ARGS` through zili.cli.main in this process (same code path, no interpreter start-up)."""
    from zili.cli import main

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    returncode = main([str(a) for a in args])
    captured = capsys.readouterr()
    return Result(returncode, captured.out, captured.err)


# ---- generate and chat ---------------------------------------------------------------------

def test_generate_prints_prompt_and_reference_continuation(runs, reference):
    tokenizer, reply = reference
    result = runs["generate"]
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + reply(tokenizer.encode(PROMPT)) + "\n"
    assert len(result.stdout) > len(PROMPT) + 1


def test_generate_reads_the_prompt_from_stdin(folder, runs, capsys, monkeypatch):
    result = run_in_process(["generate", folder, *SAMPLING], capsys, monkeypatch, stdin=PROMPT)
    assert result.returncode == 0
    assert result.stdout == runs["generate"].stdout


def test_generate_chat_wraps_the_prompt(folder, reference, capsys):
    tokenizer, reply = reference
    result = run_in_process(["generate", folder, PROMPT, "--chat", *SAMPLING], capsys)
    assert result.returncode == 0, result.stderr
    assert result.stdout == reply(tokenizer.encode_chat([{"role": "user", "content": PROMPT}])) + "\n"


def test_chat_answers_each_line_and_exits_on_eof(runs, reference):
    tokenizer, reply = reference
    result = runs["chat"]
    assert result.returncode == 0, result.stderr
    messages = [{"role": "user", "content": "Hello"}]
    first = reply(tokenizer.encode_chat(messages))
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "How are you?"}]
    second = reply(tokenizer.encode_chat(messages))
    third = reply(tokenizer.encode_chat([{"role": "user", "content": "New topic"}]))  # after /reset
    assert result.stdout == f"> {first}\n> {second}\n> > {third}\n> "
    assert "Traceback" not in result.stderr


def test_chat_system_prompt_and_exit_command(folder, reference, capsys, monkeypatch):
    tokenizer, reply = reference
    result = run_in_process(["chat", folder, *SAMPLING, "--system", "Be brief."], capsys, monkeypatch,
                            stdin="Hi\n/exit\nnever answered\n")
    assert result.returncode == 0, result.stderr
    answer = reply(tokenizer.encode_chat([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}]))
    assert result.stdout == f"> {answer}\n> "


# ---- errors: one `error: ...` line, exit code 1, no traceback (unless --debug) --------------

def assert_one_error_line(result: Result, words: list[str]) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    assert all(word in error_lines[0] for word in words), error_lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("case", SUBPROCESS_ERROR_CASES)
def test_broken_model_folder_gives_one_error_line(runs, case):
    assert_one_error_line(runs[case], ERROR_CASES[case][1])


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_every_broken_folder_gives_one_error_line_in_process(broken_folders, case, capsys):
    result = run_in_process(["generate", broken_folders[case], "hi", "--max-tokens", 2], capsys)
    assert_one_error_line(result, ERROR_CASES[case][1])


def test_generate_with_groups_of_steps_gives_the_same_reply(folder, reference, capsys):
    tokenizer, reply = reference
    result = run_in_process(["generate", folder, PROMPT, "--num-scheduler-steps", 4, *SAMPLING], capsys)
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + reply(tokenizer.encode(PROMPT)) + "\n"


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_bad_num_scheduler_steps_is_a_usage_error(folder, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(["generate", folder, "hi", "--num-scheduler-steps", value], capsys)
    assert exit_info.value.code == 2
    assert "--num-scheduler-steps: must be an integer in [1, 64]" in capsys.readouterr().err


def test_invalid_sampling_parameter(folder, capsys):
    result = run_in_process(["generate", folder, "hi", "--temperature", 5, "--dtype", "float32"], capsys)
    assert_one_error_line(result, ["temperature"])


def test_debug_shows_the_traceback(runs):
    result = runs["debug"]
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ModelLoadError: model folder not found" in result.stderr


@pytest.mark.parametrize("argv", [["generate", "--debug"], ["--debug", "generate"]], ids=["after", "before"])
def test_debug_flag_before_or_after_the_command_reraises(broken_folders, argv, capsys):
    from zili.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="model folder not found"):
        run_in_process([*argv, broken_folders["missing-folder"], "hi"], capsys)


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        run_in_process(["--help"], capsys)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("generate", "chat", "serve"))

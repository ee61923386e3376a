"""`zili train` on the command line: a tiny end-to-end run, resume, and clear errors."""

from __future__ import annotations

import argparse
import json

import pytest

from zili.cli import main
from zili.commands.train import parse_duration


def args(corpus, val, out, *extra):
    return ["train", "--corpus", str(corpus), "--val-file", str(val), "-o", str(out), "--preset", "tiny",
            "--vocab-size", "300", "--context-length", "32", "--batch-size", "2", "--precision", "fp32",
            "--no-progress", "--sample-prompt", "The king", *extra]


def test_tiny_run_end_to_end_and_the_model_generates(corpus_file, val_file, tmp_path, capsys):
    out = tmp_path / "model"
    card = tmp_path / "DATA.md"
    card.write_text("Made-up sentences, public domain.")
    assert main(args(corpus_file, val_file, out, "--max-steps", "8", "--data-card", str(card))) == 0
    assert "held-out perplexity" in capsys.readouterr().out
    report = json.loads((out / "training_report.json").read_text())
    assert report["command"].startswith("zili ") and report["data"] == "Made-up sentences, public domain."
    assert report["samples"][0]["prompt"] == "The king" and report["samples"][0]["completion"]
    readme = (out / "README.md").read_text()
    assert "Made-up sentences" in readme and "The king" in readme
    # the folder is a model zili runs
    assert main(["generate", str(out), "The king", "--max-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The king")


def test_interrupted_run_resumes_from_the_command_line(corpus_file, val_file, tmp_path, monkeypatch):
    import zili.train.trainer as trainer

    out = tmp_path / "model"
    original = trainer.train
    monkeypatch.setattr(trainer, "train", lambda opts: original(opts, on_step=lambda step, loss: step == 3))
    assert main(args(corpus_file, val_file, out, "--max-steps", "6")) == 130  # stopped, checkpoint kept
    monkeypatch.setattr(trainer, "train", original)
    assert main(args(corpus_file, val_file, out, "--resume")) == 0
    assert json.loads((out / "training_report.json").read_text())["training"]["steps"] == 6


@pytest.mark.parametrize("extra, message", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--batch-size", "0"], "batch_size must be at least 1"),
    (["--resume", "--overwrite"], "exclude each other"),
    (["--data-card", "/nonexistent/card.md"], "data card not found"),
])
def test_bad_options_fail_with_one_clear_line(corpus_file, val_file, tmp_path, capsys, extra, message):
    assert main(args(corpus_file, val_file, tmp_path / "m", *extra)) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_existing_output_and_bad_corpus(corpus_file, val_file, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert main(args(corpus_file, val_file, tmp_path / "m")) == 1
    assert "--overwrite" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(args(empty, val_file, tmp_path / "n")) == 1
    assert "is empty" in capsys.readouterr().err


def test_durations():
    assert [parse_duration(v) for v in ("90", "90s", "25m", "1.5h")] == [90, 90, 1500, 5400]
    for bad in ("", "soon", "-5m", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)

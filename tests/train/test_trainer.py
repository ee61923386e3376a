"""The training loop: it learns, it resumes on the same loss curve, Ctrl-C leaves a checkpoint,
the schedule has the promised shape, and bad input fails clearly before any work."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from train_helpers import TEST_CONFIG, options
from zili.errors import CheckpointFormatError, InvalidRequestError
from zili.train.checkpoint import CHECKPOINT_DIR
from zili.train.evaluate import folder_perplexity
from zili.train.trainer import StopRequest, lr_at, resolve_autocast, train


def test_training_reduces_loss_and_exports_a_model(corpus_file, val_file, tmp_path):
    result = train(options(corpus_file, tmp_path / "out", val_file, max_steps=30, eval_interval=10))
    losses = [h["loss"] for h in result.history]
    assert result.finished and result.step == 30 and len(losses) == 30
    # an untrained model is near uniform over the vocabulary
    assert losses[0] == pytest.approx(math.log(TEST_CONFIG.vocab_size), rel=0.1)
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]
    val = [v["loss"] for v in result.val_history]
    assert [v["step"] for v in result.val_history] == [10, 20, 30] and val[-1] < val[0]
    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "heldout.txt", "training_report.json", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / CHECKPOINT_DIR).exists()  # a finished run cleans up its checkpoint
    assert (out / "heldout.txt").read_text() == val_file.read_text()
    # the report's perplexity is the exported model's, as zili loads it, by the documented method
    report = json.loads((out / "training_report.json").read_text())
    ppl, _, _ = folder_perplexity(out, val_file.read_text())
    assert report["validation"]["perplexity"] == pytest.approx(ppl, rel=1e-6)
    assert f"**{ppl:.2f}**" in (out / "README.md").read_text()
    # fp32 weights saved: the last validation pass (on the live model) gives the same number
    assert math.exp(val[-1]) == pytest.approx(ppl, rel=1e-4)


def test_resume_continues_the_same_loss_curve(corpus_file, val_file, tmp_path):
    straight = train(options(corpus_file, tmp_path / "straight", val_file))

    first = train(options(corpus_file, tmp_path / "resumed", val_file), on_step=lambda step, loss: step == 5)
    assert not first.finished and first.step == 5
    assert (tmp_path / "resumed" / CHECKPOINT_DIR / "state.json").is_file()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()  # nothing exported yet
    second = train(options(corpus_file, tmp_path / "resumed", val_file, resume=True))

    assert second.finished and second.step == straight.step
    assert [h["step"] for h in second.history] == list(range(1, straight.step + 1))
    torch.testing.assert_close([h["loss"] for h in second.history], [h["loss"] for h in straight.history],
                               rtol=1e-6, atol=0)
    assert [h["lr"] for h in second.history] == [h["lr"] for h in straight.history]


def test_gradient_accumulation_equals_the_larger_batch(corpus_file, val_file, tmp_path):
    # the same rows in the same order: 2 micro-batches of 2 sum to the gradient of one batch of 4
    accumulated = train(options(corpus_file, tmp_path / "accum", val_file, batch_size=2, grad_accum=2, max_steps=6))
    whole = train(options(corpus_file, tmp_path / "whole", val_file, batch_size=4, grad_accum=1, max_steps=6))
    torch.testing.assert_close([h["loss"] for h in accumulated.history], [h["loss"] for h in whole.history],
                               rtol=1e-4, atol=0)


def test_ctrl_c_writes_a_checkpoint_and_stops(corpus_file, val_file, tmp_path):
    def interrupt(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C does
        return False

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    result = train(options(corpus_file, tmp_path / "out", val_file), on_step=interrupt)
    assert not result.finished and result.step == 3
    state = json.loads((tmp_path / "out" / CHECKPOINT_DIR / "state.json").read_text())
    assert state["step"] == 3 and len(state["history"]) == 3
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_second_ctrl_c_aborts_at_once():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_schedule_warms_up_then_decays_by_cosine():
    config = TEST_CONFIG.with_overrides(lr=1.0, warmup_steps=4, max_steps=104, min_lr_ratio=0.1)
    assert [lr_at(s, config) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(54, config) == pytest.approx(0.55)  # half-way: the mean of peak and floor
    assert lr_at(104, config) == pytest.approx(0.1)
    lrs = [lr_at(s, config) for s in range(3, 105)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_time_budget_fits_the_step_count(corpus_file, val_file, tmp_path):
    # a generous budget leaves max_steps alone; a tiny one ends the run early, with an export
    result = train(options(corpus_file, tmp_path / "short", val_file, max_steps=40, time_budget_s=1e-3))
    assert result.finished and result.step < 40
    assert (tmp_path / "short" / "model.safetensors").is_file()
    report = json.loads((tmp_path / "short" / "training_report.json").read_text())
    assert report["config"]["max_steps"] == result.step == report["training"]["steps"]


def test_precision_choice():
    assert resolve_autocast("fp32", "cpu") is None
    assert resolve_autocast("bf16", "cpu") is torch.bfloat16
    with pytest.raises(InvalidRequestError):
        resolve_autocast("fp8", "cpu")


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"   \n\n", "is empty"),
    (b"PK\x03\x04\x00\x00binary", "not a text file"),
    (b"caf\xe9 latin-1", "not UTF-8"),
])
def test_bad_corpus_is_refused(tmp_path, content, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    with pytest.raises(InvalidRequestError, match=message) as err:
        train(options(corpus, tmp_path / "out"))
    assert err.value.param == "corpus"
    assert not (tmp_path / "out").exists()


def test_missing_and_too_small_corpus(tmp_path):
    with pytest.raises(InvalidRequestError, match="not found"):
        train(options(tmp_path / "nope.txt", tmp_path / "out"))
    small = tmp_path / "small.txt"
    small.write_text("To be.\n")
    with pytest.raises(InvalidRequestError, match="needs more than the context length"):
        train(options(small, tmp_path / "out2", val_file=small))


def test_existing_output_needs_overwrite(corpus_file, val_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(InvalidRequestError, match="--overwrite") as err:
        train(options(corpus_file, out, val_file))
    assert err.value.param == "output"
    result = train(options(corpus_file, out, val_file, max_steps=2, overwrite=True))
    assert result.finished and json.loads((out / "config.json").read_text())["architectures"]


def test_overwrite_refuses_folders_of_other_files(corpus_file, tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(InvalidRequestError, match="thesis.tex"):
        train(options(corpus_file, out, overwrite=True))
    assert (out / "thesis.tex").read_text() == "precious"


def test_resume_without_checkpoint(corpus_file, tmp_path):
    with pytest.raises(CheckpointFormatError, match="no training checkpoint"):
        train(options(corpus_file, tmp_path / "out", resume=True))


def test_budget_fit_follows_the_measured_speed():
    from zili.train.distributed import DistEnv
    from zili.train.trainer import _BudgetFit

    fit = _BudgetFit(budget_s=100.0, upper_steps=1000, env=DistEnv())
    config = TEST_CONFIG.with_overrides(max_steps=1000)
    seen = []
    for step in range(1, 40):  # 2 s for the first step (start-up), then 1 s per step; later 0.5 s per step
        elapsed = 2.0 + (step - 1) * 1.0 if step <= 16 else 17.0 + (step - 16) * 0.5
        config = fit.fit(config, step, elapsed, now=elapsed, resumed=False)
        seen.append(config.max_steps)
    assert seen[:5] == [1000] * 5  # timing starts after step 1; the first fit comes 5 steps later
    assert seen[5] == 6 + int((100 - 7.0) / 1.0)  # at step 6: 1 s per step, 93 s left
    # at step 26 (22 s elapsed) the average since step 1 is (22 - 2) / 25 s per step: the run grows to fit
    assert seen[25] == 26 + int((100 - 22.0) / ((22.0 - 2.0) / 25))
    assert fit.fit(config, 40, 111.0, now=111.0, resumed=False).max_steps == 40  # past the deadline: stop
    assert _BudgetFit(100.0, 50, DistEnv()).fit(config, 1, 0.1, 0.1, resumed=True) is config

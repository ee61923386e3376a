"""Calibration windows and the layer-by-layer runner (which must reproduce the full forward pass)."""

import pytest
import torch

from zili.compress.calibration import LayerwiseRunner, calibration_windows, read_calibration_text
from zili.errors import InvalidRequestError
from zili.eval.full_sequence import FullSequenceAttention
from zili.models.loader import load_model


def test_windows_cut_consecutive_tokens_and_cap_their_number():
    ids = list(range(1000))
    windows = calibration_windows(ids, 64, 100)
    assert len(windows) == 1000 // 64 and all(len(w) == 64 for w in windows)
    assert torch.equal(torch.cat(windows), torch.arange(len(windows) * 64))
    few = calibration_windows(ids, 64, 5, seed=1)
    assert len(few) == 5 and all(int(w[0]) % 64 == 0 for w in few)
    assert few == sorted(few, key=lambda w: int(w[0]))
    assert [len(w) for w in calibration_windows(list(range(40)), 64, 8)] == [40]   # short text: one window
    with pytest.raises(InvalidRequestError, match="at least 16") as e:
        calibration_windows([1, 2, 3], 64, 8)
    assert e.value.param == "calib"


def test_calibration_text_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(InvalidRequestError, match="is empty"):
        read_calibration_text(empty, 1000)
    with pytest.raises(InvalidRequestError, match="not found"):
        read_calibration_text(tmp_path / "missing.txt", 1000)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(InvalidRequestError, match="not UTF-8"):
        read_calibration_text(binary, 1000)
    assert read_calibration_text(_write(tmp_path / "t.txt", "abcdef"), 3) == "abc"


def _write(path, text):
    path.write_text(text)
    return path


def test_layerwise_runner_reproduces_the_forward_pass(qwen_checkpoint):
    model, config = load_model(qwen_checkpoint, device="cpu", dtype=torch.float32)
    windows = [torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 16)]
    runner = LayerwiseRunner(model, windows)
    seen = []
    for layer in model.model.layers:
        runner.capture(layer, {"down": layer.mlp.down_proj}, lambda name, x: seen.append((name, tuple(x.shape))))
        runner.advance(layer)
    assert seen == [("down", (9, 128)), ("down", (16, 128))] * 2
    assert runner.num_tokens == 25
    for window, hidden in zip(windows, runner.final_hidden()):
        with torch.no_grad():
            expected = model(window, torch.arange(len(window)), FullSequenceAttention())
        torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)

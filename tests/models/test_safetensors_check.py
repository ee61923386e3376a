"""Safetensors headers that lie: each is refused with one clear message before any tensor is read."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from tiny_models import copy_checkpoint
from zili.errors import CheckpointFormatError
from zili.models.loader import load_model
from zili.models.safetensors_check import read_header


def write_raw(path, header, data: bytes = b"", header_len: int | None = None):
    """A safetensors file from a header object (or raw bytes) and a data section, sizes unchecked."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def entry(shape, begin, end, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_valid_file_passes(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, path, metadata={"format": "pt"})
    header = read_header(path)
    assert header["a"]["shape"] == [2, 3] and header["b"]["dtype"] == "BF16"
    assert "__metadata__" not in header


@pytest.mark.parametrize("header, data, header_len, message", [
    ({"a": entry([2], 0, 8)}, b"\0" * 8, 10_000, "header claims 10000 bytes"),     # header longer than file
    ({"a": entry([2], 0, 8)}, b"\0" * 8, 2**63, "header claims"),                  # absurd header length
    (b"{not json", b"", None, "not valid JSON"),
    (b"[1, 2]", b"", None, "not a JSON object"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"", None, "malformed header entry for tensor 'a'"),
    ({"a": entry([2], 0, 8, dtype="F128")}, b"\0" * 8, None, "unknown dtype 'F128'"),
    ({"a": entry([-2], 0, 8)}, b"\0" * 8, None, "invalid shape or offsets"),
    ({"a": entry([2], 8, 0)}, b"\0" * 8, None, "invalid shape or offsets"),
    ({"a": entry([2.5], 0, 8)}, b"\0" * 8, None, "invalid shape or offsets"),
    ({"a": entry([2], 0, 8)}, b"\0" * 4, None, "truncated file: tensor 'a' ends at byte 8"),  # offsets beyond data
    ({"a": entry([2**40, 2**40], 0, 8)}, b"\0" * 8, None, "needs 4835703278458516698824704 bytes"),  # huge shape
    ({"a": entry([2**31, 2**31], 0, 2**64)}, b"\0" * 8, None, "truncated file"),  # huge shape, offsets agree
    ({"a": entry([4], 0, 16), "b": entry([2], 8, 16)}, b"\0" * 16, None, "'a' and 'b' overlap"),
], ids=["header-longer-than-file", "absurd-header-length", "not-json", "not-object",
        "missing-field", "unknown-dtype", "negative-dim", "reversed-offsets", "float-dim", "offsets-beyond-data",
        "huge-shape", "huge-shape-huge-offsets", "overlapping"])
def test_lying_header_is_refused(tmp_path, header, data, header_len, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(CheckpointFormatError, match=message.replace("(", r"\(")) as info:
        read_header(path)
    assert "bad.safetensors" in str(info.value)


def test_file_shorter_than_the_length_prefix(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointFormatError, match="bad.safetensors: truncated safetensors file"):
        read_header(path)


@pytest.fixture
def broken(tiny_checkpoint, tmp_path):
    return copy_checkpoint(tiny_checkpoint, tmp_path / "model")


def test_loader_checks_headers_before_reading(broken):
    weights = broken / "model.safetensors"
    name = "model.norm.weight"
    write_raw(weights, {name: entry([64], 0, 256), "lm_head.weight": entry([64], 128, 384)}, b"\0" * 384)
    with pytest.raises(CheckpointFormatError, match="overlap"):
        load_model(broken, device="cpu")


def test_gap_in_data_section_is_refused(broken):
    """Tensors that leave bytes of the data section unaccounted for are refused (by safetensors)."""
    write_raw(broken / "model.safetensors", {"model.norm.weight": entry([64], 0, 256)}, b"\0" * 512)
    with pytest.raises(CheckpointFormatError, match="model.safetensors"):
        load_model(broken, device="cpu")

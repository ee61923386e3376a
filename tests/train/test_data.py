"""Corpus checks, training batches and validation windows."""

from __future__ import annotations

import pytest
import torch

from zili.errors import InvalidRequestError
from zili.train.data import read_corpus, sample_batch, split_validation, validation_windows


def test_read_corpus_accepts_utf8_and_names_the_parameter(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("Ô Roméo,\nwhy?\n")
    assert read_corpus(path) == "Ô Roméo,\nwhy?\n"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(InvalidRequestError) as err:
        read_corpus(path, param="val_file")
    assert err.value.param == "val_file" and "not UTF-8" in str(err.value)


def test_split_validation_cuts_at_a_line_start():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = split_validation(text, 0.1)
    assert train + val == text
    assert val.startswith("line ") and train.endswith("\n")
    assert 0.05 < len(val) / len(text) < 0.15


def test_batches_are_windows_of_the_stream_and_shard_across_processes():
    tokens = torch.arange(1000, dtype=torch.int32)
    single = sample_batch(tokens, 6, 16, torch.Generator().manual_seed(3))
    assert single.shape == (6, 17) and single.dtype == torch.int64
    assert torch.equal(single - single[:, :1], torch.arange(17).expand(6, 17))  # contiguous windows
    assert int(single.max()) < 1000
    # two processes with 3 rows each see exactly the rows one process with 6 rows sees
    shards = [sample_batch(tokens, 3, 16, torch.Generator().manual_seed(3), rank, 2) for rank in (0, 1)]
    assert torch.equal(torch.cat(shards), single)


def test_windows_cover_the_text_without_overlap():
    tokens = torch.arange(10)
    windows = validation_windows(tokens, 4)
    assert [w.tolist() for w in windows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [w.tolist() for w in validation_windows(torch.arange(9), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]

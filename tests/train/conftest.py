"""Fixtures of the training tests (helpers live in train_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from train_helpers import synthetic_text


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(synthetic_text(1500, seed=0))
    return path


@pytest.fixture(scope="session")
def val_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("val") / "val.txt"
    path.write_text(synthetic_text(60, seed=1))
    return path

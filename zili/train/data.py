"""Training text: reading and checking the corpus, random training windows, validation windows.

Batches are drawn for the whole data-parallel group from one seeded generator, and each process
takes its own rows, so N processes with batch B follow exactly the run of one process with
batch N*B, and the generator's state is all a checkpoint needs to continue the data order.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zili.errors import InvalidRequestError

MIN_VAL_TOKENS = 2
VAL_FRACTION = 0.02


def read_corpus(path: str | Path, param: str = "corpus") -> str:
    """The UTF-8 text of `path`; empty, missing or binary files are refused with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"{param} file not found: {path}", param=param)
    data = path.read_bytes()
    if b"\x00" in data:
        raise InvalidRequestError(f"{path} is not a text file (it contains NUL bytes)", param=param)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})", param=param) from None
    if not text.strip():
        raise InvalidRequestError(f"{path} is empty", param=param)
    return text


def split_validation(text: str, fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """(train, validation): the last `fraction` of the text, cut at a line start when there is one."""
    cut = int(len(text) * (1 - fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def sample_batch(tokens: torch.Tensor, rows: int, seq_len: int, generator: torch.Generator,
                 rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Random windows of seq_len + 1 tokens: this process's `rows` of the group's rows * world_size.

    tokens: (N,) int32 -> (rows, seq_len + 1) int64.
    """
    starts = torch.randint(0, len(tokens) - seq_len, (rows * world_size,), generator=generator)
    starts = starts[rank * rows:(rank + 1) * rows]
    offsets = torch.arange(seq_len + 1)
    return tokens[starts[:, None] + offsets[None, :]].long()


def validation_windows(tokens: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Non-overlapping windows of `window` tokens (stride = window); a last shorter window is kept
    when it has at least 2 tokens. Each window predicts all its tokens but the first."""
    windows = [tokens[i:i + window] for i in range(0, len(tokens), window)]
    return [w for w in windows if len(w) >= MIN_VAL_TOKENS]

"""Validate a safetensors file's header against the file before any tensor is read.

The `safetensors` library already refuses most malformed files; this gives each problem one
clear message naming the file and tensor (truncated downloads, headers that lie about sizes,
overlapping tensors) and never trusts a length before checking it against the file size.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from zili.errors import CheckpointFormatError

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path: Path) -> dict[str, dict]:
    """Return {tensor name: {"dtype", "shape", "data_offsets"}} after checking it fits the file."""
    file_size = path.stat().st_size
    if file_size < 8:
        raise CheckpointFormatError(f"{path.name}: truncated safetensors file ({file_size} bytes)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
            raise CheckpointFormatError(
                f"{path.name}: safetensors header claims {header_len} bytes but the file has {file_size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointFormatError(f"{path.name}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path.name}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - header_len
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointFormatError(f"{path.name}: malformed header entry for tensor {name!r}") from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointFormatError(f"{path.name}: tensor {name!r} has unknown dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not isinstance(begin, int) \
                or not isinstance(end, int) or not 0 <= begin <= end:
            raise CheckpointFormatError(f"{path.name}: tensor {name!r} has an invalid shape or offsets")
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != expected:
            raise CheckpointFormatError(
                f"{path.name}: tensor {name!r} of shape {shape} needs {expected} bytes, header gives {end - begin}")
        if end > data_size:
            raise CheckpointFormatError(
                f"{path.name}: truncated file: tensor {name!r} ends at byte {end} of a {data_size}-byte data section")
        spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev_name), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise CheckpointFormatError(f"{path.name}: tensors {prev_name!r} and {name!r} overlap")
    return header

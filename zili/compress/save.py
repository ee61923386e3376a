"""Write a model folder atomically: everything goes to a hidden temp folder beside the target,
which is renamed into place only once complete, so a failed or interrupted run leaves nothing
half-written where the output should be.

The folder is self-contained: config.json (with its quantization_config), safetensors weights
(sharded with an index past SHARD_BYTES) and the source's tokenizer and generation files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from zili.errors import InvalidRequestError

SHARD_BYTES = 2 * 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
NOT_COPIED = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_output_folder(source: Path, output: Path, overwrite: bool) -> None:
    if output.resolve() == source.resolve():
        raise InvalidRequestError("the output folder must differ from the model folder", param="output")
    if output.exists() and not output.is_dir():
        raise InvalidRequestError(f"output {output} exists and is not a folder", param="output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise InvalidRequestError(f"output folder {output} is not empty (pass --overwrite to replace it)",
                                  param="output")


def _shards(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    return [*shards, current]


def _write_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    shards = _shards(tensors)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_model_folder(source: Path, output: Path, tensors: dict[str, torch.Tensor],
                       config_overrides: dict[str, Any], overwrite: bool = False) -> int:
    """Write tensors + source config (with overrides) + source's other files; returns bytes written."""
    check_output_folder(source, output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    try:
        temp.mkdir()
        _write_weights(temp, tensors)
        config = json.loads((source / "config.json").read_text())
        config.update(config_overrides)
        (temp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in NOT_COPIED and not path.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(path, temp / path.name)
        size = sum(p.stat().st_size for p in temp.iterdir())
        if output.exists():
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            output.rename(old)
            temp.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            temp.rename(output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return size

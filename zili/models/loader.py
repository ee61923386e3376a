"""Load a Hugging Face model folder: config -> model skeleton -> safetensors, tensor by tensor.

The model is built on the meta device, materialized empty in the compute dtype, then each
checkpoint tensor is read from the memory-mapped file and copied into its parameter by name.
At no point does a second full copy of the weights exist. Pickle formats are refused. On the CPU
the weights live on huge pages (zili/huge_pages.py).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from zili.config import ModelConfig
from zili.devices import best_device, parse_dtype
from zili.errors import CheckpointFormatError
from zili.huge_pages import move_to_huge_pages
from zili.models.registry import model_class
from zili.models.safetensors_check import read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
IGNORED_KEYS = ("rotary_emb.inv_freq",)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, following the shard index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointFormatError(f"{index.name} is malformed (no weight_map)") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointFormatError(f"missing weight shard(s) listed in {index.name}: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointFormatError(
            f"{folder} only has pickle checkpoints ({', '.join(pickled[:3])}); zili loads safetensors only, "
            "since loading pickle can execute code. Convert them with a trusted tool first.")
    raise CheckpointFormatError(f"no *.safetensors weights in {folder}")


def _target(model: nn.Module, key: str) -> tuple[nn.Module, str, str, int | None]:
    """Checkpoint key -> (module, module path, tensor name, shard index in a fused layer)."""
    module_path, _, tensor_name = key.rpartition(".")
    parent, _, leaf = module_path.rpartition(".")
    shard = None
    packed = getattr(model, "packed_modules", {})
    if leaf in packed:
        fused, shard = packed[leaf]
        module_path = f"{parent}.{fused}" if parent else fused
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        raise CheckpointFormatError(f"checkpoint tensor {key!r} has no place in this model") from None
    return module, module_path, tensor_name, shard


def _load_tensor(module: nn.Module, tensor_name: str, tensor: torch.Tensor, shard: int | None, key: str) -> None:
    if hasattr(module, "load_weight"):
        try:
            module.load_weight(tensor_name, tensor, shard)
        except CheckpointFormatError as e:  # the layer only knows "weight"; name the checkpoint key
            raise CheckpointFormatError(f"{key}: {e}") from None
        return
    param = getattr(module, tensor_name, None)
    if not isinstance(param, torch.Tensor):
        raise CheckpointFormatError(f"checkpoint tensor {key!r} has no place in this model")
    if tuple(param.shape) != tuple(tensor.shape):
        raise CheckpointFormatError(
            f"shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
    param.data.copy_(tensor)


def load_weights(model: nn.Module, folder: Path, progress: bool = False) -> None:
    """Copy every tensor of the checkpoint in `folder` into `model`, checking nothing is missing."""
    files = weight_files(folder)
    headers = {f: read_header(f) for f in files}
    total = sum(len(h) for h in headers.values())
    loaded: dict[tuple[str, str], set] = defaultdict(set)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress) as bar:
        for path in files:
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for key in f.keys():
                        bar.update(1)
                        if key.endswith(IGNORED_KEYS) or (tied and key == "lm_head.weight"):
                            continue
                        module, module_path, tensor_name, shard = _target(model, key)
                        _load_tensor(module, tensor_name, f.get_tensor(key), shard, key)
                        loaded[(module_path, tensor_name)].add(shard)
            except SafetensorError as e:
                raise CheckpointFormatError(f"{path.name}: unreadable safetensors file ({e})") from None
    _check_complete(model, loaded)
    for module in model.modules():  # quantized layers pack their staged tensors once, here
        if hasattr(module, "finish_loading"):
            module.finish_loading()


def _check_complete(model: nn.Module, loaded: dict[tuple[str, str], set]) -> None:
    missing = []
    seen = set()
    # layers that stage checkpoint tensors (quantized linears) report what they miss themselves
    self_checked = [(path, m) for path, m in model.named_modules() if hasattr(m, "missing_tensors")]
    for path, module in self_checked:
        missing += [f"{path}.{name}" for name in module.missing_tensors()]
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen or any(name.startswith(f"{path}.") for path, _ in self_checked):
            continue
        seen.add(id(tensor))
        module_path, _, tensor_name = name.rpartition(".")
        shards = loaded.get((module_path, tensor_name))
        module = model.get_submodule(module_path)
        needed = len(getattr(module, "output_sizes", [None]))
        if not shards or (None not in shards and len(shards) < needed):
            missing.append(name)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointFormatError(f"checkpoint is missing tensors: {', '.join(missing[:5])}{more}")


def build_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    """An uninitialized model of the right architecture, materialized on `device` in `dtype`."""
    cls = model_class(config.architecture)
    with torch.device("meta"):
        model = cls(config)
    model = model.to(dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty re-creates parameters, so tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def load_model(folder: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
               progress: bool = False, huge_pages: bool = True) -> tuple[nn.Module, ModelConfig]:
    """Load the checkpoint in `folder`; returns (model in eval mode, its config).

    huge_pages (CPU): keep the weights on 2 MiB pages, which a decode step streams much faster. They
    share arenas that are freed only with the last of their tensors: pass False for a model whose layers
    will be dropped one by one (zili quantize replaces each with its quantized version)."""
    folder = Path(folder)
    config = ModelConfig.from_folder(folder)
    device = device or best_device()
    model = build_model(config, parse_dtype(dtype, device), device)
    quant = config.quantization_config
    if quant:
        from zili.compress.formats import prepare_quantized_model  # imported only for quantized checkpoints
        prepare_quantized_model(model, config, quant)
    on_huge_pages = huge_pages and torch.device(device).type == "cpu"
    if on_huge_pages:  # still untouched after to_empty: the checkpoint is then read straight into huge pages
        move_to_huge_pages(model)
    load_weights(model, folder, progress=progress)
    if on_huge_pages:
        move_to_huge_pages(model)  # what loading made anew (quantized layers pack their weights)
    return model, config

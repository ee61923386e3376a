"""Training checkpoints without pickle, and the exported Hugging Face model folder.

OUT/checkpoint/ holds
  model.safetensors       fp32 parameters under the training model's names (fused qkv / gate_up)
  optimizer.safetensors   AdamW moments and step counts, keyed "<param index>.<name>"
  rng.safetensors         the data-order generator and torch's global RNG state (uint8)
  state.json              step, tokens seen, elapsed time, loss history, config, optimizer groups
It is written to a temporary folder and renamed into place, so an interrupted save never leaves
a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zili.errors import CheckpointFormatError
from zili.train.model import EOS_ID, IM_END_ID, export_state_dict, hf_config
from zili.train.presets import TrainConfig

CHECKPOINT_DIR = "checkpoint"


def save_checkpoint(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, state: dict) -> Path:
    final = out / CHECKPOINT_DIR
    tmp, old = out / (CHECKPOINT_DIR + ".tmp"), out / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # named_parameters lists a tied tensor once; safetensors refuses shared storage
    save_file({k: v.detach().contiguous() for k, v in model.named_parameters()}, str(tmp / "model.safetensors"))
    opt_state = optimizer.state_dict()
    tensors = {f"{index}.{key}": value.contiguous()
               for index, entries in opt_state["state"].items() for key, value in entries.items()}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    save_file({"data": generator.get_state(), "torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    state = {**state, "param_groups": opt_state["param_groups"]}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint_state(out: Path) -> dict:
    path = out / CHECKPOINT_DIR / "state.json"
    if not path.is_file():
        raise CheckpointFormatError(f"no training checkpoint to resume in {out} (missing {path})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path} is not valid JSON: {e}") from None


def load_checkpoint(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> dict:
    """Restore model, optimizer and RNG states in place; returns state.json's contents."""
    folder = out / CHECKPOINT_DIR
    state = read_checkpoint_state(out)
    params = load_file(str(folder / "model.safetensors"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in params:
                raise CheckpointFormatError(f"checkpoint has no tensor {name!r}")
            param.copy_(params[name])
    opt_state: dict[int, dict] = {}
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        index, name = key.split(".", 1)
        opt_state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    rng = load_file(str(folder / "rng.safetensors"))
    generator.set_state(rng["data"])
    torch.set_rng_state(rng["torch"])
    return state


def export_model(out: Path, model: torch.nn.Module, config: TrainConfig, dtype: torch.dtype) -> None:
    """Write config.json, model.safetensors and generation_config.json (tokenizer files are
    written before training starts)."""
    dtype_name = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf_config(config, dtype_name), indent=2) + "\n")
    save_file(export_state_dict(model, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    generation = {"bos_token_id": None, "eos_token_id": [EOS_ID, IM_END_ID], "pad_token_id": EOS_ID,
                  "do_sample": True, "temperature": 0.8, "top_p": 0.95, "top_k": 50,
                  "max_length": config.context_length}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def config_from_checkpoint(config: dict) -> TrainConfig:
    try:
        return TrainConfig(**config)
    except TypeError as e:
        raise CheckpointFormatError(f"checkpoint config does not match this zili version: {e}") from None

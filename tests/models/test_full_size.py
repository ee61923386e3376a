"""A Qwen2.5-0.5B-shaped random checkpoint (~494M parameters, bf16, sharded): real sizes, slow.

The weights are written shard by shard straight to safetensors (no model object, no fp32 copy),
so building needs ~150 MB of RAM beyond the 1 GB of files. Embedding rows past the tiny
tokenizer's vocabulary are zero: with tied embeddings their logits are 0, so greedy decoding
stays on tokens the tokenizer can print.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tiny_models import BOS_TOKEN, EOS_TOKEN, build_tokenizer, load_reference, token_id, tokenizer_vocab_size
from zili.generation import generate_tokens
from zili.models.loader import load_model
from zili.models.tokenizer import Tokenizer
from zili.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "hidden_act": "silu", "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21,
    "torch_dtype": "bfloat16",
}
LAYERS_PER_SHARD = 6


def layer_shapes(cfg: dict, i: int) -> dict[str, tuple[int, ...]]:
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
        p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.k_proj.bias": (kv,),
        p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.v_proj.bias": (kv,),
        p + "self_attn.o_proj.weight": (hidden, hidden),
        p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
        p + "mlp.down_proj.weight": (hidden, inter),
        p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
    }


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if "norm" in name:
        return torch.empty(shape, dtype=torch.bfloat16).normal_(1.0, 0.1, generator=generator)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02 if "bias" not in name else 0.1,
                                                            generator=generator)


def write_random_checkpoint(folder: Path, cfg: dict, seed: int = 0) -> Path:
    """A sharded bf16 safetensors checkpoint of `cfg`'s shapes, one shard in memory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder)
    cfg = {**cfg, "bos_token_id": token_id(BOS_TOKEN), "eos_token_id": token_id(EOS_TOKEN)}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": cfg["eos_token_id"]}))
    generator = torch.Generator().manual_seed(seed)
    layers = cfg["num_hidden_layers"]
    groups = [list(range(i, min(i + LAYERS_PER_SHARD, layers))) for i in range(0, layers, LAYERS_PER_SHARD)]
    num_shards = len(groups) + 1
    weight_map = {}
    for shard, layer_ids in enumerate([None, *groups]):
        if layer_ids is None:
            embed = random_tensor("embed", (cfg["vocab_size"], cfg["hidden_size"]), generator)
            embed[tokenizer_vocab_size():] = 0
            tensors = {"model.embed_tokens.weight": embed,
                       "model.norm.weight": random_tensor("norm", (cfg["hidden_size"],), generator)}
        else:
            tensors = {name: random_tensor(name, shape, generator)
                       for i in layer_ids for name, shape in layer_shapes(cfg, i).items()}
        filename = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(tensors, folder / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    start = time.perf_counter()
    folder = write_random_checkpoint(tmp_path_factory.mktemp("qwen2.5-0.5b-shape"), QWEN25_05B)
    print(f"\nbuilt {sum(f.stat().st_size for f in folder.iterdir()) / 1e9:.2f} GB in "
          f"{time.perf_counter() - start:.1f} s")
    return folder


def test_greedy_matches_transformers_at_full_size(full_size):
    prompt = Tokenizer.from_folder(full_size).encode("The quick brown fox")
    start = time.perf_counter()
    model, config = load_model(full_size, device="cpu", dtype=torch.float32)
    print(f"zili fp32 load {time.perf_counter() - start:.1f} s")
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ours = [s.token_id for s in generate_tokens(model, prompt, params, [], max_model_len=256)]
    del model
    reference = load_reference(full_size, torch.float32)
    with torch.inference_mode():
        ids = torch.tensor([prompt])  # an explicit mask: without one, pad_token_id (= BOS here) would be masked
        theirs = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs
    assert all(t < tokenizer_vocab_size() for t in ours)


def test_cli_generate_at_full_size(full_size):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    env.pop("OMP_NUM_THREADS", None)  # use every core, as a user would
    start = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).parent / "zili"), "generate", str(full_size),
                             "The quick brown fox", "--max-tokens", "8", "--temperature", "0"],
                            capture_output=True, text=True, encoding="utf-8", env=env, timeout=600)
    print(f"zili generate (default dtype, 8 tokens): {time.perf_counter() - start:.1f} s")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The quick brown fox") and len(result.stdout) > len("The quick brown fox\n")

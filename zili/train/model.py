"""zili's own Llama model, set up for training: batched causal attention, initialisation, and
the HF checkpoint layout (config.json, un-fused tensor names) for export.

The model's forward is flat over tokens, `(T,) ids, (T,) positions -> (T, hidden)`; training
batches are (B, S), so `BatchedCausalAttention` views the flat tokens as B rows of S and runs
causal SDPA per row. The loss wrapper is an nn.Module so DistributedDataParallel can wrap it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zili.config import ModelConfig
from zili.models.llama import LlamaForCausalLM
from zili.models.loader import build_model
from zili.train.presets import TrainConfig
from zili.train.tokenizer_training import EOS_TOKEN, IM_END, SPECIAL_TOKENS

EOS_ID = SPECIAL_TOKENS.index(EOS_TOKEN)
IM_END_ID = SPECIAL_TOKENS.index(IM_END)
RMS_NORM_EPS = 1e-5
INIT_STD = 0.02


class BatchedCausalAttention:
    """AttentionBackend for (B, S) training batches of independent rows; keeps no cache."""

    def __init__(self, batch_size: int, seq_len: int):
        self.batch_size, self.seq_len = batch_size, seq_len

    def attend(self, layer, q, k, v, scale, sliding_window):
        """q: (B*S, Hq, D); k, v: (B*S, Hkv, D) -> (B*S, Hq, D)."""
        if sliding_window is not None:
            raise NotImplementedError("training with sliding-window attention is not supported")
        b, s = self.batch_size, self.seq_len
        q, k, v = (t.view(b, s, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(b * s, out.shape[1], out.shape[3])


class CausalLMLoss(nn.Module):
    """Mean next-token cross-entropy of a (B, S+1) token batch."""

    def __init__(self, model: LlamaForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return sequence_nll(self.model, tokens).mean()


def sequence_nll(model: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    """tokens: (B, S+1) -> per-token negative log-likelihood (B, S) of tokens[:, 1:] (fp32)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    b, s = inputs.shape
    positions = torch.arange(s, device=tokens.device).repeat(b)
    hidden = model(inputs.reshape(-1), positions, BatchedCausalAttention(b, s))
    logits = model.compute_logits(hidden)  # (B*S, vocab) fp32
    return F.cross_entropy(logits, targets.reshape(-1), reduction="none").view(b, s)


def hf_config(train: TrainConfig, torch_dtype: str) -> dict:
    """config.json of the trained model (Llama architecture, readable by transformers)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": train.vocab_size,
        "hidden_size": train.hidden_size,
        "intermediate_size": train.intermediate_size,
        "num_hidden_layers": train.num_hidden_layers,
        "num_attention_heads": train.num_attention_heads,
        "num_key_value_heads": train.num_key_value_heads,
        "head_dim": train.head_dim,
        "max_position_embeddings": train.context_length,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": EOS_ID,
        "torch_dtype": torch_dtype,
    }


def build_training_model(train: TrainConfig, device: str | torch.device) -> LlamaForCausalLM:
    """A freshly initialised fp32 model with gradients enabled (seed the RNG before calling)."""
    model = build_model(ModelConfig.from_dict(hf_config(train, "float32")), torch.float32, device)
    init_weights(model, train.num_hidden_layers)
    return model.requires_grad_(True).train()


@torch.no_grad()
def init_weights(model: LlamaForCausalLM, num_layers: int) -> None:
    """GPT-2 style: N(0, 0.02); residual output projections scaled by 1/sqrt(2 * layers); norms 1."""
    residual_std = INIT_STD / math.sqrt(2 * num_layers)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            param.normal_(0.0, residual_std)
        else:
            param.normal_(0.0, INIT_STD)


def export_state_dict(model: LlamaForCausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under HF names: fused qkv_proj / gate_up_proj split back into their
    shards (q/k/v, gate/up), the tied lm_head left out."""
    unpack: dict[str, list[str]] = {}
    for checkpoint_name, (fused, shard) in model.packed_modules.items():
        unpack.setdefault(fused, [None] * 3)[shard] = checkpoint_name
    tensors = {}
    for name, param in model.named_parameters():  # named_parameters skips the tied duplicate
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        module_path, _, tensor_name = name.rpartition(".")
        parent, _, leaf = module_path.rpartition(".")
        if leaf in unpack:
            sizes = model.get_submodule(module_path).output_sizes
            for part_name, part in zip(unpack[leaf], param.detach().split(sizes, dim=0)):
                tensors[f"{parent}.{part_name}.{tensor_name}"] = part
        else:
            tensors[name] = param.detach()
    return {k: v.to(dtype).contiguous() for k, v in tensors.items()}

"""Loading GPTQ, AWQ and compressed-tensors checkpoints end to end.

Each test checkpoint is a tiny Qwen2 whose decoder Linear layers are replaced by random quantized
weights in the layout under test (packed by tests/compress/foreign_layouts.py, not by zili). The
oracle is `transformers` running the same model with those weights dequantized by hand.
"""

import json
import shutil

import pytest
import torch
from foreign_layouts import autoawq_tensors, autogptq_tensors, dequantize, random_quantized
from safetensors.torch import load_file, save_file
from tiny_models import load_reference

from zili.compress.layouts.compressed_tensors import encode, quantization_config
from zili.compress.scheme import QuantizeOptions, QuantScheme
from zili.errors import CheckpointFormatError
from zili.eval.full_sequence import FullSequenceAttention
from zili.kernels import cpu_ext
from zili.layers.quantized import QuantizedWeight, QuantLinear
from zili.models.loader import load_model

IDS = torch.tensor([1, 17, 42, 99, 7, 150, 33, 8, 64, 120])
GROUP = 32


def _input_group(module: str) -> str:
    """Shards reading the same input share one act-order g_idx, as in real checkpoints."""
    return module.rsplit(".", 1)[0] + {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
                                       "gate_proj": "gu", "up_proj": "gu", "down_proj": "down"}[module.rsplit(".", 1)[1]]


def write_quantized(base, folder, layout, bits=4, act_order=False, symmetric=False):
    """Copy `base` with its decoder Linear weights replaced; returns the dequantized state dict."""
    shutil.copytree(base, folder)
    state = load_file(str(folder / "model.safetensors"))
    packed, dense, g_indices = {}, dict(state), {}
    for index, (name, weight) in enumerate(sorted(state.items())):
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or ".layers." not in name or "norm" in module:
            packed[name] = weight
            continue
        n, k = weight.shape
        codes, scales, zeros = random_quantized(n, k, GROUP, bits, symmetric, seed=index)
        if act_order:
            key = _input_group(module)
            g_indices.setdefault(key, torch.randperm(k, generator=torch.Generator().manual_seed(index)) // GROUP)
            g_idx = g_indices[key]
        else:
            g_idx = torch.arange(k) // GROUP
        if layout == "gptq":
            tensors = autogptq_tensors(codes, scales, zeros, bits, g_idx)
        elif layout == "awq":
            tensors = autoawq_tensors(codes, scales, zeros)
        else:
            tensors = encode(QuantizedWeight(codes, scales, zeros, bits, GROUP), torch.float16)
        packed.update({f"{module}.{t}": v for t, v in tensors.items()})
        dense[name] = dequantize(codes, scales, zeros, g_idx)
    save_file(packed, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "gptq": {"quant_method": "gptq", "bits": bits, "group_size": GROUP, "desc_act": act_order, "sym": symmetric},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"},
        "compressed-tensors": quantization_config(QuantizeOptions(scheme=QuantScheme(bits, GROUP, symmetric)),
                                                  ["lm_head"], None),
    }[layout]
    (folder / "config.json").write_text(json.dumps(config))
    return dense


def zili_logits(folder, dtype=torch.float32):
    model, _ = load_model(folder, device="cpu", dtype=dtype)
    with torch.no_grad():
        return model.compute_logits(model(IDS, torch.arange(len(IDS)), FullSequenceAttention())), model


def oracle_logits(base, dense):
    reference = load_reference(base)
    reference.load_state_dict(dense, strict=False)
    with torch.no_grad():
        return reference(IDS[None]).logits[0]


CASES = [("gptq", 4, False, True), ("gptq", 4, True, True), ("gptq", 8, True, False), ("awq", 4, False, False),
         ("compressed-tensors", 4, False, False), ("compressed-tensors", 8, False, True)]


@pytest.mark.parametrize("layout,bits,act_order,symmetric", CASES)
def test_checkpoint_logits_equal_dequantized_transformers(layout, bits, act_order, symmetric, qwen_checkpoint,
                                                          tmp_path, monkeypatch):
    folder = tmp_path / "quantized"
    dense = write_quantized(qwen_checkpoint, folder, layout, bits, act_order, symmetric)
    expected = oracle_logits(qwen_checkpoint, dense)
    monkeypatch.setenv("ZILI_QUANT_KERNEL", "reference")
    logits, model = zili_logits(folder)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, QuantLinear)
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert not isinstance(model.lm_head, QuantLinear)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    monkeypatch.delenv("ZILI_QUANT_KERNEL")
    fast, model = zili_logits(folder, torch.bfloat16)
    vnni = cpu_ext.available()  # groups of 32 take the VNNI kernels where they are built
    assert model.model.layers[0].mlp.gate_up_proj.kernel.name == (f"cpu-vnni-int{bits}" if vnni else f"cpu-int{bits}")
    assert (fast - expected).abs().max() <= 0.05 * expected.abs().max()  # bf16 activations


def test_corrupted_checkpoints_fail_clearly(qwen_checkpoint, tmp_path):
    folder = tmp_path / "gptq"
    write_quantized(qwen_checkpoint, folder, "gptq")
    state = load_file(str(folder / "model.safetensors"))

    def broken(name, change):
        target = tmp_path / name
        shutil.copytree(folder, target)
        tensors = dict(state)
        change(tensors)
        save_file(tensors, str(target / "model.safetensors"))
        return target

    missing = broken("missing", lambda t: t.pop("model.layers.1.self_attn.k_proj.qzeros"))
    with pytest.raises(CheckpointFormatError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.qzeros \(shard 1\)"):
        load_model(missing, device="cpu", dtype=torch.float32)
    reshaped = broken("reshaped", lambda t: t.update({"model.layers.0.mlp.down_proj.qweight":
                                                      t["model.layers.0.mlp.down_proj.qweight"][:-1]}))
    with pytest.raises(CheckpointFormatError, match="qweight"):
        load_model(reshaped, device="cpu", dtype=torch.float32)
    dense_left = broken("dense", lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64)}))
    with pytest.raises(CheckpointFormatError, match="unexpected tensor 'weight'"):
        load_model(dense_left, device="cpu", dtype=torch.float32)

    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError):
        load_model(truncated, device="cpu", dtype=torch.float32)

    config = json.loads((folder / "config.json").read_text())
    for change, message in [({"group_size": 48}, "does not divide"), ({"bits": 2}, "2-bit"),
                            ({"quant_method": "hqq"}, "'hqq' is not supported")]:
        bad = tmp_path / f"config-{message[:6]}"
        shutil.copytree(folder, bad)
        (bad / "config.json").write_text(json.dumps({**config, "quantization_config": {
            **config["quantization_config"], **change}}))
        with pytest.raises(CheckpointFormatError, match=message):
            load_model(bad, device="cpu", dtype=torch.float32)

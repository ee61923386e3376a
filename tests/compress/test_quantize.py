"""`zili quantize` end to end: every method writes a self-contained folder that loads, whose
weights round-trip within the method's bound and whose greedy tokens stay close to the original's;
bad input fails before anything is written, and a failed write leaves nothing behind."""

import json

import pytest
import torch

from zili.cli import main
from zili.compress import save
from zili.compress.quantize import quantize_model
from zili.compress.scheme import QuantizeOptions, QuantScheme
from zili.errors import InvalidRequestError
from zili.eval.full_sequence import FullSequenceAttention
from zili.generation import generate_tokens
from zili.layers.linear import Linear
from zili.layers.quantized import QuantLinear
from zili.models.loader import load_model
from zili.models.tokenizer import Tokenizer
from zili.sampling_params import SamplingParams

FAST = {"calib_windows": 8, "calib_window_tokens": 64, "awq_grid": 10}
SMALL = QuantScheme(4, 32)  # divides every input dimension of the tiny models


def greedy(model, prompt, steps=16):
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    return [s.token_id for s in generate_tokens(model, prompt, params, [], 256)]


def last_logits(model, ids):
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), FullSequenceAttention())[-1:])[0]


def assert_close_generation(original, quantized, folder):
    """Identical greedy tokens, or at the first divergence each model's pick is in the other's top-5."""
    for text in ("The quick brown", "Once upon a time", "My name is"):
        prompt = Tokenizer.from_folder(folder).encode(text)
        a, b = greedy(original, prompt), greedy(quantized, prompt)
        if a != b:
            first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            _assert_in_top5(original, quantized, prompt + a[:first], a[first], b[first])


def _assert_in_top5(original, quantized, prefix, token_a, token_b):
    assert token_b in torch.topk(last_logits(original, prefix), 5).indices.tolist()
    assert token_a in torch.topk(last_logits(quantized, prefix), 5).indices.tolist()


def reference_weights(model):
    """{module path: dense weight} of every quantized layer, read back through the reference kernel."""
    return {path: m.kernel.quantized_weight() for path, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("method,scheme", [
    ("rtn", QuantScheme(4, 32, True)), ("rtn", QuantScheme(8, None, False)),
    ("gptq", QuantScheme(4, 64, True)), ("gptq", QuantScheme(8, 32, False)),
    ("awq", QuantScheme(4, 32, False)), ("awq", QuantScheme(4, None, True)),
])
def test_each_method_round_trips(method, scheme, trained_checkpoint, calib_file, tmp_path, monkeypatch):
    out = tmp_path / "q"
    options = QuantizeOptions(method=method, scheme=scheme, **FAST)
    result = quantize_model(trained_checkpoint, out, options, calib=calib_file, progress=False)
    assert result.quantized_layers == 2 * 4            # qkv, o, gate_up, down per layer; lm_head stays
    assert (result.calibration_tokens > 0) == (method != "rtn")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["zili"]["method"] == method and config["format"] == "pack-quantized"
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (
        scheme.bits, scheme.group_size, scheme.symmetric)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["q"]          # no temp folder left beside it

    monkeypatch.setenv("ZILI_QUANT_KERNEL", "reference")
    original, _ = load_model(trained_checkpoint, device="cpu", dtype=torch.float32)
    quantized, _ = load_model(out, device="cpu", dtype=torch.float32)
    assert isinstance(quantized.lm_head, Linear) and torch.equal(quantized.lm_head.weight, original.lm_head.weight)
    for path, weight in reference_weights(quantized).items():
        dense = original.get_submodule(path).weight
        step = weight.scales.repeat_interleave(weight.group_size, dim=1)
        error = (weight.dense() - dense).abs()
        if method == "rtn":
            assert (error <= 0.5 * step * (1 + 1e-3)).all(), path
        elif method == "gptq":  # error feedback moves weights by a few steps at most, never out of the grid
            assert (error <= 8 * step).all() and error.mean() < step.mean(), path
    assert_close_generation(original, quantized, out)


def test_quantize_lm_head_unties_it(checkpoint_factory, tmp_path, monkeypatch):
    tied = checkpoint_factory("Qwen2ForCausalLM", tie_word_embeddings=True)
    out = tmp_path / "q"
    quantize_model(tied, out, QuantizeOptions(method="rtn", scheme=QuantScheme(8, None), quantize_lm_head=True),
                   progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["ignore"] == []
    monkeypatch.setenv("ZILI_QUANT_KERNEL", "reference")
    quantized, _ = load_model(out, device="cpu", dtype=torch.float32)
    original, _ = load_model(tied, device="cpu", dtype=torch.float32)
    assert isinstance(quantized.lm_head, QuantLinear)
    assert torch.equal(quantized.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert_close_generation(original, quantized, out)


def test_bad_input_fails_before_writing(qwen_checkpoint, calib_file, tmp_path):
    out = tmp_path / "q"
    cases = [
        (QuantizeOptions(scheme=QuantScheme(4, 48)), {}, "group_size", "does not divide the input dimension 64"),
        (QuantizeOptions(method="gptq", scheme=SMALL), {"calib": tmp_path / "nope.txt"}, "calib", "not found"),
        (QuantizeOptions(method="awq", scheme=SMALL), {"calib": tmp_path / "empty.txt"}, "calib", "is empty"),
        (QuantizeOptions(method="gptq", scheme=SMALL), {}, "calib", "needs a calibration text"),
    ]
    (tmp_path / "empty.txt").write_text("\n")
    for options, kwargs, param, message in cases:
        with pytest.raises(InvalidRequestError, match=message) as e:
            quantize_model(qwen_checkpoint, out, options, progress=False, **kwargs)
        assert e.value.param == param
        assert not out.exists()
    with pytest.raises(InvalidRequestError, match="must differ"):
        quantize_model(qwen_checkpoint, qwen_checkpoint, QuantizeOptions(scheme=SMALL), progress=False)
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(InvalidRequestError, match="not empty") as e:
        quantize_model(qwen_checkpoint, out, QuantizeOptions(scheme=SMALL), progress=False)
    assert e.value.param == "output" and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_write_leaves_nothing_and_overwrite_replaces(qwen_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "q"
    quantize_model(qwen_checkpoint, out, QuantizeOptions(scheme=QuantScheme(8, None)), progress=False)
    before = sorted(p.name for p in out.iterdir())

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(save, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        quantize_model(qwen_checkpoint, out, QuantizeOptions(scheme=SMALL), overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]       # the old folder survives, no debris
    assert sorted(p.name for p in out.iterdir()) == before
    monkeypatch.undo()
    quantize_model(qwen_checkpoint, out, QuantizeOptions(scheme=QuantScheme(4, 32)), overwrite=True, progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_already_quantized_model_is_refused(qwen_checkpoint, tmp_path):
    quantize_model(qwen_checkpoint, tmp_path / "q", QuantizeOptions(scheme=SMALL), progress=False)
    with pytest.raises(InvalidRequestError, match="already quantized"):
        quantize_model(tmp_path / "q", tmp_path / "qq", QuantizeOptions(scheme=SMALL), progress=False)


def test_cli(qwen_checkpoint, calib_file, tmp_path, capsys):
    out = tmp_path / "q4"
    code = main(["quantize", str(qwen_checkpoint), "-o", str(out), "--method", "gptq", "--bits", "4",
                 "--group-size", "32", "--calib", str(calib_file), "--calib-windows", "4",
                 "--calib-window-tokens", "32"])
    assert code == 0
    assert "gptq int4 g32 sym" in capsys.readouterr().err
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["group_size"], weights["symmetric"]) == (32, True)
    code = main(["quantize", str(qwen_checkpoint), "-o", str(tmp_path / "q8"), "--bits", "8", "--asym"])
    weights = json.loads((tmp_path / "q8" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert code == 0 and weights["group_0"]["weights"]["strategy"] == "channel"
    assert main(["quantize", str(qwen_checkpoint), "-o", str(tmp_path / "auto")]) == 0  # int4, no group size
    assert "note: group size 64" in capsys.readouterr().err   # 128 does not divide hidden 64
    weights = json.loads((tmp_path / "auto" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert weights["group_0"]["weights"]["group_size"] == 64
    for argv, message in [(["--method", "hqq"], "unknown quantization method 'hqq'"),
                          (["--bits", "3"], "bits must be 4 or 8"),
                          (["--group-size", "48"], "does not divide")]:
        assert main(["quantize", str(qwen_checkpoint), "-o", str(tmp_path / "bad"), *argv]) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_calibration_windows_never_exceed_the_context(qwen_checkpoint, calib_file, tmp_path):
    options = QuantizeOptions(method="gptq", scheme=SMALL, calib_windows=2, calib_window_tokens=1000)
    result = quantize_model(qwen_checkpoint, tmp_path / "q", options, calib=calib_file, progress=False)
    assert result.calibration_tokens == 2 * 256   # max_position_embeddings of the tiny model


def test_bf16_checkpoint_stays_bf16(checkpoint_factory, calib_file, tmp_path):
    """Calibration runs in fp32, but the folder keeps the source's dtype for dense tensors and scales."""
    from safetensors import safe_open

    source = checkpoint_factory("Qwen2ForCausalLM", dtype=torch.bfloat16)
    out = tmp_path / "q"
    quantize_model(source, out, QuantizeOptions(method="awq", scheme=SMALL, calib_windows=2, calib_window_tokens=32),
                   calib=calib_file, progress=False)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes["model.embed_tokens.weight"] == dtypes["model.layers.0.input_layernorm.weight"] == "BF16"
    assert dtypes["model.layers.0.self_attn.q_proj.weight_scale"] == dtypes["model.layers.0.self_attn.q_proj.bias"] == "BF16"
    assert dtypes["model.layers.0.mlp.down_proj.weight_packed"] == "I32"


@pytest.mark.parametrize("method,scheme", [("rtn", QuantScheme(4, 32, True)), ("gptq", QuantScheme(8, None, True))])
def test_transformers_reads_what_zili_writes(method, scheme, qwen_checkpoint, calib_file, tmp_path, monkeypatch):
    """An independent end-to-end reader: transformers + compressed-tensors decompress the folder.
    (Symmetric only: compressed-tensors 0.20 initializes asymmetric zero points with the unpacked
    shape and then cannot load its own packed ones; their compressor's output is what zili writes,
    see tests/compress/layouts/test_compressed_tensors_layout.py.)"""
    from tiny_models import load_reference

    out = tmp_path / "q"
    quantize_model(qwen_checkpoint, out, QuantizeOptions(method=method, scheme=scheme, **FAST), calib=calib_file,
                   progress=False)
    ids = [1, 17, 42, 99, 7, 150, 33, 8]
    with torch.no_grad():
        expected = load_reference(out)(torch.tensor([ids])).logits[0]
    monkeypatch.setenv("ZILI_QUANT_KERNEL", "reference")
    model, _ = load_model(out, device="cpu", dtype=torch.float32)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    torch.testing.assert_close(last_logits(model, ids), expected[-1], rtol=1e-4, atol=1e-4)

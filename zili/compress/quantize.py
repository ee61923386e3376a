"""`zili quantize`: dense model folder -> quantized model folder (compressed-tensors pack-quantized).

Flow: validate everything cheap first (method, bits, group size against every layer, the
calibration text, the output folder), load the model, then quantize decoder layer by decoder
layer. Each quantized layer replaces its Linear modules with QuantLinear at once (so calibration
of the next layer sees the quantized outputs, as GPTQ prescribes) and its packed tensors go
straight into the output dict: no dequantized copy of the model is ever held.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from zili.compress import awq, gptq
from zili.compress.calibration import LayerwiseRunner, calibration_windows, read_calibration_text
from zili.compress.formats import checkpoint_names
from zili.compress.layouts.compressed_tensors import encode, quantization_config
from zili.compress.rtn import rtn_quantize
from zili.compress.save import check_output_folder, write_model_folder
from zili.compress.scheme import QuantizeOptions
from zili.config import ModelConfig
from zili.devices import parse_dtype
from zili.errors import InvalidRequestError
from zili.layers.linear import Linear
from zili.layers.quantized import QuantizedWeight, QuantLinear
from zili.models.loader import load_model
from zili.models.tokenizer import Tokenizer

CHARS_PER_TOKEN_BOUND = 16  # read at most this many characters per calibration token wanted


@dataclass
class QuantizeResult:
    output: Path
    options: QuantizeOptions
    quantized_layers: int
    calibration_tokens: int
    seconds: float
    size_bytes: int


def _linears(module: nn.Module) -> dict[str, Linear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, Linear)}


def _checkpoint_dtype(config: ModelConfig) -> torch.dtype:
    name = (config.torch_dtype or "float32").replace("torch.", "")
    try:
        return parse_dtype(name, "cpu")
    except ValueError:
        return torch.float32


class _WindowSampler:
    """Keeps each captured input's first calibration windows, up to `max_tokens` tokens in all
    (at least one window): AWQ's search budget. Whole windows, so attention can run on them."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.windows: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        kept = self.windows.setdefault(name, [])
        if not kept or sum(w.shape[0] for w in kept) + x.shape[0] <= self.max_tokens:
            kept.append(x.detach().clone())   # (T, in_features)


class _Quantizer:
    """Quantizes one group of Linear layers at a time with the chosen method."""

    def __init__(self, options: QuantizeOptions, scale_dtype: torch.dtype, runner: LayerwiseRunner | None):
        self.options, self.scheme, self.scale_dtype, self.runner = options, options.scheme, scale_dtype, runner

    def decoder_layer(self, layer: nn.Module) -> dict[str, QuantizedWeight]:
        linears = _linears(layer)
        if self.options.method == "gptq":
            hessians = {name: gptq.HessianAccumulator(lin.in_features) for name, lin in linears.items()}
            self.runner.capture(layer, linears, lambda name, x: hessians[name].add(x.cpu()))
            return self._gptq(linears, hessians)
        if self.options.method == "awq":
            sampler = _WindowSampler(self.options.awq_max_tokens)
            self.runner.capture(layer, linears, sampler.add)
            awq.apply_awq(awq.decoder_layer_groups(layer, self.runner.rotary_for), sampler.windows, self.scheme,
                          self.options.awq_grid, self.scale_dtype)
        return self._rtn(linears)

    def lm_head(self, model: nn.Module) -> dict[str, QuantizedWeight]:
        linears = {"lm_head": model.lm_head}
        if self.options.method == "gptq":
            hessian = gptq.HessianAccumulator(model.lm_head.in_features)
            for h in self.runner.final_hidden():
                hessian.add(h.cpu())
            return self._gptq(linears, {"lm_head": hessian})
        if self.options.method == "awq":
            sampler = _WindowSampler(self.options.awq_max_tokens)
            for h in self.runner.final_hidden():
                sampler.add("lm_head", h)
            group = awq.ScaleGroup("lm_head", [model.lm_head], awq.fold_into_norm(model.model.norm))
            awq.apply_awq([group], sampler.windows, self.scheme, self.options.awq_grid, self.scale_dtype)
        return self._rtn(linears)

    def _rtn(self, linears: dict[str, Linear]) -> dict[str, QuantizedWeight]:
        return {name: rtn_quantize(lin.weight.data.cpu(), self.scheme, self.scale_dtype)
                for name, lin in linears.items()}

    def _gptq(self, linears, hessians) -> dict[str, QuantizedWeight]:
        o = self.options
        return {name: gptq.gptq_quantize(lin.weight.data.cpu(), hessians[name].hessian, self.scheme, o.block_size,
                                         o.damp_percent, o.act_order, self.scale_dtype)
                for name, lin in linears.items()}


def _install(model: nn.Module, parent: nn.Module, prefix: str, weights: dict[str, QuantizedWeight],
             tensors: dict[str, torch.Tensor], scale_dtype: torch.dtype) -> None:
    """Swap each Linear for a QuantLinear and record its packed tensors under checkpoint names."""
    for name, weight in weights.items():
        linear = parent.get_submodule(name) if name != "lm_head" else model.lm_head
        path = f"{prefix}.{name}" if prefix else name
        for shard, shard_name in enumerate(checkpoint_names(model, path)):
            rows = linear.shard_slice(shard if len(linear.output_sizes) > 1 else None)
            for key, tensor in encode(weight.rows(rows.start, rows.stop), scale_dtype).items():
                tensors[f"{shard_name}.{key}"] = tensor
        device = linear.weight.device
        bias = None if linear.bias is None else linear.bias.data
        layer = QuantLinear.from_weight(
            QuantizedWeight(weight.codes.to(device), weight.scales.to(device), weight.zeros.to(device),
                            weight.bits, weight.group_size), linear.output_sizes, bias, linear.weight.dtype)
        owner_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(owner_path) if owner_path else model, leaf, layer)


def _dense_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every remaining parameter under its checkpoint name and in `dtype`, fused layers split into shards."""
    tensors = {}
    for name, param in model.named_parameters():
        module_path, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_path)
        shard_names = checkpoint_names(model, module_path)
        sizes = getattr(module, "output_sizes", [None])
        if len(shard_names) > 1 and len(sizes) == len(shard_names):
            for shard, shard_name in enumerate(shard_names):
                tensors[f"{shard_name}.{leaf}"] = param.data[module.shard_slice(shard)].to("cpu", dtype).clone()
        else:
            tensors[name] = param.data.to("cpu", dtype).contiguous()
    return tensors


def linear_input_sizes(config: ModelConfig) -> dict[str, int]:
    """The input dimension of every quantizable Linear, by where it is."""
    return {"q/k/v and gate/up projections": config.hidden_size,
            "o_proj": config.num_attention_heads * config.head_dim,
            "down_proj": config.intermediate_size}


def fitting_group_size(config: ModelConfig, wanted: int = 128) -> int:
    """`wanted`, or the largest power of two below it dividing every Linear input of the model."""
    size = wanted
    while size > 1 and any(dim % size for dim in linear_input_sizes(config).values()):
        size //= 2
    return size


def validate(config: ModelConfig, options: QuantizeOptions) -> None:
    """Errors that need no weights: already quantized, a group size not dividing some layer."""
    if config.quantization_config:
        raise InvalidRequestError("this model is already quantized; quantize its original weights", param="model")
    for where, size in linear_input_sizes(config).items():
        options.scheme.check_divides(size, where)


def quantize_model(model_dir: str | Path, output_dir: str | Path, options: QuantizeOptions,
                   calib: str | Path | None = None, device: str = "cpu", dtype: str | torch.dtype | None = None,
                   overwrite: bool = False, progress: bool = True) -> QuantizeResult:
    """Quantize the model in `model_dir` into a self-contained folder `output_dir`."""
    start = time.perf_counter()
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    config = ModelConfig.from_folder(model_dir)
    validate(config, options)
    check_output_folder(model_dir, output_dir, overwrite)
    windows = []
    if options.needs_calibration:
        if calib is None:
            raise InvalidRequestError(f"{options.method} needs a calibration text (--calib FILE)", param="calib")
        wanted = options.calib_windows * options.calib_window_tokens
        text = read_calibration_text(calib, wanted * CHARS_PER_TOKEN_BOUND)
        ids = Tokenizer.from_folder(model_dir).encode(text)
        window_tokens = min(options.calib_window_tokens, config.max_position_embeddings)
        windows = calibration_windows(ids, window_tokens, options.calib_windows, options.seed)

    # Calibrate in fp32 (Hessians, AWQ's folded scales and norms are computed without bf16 rounding);
    # store in the checkpoint's own dtype, scales included.
    compute_dtype = parse_dtype(dtype, device) if dtype not in (None, "auto") else torch.float32
    storage_dtype = _checkpoint_dtype(config)
    # plain pages: the dense layers are replaced one by one, and each must free its memory as it goes
    model, config = load_model(model_dir, device=device, dtype=compute_dtype, progress=progress, huge_pages=False)
    if options.quantize_lm_head and config.tie_word_embeddings:  # the embedding stays dense
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.data.clone(), requires_grad=False)
    scale_dtype = storage_dtype

    runner = LayerwiseRunner(model, windows) if windows else None
    quantizer = _Quantizer(options, scale_dtype, runner)
    tensors: dict[str, torch.Tensor] = {}
    layers = model.model.layers
    count = 0
    for index, layer in enumerate(tqdm(layers, desc=f"{options.method} {options.scheme.describe()}",
                                       unit="layer", disable=not progress)):
        weights = quantizer.decoder_layer(layer)
        _install(model, layer, f"model.layers.{index}", weights, tensors, scale_dtype)
        count += len(weights)
        if runner is not None:
            runner.advance(layer)
    if options.quantize_lm_head:
        _install(model, model, "", quantizer.lm_head(model), tensors, scale_dtype)
        count += 1
    tensors.update(_dense_tensors(model, storage_dtype))

    calibration = {"calibration_file": Path(calib).name, "calibration_tokens": runner.num_tokens} if runner else {}
    qconfig = quantization_config(options, [] if options.quantize_lm_head else ["lm_head"], calibration)
    overrides = {"quantization_config": qconfig, "torch_dtype": str(storage_dtype).replace("torch.", "")}
    if options.quantize_lm_head and config.tie_word_embeddings:
        overrides["tie_word_embeddings"] = False
    size = write_model_folder(model_dir, output_dir, tensors, overrides, overwrite)
    return QuantizeResult(output_dir, options, count, runner.num_tokens if runner else 0,
                          time.perf_counter() - start, size)

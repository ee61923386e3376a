"""The fused C++ decoder layer (zili.engine.fused_decode) computes what the Python model computes.

Oracle: the Python model over the same paged cache (zili.engine.paged_attention), itself tested
against dense SDPA and transformers, on PyTorch's own ops (zili's kernels off: the row ops share
their code with the fused layers). Each case caches prompts of several lengths in scattered
blocks through the Python model, copies the cache, then runs decode steps both ways: the hidden
states and the k / v written into the cache must agree up to bf16 rounding (the two differ only
in fp32 summation order and where rotary / attention round), every step reading what the
previous one wrote. The fused step (`FusedDecoder.forward`: embedding, rotary rows, layers, final
norm and lm_head in one C++ call) must give the logits the Python model's compute_logits gives.
Decode attention has two paths, both held to the same oracle: AMX scores (bf16 cache, where the CPU
has AMX; runs of 16 positions read in place from blocks of 16 or gathered from smaller ones) and the
vector path (`set_attention_path("vector")`, and every int8 cache).
"""

from __future__ import annotations

import collections
import contextlib
import random

import pytest
import torch
from tiny_models import make_checkpoint, quantize_decoder_layers, random_tokens

from zili.engine.fused_decode import FusedDecoder
from zili.kernels import cpu_ext
from zili.engine.paged_attention import AttentionMetadata, PagedAttention, PagedKVCache, padded_block_tables
from zili.models.loader import load_model

BLOCK_SIZE = 4
CONTEXTS = [1, 6, 13, 4, 30]   # cached tokens per sequence before the first decode step
DECODE_STEPS = 3

CASES = {
    "llama-gqa": ("LlamaForCausalLM", {}),
    "llama-mha-head-dim-40": ("LlamaForCausalLM", {"num_key_value_heads": 4, "head_dim": 40}),
    # 7 query heads per KV head and 80 channels: the attention's register tiles (4 heads x 64 channels) split
    "llama-7-groups-head-dim-80": ("LlamaForCausalLM", {"num_attention_heads": 7, "num_key_value_heads": 1,
                                                        "head_dim": 80}),
    "qwen2-bias": ("Qwen2ForCausalLM", {}),
    "qwen3-qk-norm": ("Qwen3ForCausalLM", {}),
    "mistral-window-5": ("MistralForCausalLM", {"sliding_window": 5}),
    "gelu-tanh-one-kv-head": ("LlamaForCausalLM", {"hidden_act": "gelu_pytorch_tanh", "num_key_value_heads": 1}),
    # 20 query heads per KV head: two AMX tiles of heads; 16 channels: the head is one narrow tile
    "llama-20-groups-head-dim-16": ("LlamaForCausalLM", {"num_attention_heads": 20, "num_key_value_heads": 1,
                                                         "head_dim": 16}),
}
# Blocks of 16 and contexts past several runs of 16: the AMX path reads the keys in place
LONG_CONTEXTS = [1, 17, 70, 16, 45]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: make_checkpoint(tmp_path_factory.mktemp(name), arch, weight_std=0.1, **overrides)
            for name, (arch, overrides) in CASES.items()}


@contextlib.contextmanager
def pytorch_ops():
    """Run the Python model on PyTorch's ops only, as ZILI_CPU_KERNELS=0 does."""
    available = cpu_ext.available
    cpu_ext.available = lambda: False
    try:
        yield
    finally:
        cpu_ext.available = available


@pytest.fixture(params=["auto", "vector"])
def attention_path(request, cpu_kernels):
    """Decode attention on its default path (AMX scores where available) or forced onto the vector path."""
    previous = torch.ops.zili_cpu.set_attention_path(request.param)
    yield request.param
    torch.ops.zili_cpu.set_attention_path(previous)


def new_cache(config, kv_cache_dtype: str, block_size: int = BLOCK_SIZE) -> PagedKVCache:
    cache = PagedKVCache(config.num_hidden_layers, 64, block_size, config.num_key_value_heads, config.head_dim,
                         torch.bfloat16, "cpu", kv_cache_dtype)
    cache.kv.zero_()  # slots never written compare equal
    if cache.scales is not None:
        cache.scales.zero_()
    return cache


def copy_cache(cache: PagedKVCache, kv_cache_dtype: str, config) -> PagedKVCache:
    twin = new_cache(config, kv_cache_dtype, cache.block_size)
    twin.kv.copy_(cache.kv)
    if cache.scales is not None:
        twin.scales.copy_(cache.scales)
    return twin


@torch.inference_mode()
def compare_decode(model, kv_cache_dtype: str = "auto", seed: int = 0, step: str = "hidden",
                   block_size: int = BLOCK_SIZE, contexts: list[int] = CONTEXTS) -> list[tuple[float, float, float]]:
    """Per decode step: (max |fused - python|, max |python|, max |k/v difference| / max |k/v|) of the final
    hidden states (step="hidden": FusedDecoder.hidden_states) or of the logits (step="logits":
    FusedDecoder.forward, the whole step)."""
    config = model.config
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    free = list(range(64))
    rng.shuffle(free)  # scattered block tables
    tables = [[free.pop() for _ in range(-(-(n + DECODE_STEPS) // block_size))] for n in contexts]
    python_cache = new_cache(config, kv_cache_dtype, block_size)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen) for n in contexts]
    metadata = AttentionMetadata.build([(t, 0, n) for t, n in zip(tables, contexts)], block_size,
                                       python_cache.pad_block, torch.device("cpu"))
    positions = torch.cat([torch.arange(n) for n in contexts])
    with pytorch_ops():
        model(torch.cat(prompts), positions, PagedAttention(python_cache, metadata))
    fused_cache = copy_cache(python_cache, kv_cache_dtype, config)
    fused = FusedDecoder.build(model, fused_cache)
    assert fused is not None, "the fused decoder does not take this model"
    results = []
    lengths = list(contexts)
    for _ in range(DECODE_STEPS):
        tokens = torch.randint(0, config.vocab_size, (len(contexts),), generator=gen)
        positions = torch.tensor(lengths)
        metadata = AttentionMetadata.build([(t, n, 1) for t, n in zip(tables, lengths)], block_size,
                                           python_cache.pad_block, torch.device("cpu"))
        block_tables = padded_block_tables(tables, fused_cache.pad_block)
        with pytorch_ops():
            expected = model.model(tokens, positions, PagedAttention(python_cache, metadata))
            if step == "logits":
                expected = model.compute_logits(expected)
        if step == "logits":
            got, argmax = fused.forward(tokens.tolist(), positions.tolist(), block_tables)
            assert argmax is None or argmax == got.argmax(dim=-1).tolist()
        else:
            got = fused.hidden_states(tokens, positions, block_tables)
        # int8 caches: compare the values the codes stand for
        fused_kv, python_kv = (dequantized(c) for c in (fused_cache, python_cache))
        kv_error = ((fused_kv - python_kv).abs().max() / python_kv.abs().max()).item()
        results.append(((got.float() - expected.float()).abs().max().item(), expected.float().abs().max().item(),
                        kv_error))
        lengths = [n + 1 for n in lengths]
    return results


def dequantized(cache: PagedKVCache) -> torch.Tensor:
    return cache.kv.float() if cache.scales is None else cache.kv.float() * cache.scales.float()[..., None]


def load_bf16(folder):
    model, _ = load_model(folder, dtype=torch.bfloat16)
    return model


def assert_agrees(results, kv_tolerance: float = 0.02) -> None:
    for step, (error, scale, kv_error) in enumerate(results):
        # a few bf16 ulps of the outputs' magnitude (one ulp at 1.0 is 0.0078)
        assert error <= 0.03 * max(scale, 1.0), f"step {step}: outputs differ by {error} (max {scale})"
        assert kv_error <= kv_tolerance, f"step {step}: cached k / v differ by {kv_error}"


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_decode_matches_the_python_model(case, folders, attention_path):
    assert_agrees(compare_decode(load_bf16(folders[case])))


@pytest.mark.parametrize("case", list(CASES))
def test_decode_over_blocks_of_16_matches_the_python_model(case, folders, attention_path):
    assert_agrees(compare_decode(load_bf16(folders[case]), block_size=16, contexts=LONG_CONTEXTS))


def test_decode_attention_takes_amx_where_the_cpu_has_it(cpu_kernels):
    ops = torch.ops.zili_cpu
    assert ops.attention_path(True, 64) == "vector"  # int8 caches: always the vector path
    assert ops.attention_path(False, 64) == ("amx" if cpu_kernels.has_amx() else "vector")
    previous = ops.set_attention_path("vector")
    try:
        assert ops.attention_path(False, 64) == "vector"
        with pytest.raises(RuntimeError, match="auto or vector"):
            ops.set_attention_path("fast")
    finally:
        ops.set_attention_path(previous)


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 64), (4, 32)])
def test_quantized_decode_matches_the_python_model(bits, group_size, folders, cpu_kernels):
    model = load_bf16(folders["qwen2-bias"])
    quantize_decoder_layers(model, bits, group_size)
    # the kernels quantize activations to int8 per block: where the paths' inputs differ by a bf16 ulp
    # (the Python layer adds the bias after rounding, the op before), a code can round to its neighbour
    assert_agrees(compare_decode(model), kv_tolerance=0.04)


@pytest.mark.parametrize("case", ["llama-gqa", "mistral-window-5"])
def test_int8_kv_cache_decode_matches_the_python_model(case, folders, cpu_kernels):
    # where bf16 inputs differ by an ulp, the int8 code may round to its neighbour: 1/127 of the vector's max
    assert_agrees(compare_decode(load_bf16(folders[case]), kv_cache_dtype="int8"), kv_tolerance=0.03)


@pytest.mark.parametrize("case", list(CASES))
def test_the_fused_step_gives_the_python_models_logits(case, folders, cpu_kernels):
    model = load_bf16(folders[case])
    assert FusedDecoder.build(model, new_cache(model.config, "auto")).vocab_size == model.config.vocab_size
    assert_agrees(compare_decode(model, step="logits"))


def test_the_fused_step_with_tied_embeddings_quantized_layers_and_an_int8_cache(tmp_path, cpu_kernels):
    model = load_bf16(make_checkpoint(tmp_path, "Qwen2ForCausalLM", weight_std=0.1, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantize_decoder_layers(model, 4, 32)
    assert_agrees(compare_decode(model, kv_cache_dtype="int8", step="logits"), kv_tolerance=0.04)


def test_the_fused_step_leaves_length_dependent_rotary_tables_to_python(tmp_path, cpu_kernels):
    # dynamic NTK scaling past max_position_embeddings: cos / sin of every position depend on the longest
    # sequence, so the step takes the Python rotary (and the logits still agree)
    model = load_bf16(make_checkpoint(tmp_path, weight_std=0.1, max_position_embeddings=16,
                                      rope_scaling={"type": "dynamic", "factor": 2.0}))
    rotary = model.model.rotary_emb
    assert rotary.table(16, torch.device("cpu")) is not None and rotary.table(max(CONTEXTS) + 1, torch.device("cpu")) is None
    assert_agrees(compare_decode(model, step="logits"))


def test_the_fused_steps_argmax_is_torch_argmax_on_ties_and_nan(folders, cpu_kernels):
    model = load_bf16(folders["llama-gqa"])
    with torch.no_grad():
        weight = model.lm_head.weight
        weight.zero_()
        row = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        weight[[7, 11]], weight[[13, 17]] = row, -row  # two tied maxima, whichever the sign: the first wins
    cache = new_cache(model.config, "auto")
    fused = FusedDecoder.build(model, cache)
    tables = torch.tensor([[0, 1], [2, 3], [4, 5]])
    logits, argmax = fused.forward([1, 2, 3], [3, 5, 6], tables)
    assert argmax == logits.argmax(dim=-1).tolist() and set(argmax) <= {7, 13}
    with torch.no_grad():
        weight[[9, 19]] = float("nan")
    logits, argmax = fused.forward([1, 2, 3], [4, 6, 7], tables)
    assert argmax == logits.argmax(dim=-1).tolist() == [9, 9, 9]


PARTS = ("rms_norm", "qkv_proj", "attention", "o_proj", "gate_up", "down_proj", "lm_head")


@pytest.mark.parametrize("case", ["llama-gqa", "gelu-tanh-one-kv-head"])
def test_the_fused_step_reports_its_parts_to_the_profiler(case, folders, cpu_kernels):
    from torch.profiler import ProfilerActivity, profile

    model = load_bf16(folders[case])
    fused = FusedDecoder.build(model, new_cache(model.config, "auto"))
    tables = torch.tensor([[0, 1], [2, 3]])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fused.forward([1, 2], [3, 5], tables)
    events = [e for e in prof.events() if e.name.startswith("zili_cpu::")]
    count = collections.Counter(e.name for e in events)
    layers = model.config.num_hidden_layers
    expected = {"rms_norm": 2 * layers, "lm_head": 1, "decode_step": 1, "decode_layers": 1,
                **{part: layers for part in PARTS if part not in ("rms_norm", "lm_head")}}
    config = model.config
    fused_gate = (config.hidden_act == "silu" and config.intermediate_size % 16 == 0  # on AMX, SiLU runs in gate_up
                  and torch.ops.zili_cpu.bf16_matmul_path(2, config.hidden_size) == "amx")
    if not fused_gate:
        expected["activation"] = layers
    assert count == {f"zili_cpu::{name}": n for name, n in expected.items()}
    step = next(e for e in events if e.name == "zili_cpu::decode_step")
    inside = sum(e.cpu_time_total for e in events if e.name.removeprefix("zili_cpu::") in (*PARTS, "activation"))
    assert 0 < inside <= step.cpu_time_total  # the parts nest inside the step


def test_fused_decoder_declines_what_it_cannot_run(folders, cpu_kernels):
    config_folder = folders["llama-gqa"]
    fp32_model, _ = load_model(config_folder, dtype=torch.float32)
    assert FusedDecoder.build(fp32_model, new_cache(fp32_model.config, "auto")) is None  # fp32: Python model
    model = load_bf16(config_folder)
    quantize_decoder_layers(model, 4)
    model.model.layers[1].mlp.down_proj.kernel.register_buffer("perm", torch.arange(128))  # act-order
    assert FusedDecoder.build(model, new_cache(model.config, "auto")) is None


def test_the_engine_runs_decode_steps_through_the_fused_layers(folders, cpu_kernels, monkeypatch):
    from zili.llm import LLM
    from zili.sampling_params import SamplingParams

    calls = []
    forward = FusedDecoder.forward
    monkeypatch.setattr(FusedDecoder, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    llm = LLM(folders["llama-gqa"], dtype="bfloat16")
    prompts = [random_tokens(llm.config.vocab_size, n, seed) for seed, n in enumerate((3, 9, 17))]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [8, 8, 8]
    assert len(calls) >= 7, "decode steps did not go through the fused decoder"


def test_bad_step_inputs_get_clear_errors_and_leave_the_cache_alone(folders, cpu_kernels):
    model = load_bf16(folders["llama-gqa"])
    cache = new_cache(model.config, "auto")
    fused = FusedDecoder.build(model, cache)
    hidden = torch.zeros(2, model.config.hidden_size, dtype=torch.bfloat16)
    cos, sin = model.model.rotary_emb.cos_sin(torch.tensor([3, 5]), torch.bfloat16)
    tables = torch.tensor([[0, 1], [2, 3]])
    before = cache.kv.clone()
    with pytest.raises(RuntimeError, match="hidden must be"):
        fused.layers.forward(hidden[:, :-1].contiguous(), cos, sin, cache.kv, None, tables, torch.tensor([4, 6]))
    with pytest.raises(RuntimeError, match="block id out of range"):
        fused.layers.forward(hidden, cos, sin, cache.kv, None, torch.tensor([[0, 1], [2, 65]]), torch.tensor([4, 6]))
    with pytest.raises(RuntimeError, match="context length out of range"):
        fused.layers.forward(hidden, cos, sin, cache.kv, None, tables, torch.tensor([4, 9]))
    assert torch.equal(cache.kv, before) and fused.layers.size() == model.config.num_hidden_layers
    with pytest.raises(RuntimeError, match="malformed arguments"):
        fused.layers.add([None] * 3, [0] * 15, [1e-6, 1.0])
    vocab = model.config.vocab_size
    with pytest.raises(RuntimeError, match=f"token id {vocab} out of the embedding's range"):
        fused.forward([1, vocab], [3, 5], tables)
    rope = model.model.rotary_emb.table(6, torch.device("cpu"))
    logits = torch.empty(2, vocab)
    with pytest.raises(RuntimeError, match="out of the rotary table's range"):
        fused.layers.step(torch.tensor([1, 2]), torch.tensor([3, rope.shape[0]]), rope, cache.kv, None, tables, logits)
    with pytest.raises(RuntimeError, match="logits must be"):
        fused.layers.step(torch.tensor([1, 2]), torch.tensor([3, 5]), rope, cache.kv, None, tables, logits[:1])
    assert torch.equal(cache.kv, before)


@pytest.mark.parametrize("case", ["llama-gqa", "mistral-window-5", "llama-20-groups-head-dim-16"])
def test_cache_slots_outside_the_context_never_reach_the_output(case, folders, attention_path):
    # runs of 16 positions are read whole from blocks of 16, past the context too: what those slots
    # hold (here NaN, or zeros) must not change a single logit
    model = load_bf16(folders[case])
    config = model.config
    lengths = [1, 16, 17, 40, 7]
    blocks = [list(range(4 * i, 4 * i + 4)) for i in range(len(lengths))]
    tokens = torch.randint(0, config.vocab_size, (len(lengths),), generator=torch.Generator().manual_seed(2)).tolist()
    logits = []
    for outside in (float("nan"), 0.0):
        cache = new_cache(config, "auto", block_size=16)
        cache.kv.fill_(outside)
        for table, n in zip(blocks, lengths):
            slots = torch.tensor([table[p // 16] * 16 + p % 16 for p in range(n)])
            shape = cache.kv[:, :, :, slots].shape
            cache.kv[:, :, :, slots] = torch.randn(shape, generator=torch.Generator().manual_seed(n)).bfloat16()
        fused = FusedDecoder.build(model, cache)
        got, _ = fused.forward(tokens, lengths, padded_block_tables(blocks, cache.pad_block))
        logits.append(got)
    assert torch.isfinite(logits[0]).all()
    assert torch.equal(logits[0], logits[1])

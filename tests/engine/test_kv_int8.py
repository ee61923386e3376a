"""int8 KV cache (kv_cache_dtype="int8"): paged attention equals the dense SDPA oracle fed the
dequantized k / v, stays within a derived bound of full precision, the memory plan holds the
exact number of blocks, and the engine's greedy tokens stay inside the reference's top-5 at the
first divergence, with prefix-cache hits and misses giving identical tokens."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import run_to_completion
from tiny_models import zili_logits
from zili.config import ConfigError, EngineConfig
from zili.engine.paged_attention import AttentionMetadata, PagedAttention, PagedKVCache
from zili.engine.planning import plan_engine
from zili.layers.attention import causal_mask, sdpa_attention
from zili.layers.kv_quant import quantize_kv, round_trip_kv
from zili.sampling_params import SamplingParams

BLOCK_SIZE, HEAD_DIM, NUM_LAYERS, SCALE = 4, 16, 2, 0.25
# (cached tokens, new tokens) per sequence: decodes, a fresh prompt, prefills after cached prefixes
MIXED = [(5, 1), (0, 1), (13, 1), (0, 9), (6, 5), (3, 1), (8, 8)]


def run_int8_batch(specs, num_heads, num_kv_heads, window, seed=0):
    """Attend one flat batch through an int8 cache whose prefixes were written by `write`.

    Returns per sequence and layer: (paged out, q, full-precision k, v) with k, v (L, Hkv, D)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = 64
    cache = PagedKVCache(NUM_LAYERS, num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM, torch.float32, "cpu", "int8")
    assert cache.kv.dtype == torch.int8
    cache.scales[:, :, :, :cache.pad_slot] = float("nan")  # unwritten slots must never be read
    free = list(range(num_blocks))
    rng.shuffle(free)
    specs = sorted(specs, key=lambda s: s[1] != 1)  # the runner's order: decodes first
    tables = [[free.pop() for _ in range(-(-(c + n) // BLOCK_SIZE))] for c, n in specs]
    keys = [torch.randn(NUM_LAYERS, c + n, num_kv_heads, HEAD_DIM, generator=gen) for c, n in specs]
    values = [torch.randn(NUM_LAYERS, c + n, num_kv_heads, HEAD_DIM, generator=gen) for c, n in specs]
    for (cached, _), table, k, v in zip(specs, tables, keys, values):
        if cached:
            slots = torch.tensor([table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(cached)])
            for layer in range(NUM_LAYERS):
                cache.write(layer, slots, k[layer, :cached], v[layer, :cached])
    metadata = AttentionMetadata.build([(t, c, n) for (c, n), t in zip(specs, tables)], BLOCK_SIZE,
                                       cache.pad_block, torch.device("cpu"))
    results = []
    for layer in range(NUM_LAYERS):
        q = torch.randn(sum(n for _, n in specs), num_heads, HEAD_DIM, generator=gen)
        new_k = torch.cat([k[layer, c:] for (c, _), k in zip(specs, keys)])
        new_v = torch.cat([v[layer, c:] for (c, _), v in zip(specs, values)])
        out = PagedAttention(cache, metadata).attend(layer, q, new_k, new_v, SCALE, window)
        row = 0
        for (cached, new), k, v in zip(specs, keys, values):
            results.append((cached, new, out[row:row + new], q[row:row + new], k[layer], v[layer]))
            row += new
    return results


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (6, 1)])
@pytest.mark.parametrize("window", [None, 3])
def test_int8_paged_attention_equals_the_oracle_on_dequantized_kv(num_heads, num_kv_heads, window):
    for cached, new, out, q, k, v in run_int8_batch(MIXED, num_heads, num_kv_heads, window):
        mask = causal_mask(new, cached + new, window, "cpu")
        ref = sdpa_attention(q, round_trip_kv(k), round_trip_kv(v), SCALE, mask)
        assert float((out - ref).abs().max()) < 1e-5, (cached, new)


def test_int8_paged_attention_stays_within_the_quantization_bound_of_full_precision():
    """With |dk| <= s_k / 2 and |dv| <= s_v / 2 per element, each logit moves by at most
    eps = SCALE * ||q||_1 * max s_k / 2, so each softmax weight by a factor within exp(+-2 eps), and
    |out' - out| <= max s_v / 2 + (exp(2 eps) - 1) * max |v|."""
    checked = 0
    for cached, new, out, q, k, v in run_int8_batch(MIXED, 4, 2, None, seed=3):
        ref = sdpa_attention(q, k, v, SCALE, causal_mask(new, cached + new, None, "cpu"))
        k_scale, v_scale = quantize_kv(k)[1].float(), quantize_kv(v)[1].float()
        eps = SCALE * float(q.abs().sum(-1).max()) * float(k_scale.max()) / 2
        bound = float(v_scale.max()) / 2 + math.expm1(2 * eps) * float(v.abs().max())
        error = float((out - ref).abs().max())
        assert error <= bound, (cached, new, error, bound)
        checked += 1
    assert checked == len(MIXED) * NUM_LAYERS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_budget_holds_the_exact_int8_block_count(tiny, dtype):
    config = tiny.config
    budget = 64 * 2**20
    vectors = config.num_hidden_layers * 2 * config.num_key_value_heads * 16  # per block of 16 tokens
    plans = {kv: plan_engine(EngineConfig.from_options(kv_cache_memory=budget, kv_cache_dtype=kv), config, dtype,
                             torch.device("cpu")) for kv in ("auto", "int8")}
    assert plans["auto"].bytes_per_block == vectors * config.head_dim * dtype.itemsize
    assert plans["int8"].bytes_per_block == vectors * (config.head_dim + 2)  # int8 values + fp16 scale
    assert plans["int8"].num_blocks == budget // (vectors * (config.head_dim + 2))
    ratio = plans["int8"].num_blocks / plans["auto"].num_blocks
    expected = dtype.itemsize * config.head_dim / (config.head_dim + 2)  # 1.78x bf16, 3.56x fp32 at head_dim 16
    assert ratio == pytest.approx(expected, rel=1e-3)
    assert plans["int8"].num_kv_tokens == plans["int8"].num_blocks * 16
    assert f"= {plans['int8'].num_kv_tokens} tokens, kv_cache_dtype=int8" in plans["int8"].describe()
    # the formula is what the cache really allocates (blocks + the pad block)
    cache = PagedKVCache(config.num_hidden_layers, 8, 16, config.num_key_value_heads, config.head_dim, dtype,
                         "cpu", "int8")
    assert cache.kv.nbytes + cache.scales.nbytes == 9 * plans["int8"].bytes_per_block


def test_unknown_kv_cache_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        EngineConfig.from_options(kv_cache_dtype="fp8")


PROMPT_LENGTHS = [3, 17, 40]


def prompts_of(lengths, seed=0, vocab=290):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def test_int8_greedy_diverges_from_the_reference_only_inside_its_top5(tiny, make_engine):
    engine = make_engine(kv_cache_dtype="int8")
    assert engine.runner.kv_cache.kv.dtype == torch.int8
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = prompts_of(PROMPT_LENGTHS)
    for prompt, output in zip(prompts, run_to_completion(engine, prompts, params)):
        expected = tiny.reference(prompt, params, engine.max_model_len)
        assert len(output.token_ids) == len(expected)
        diverged = next((i for i, (a, b) in enumerate(zip(output.token_ids, expected)) if a != b), None)
        if diverged is not None:
            logits = zili_logits(tiny.model, prompt + expected[:diverged])[-1]
            top5 = torch.topk(logits, 5).indices.tolist()
            assert output.token_ids[diverged] in top5, (len(prompt), diverged)


def test_int8_prefix_cache_hit_and_miss_give_identical_tokens(make_engine):
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    shared = prompts_of([37], seed=5)[0]
    prompts = [shared, shared, shared[:33] + [7, 8, 9]]  # a full hit, then a hit on the first 2 blocks
    cached = make_engine(kv_cache_dtype="int8", enable_prefix_caching=True)
    hits = [run_to_completion(cached, [p], params)[0].token_ids for p in prompts]
    assert cached.metrics().prefix_cache_hits >= 32 + 32
    uncached = make_engine(kv_cache_dtype="int8", enable_prefix_caching=False)
    misses = [out.token_ids for out in run_to_completion(uncached, prompts, params)]
    assert uncached.metrics().prefix_cache_hits == 0
    assert hits == misses
    chunked = make_engine(kv_cache_dtype="int8", enable_prefix_caching=False, max_num_batched_tokens=8)
    assert [out.token_ids for out in run_to_completion(chunked, prompts, params)] == misses


@pytest.mark.parametrize("chunk_tokens", [None, 8], ids=["whole-prompt", "chunked"])
def test_perplexity_backend_scores_prompts_as_the_int8_engine_does(tiny, make_engine, chunk_tokens):
    """`zili eval perplexity --kv-cache-dtype int8` rounds k / v as the paged int8 cache does: its
    log-probs equal the int8 engine's prompt logprobs (prompt read back from the cache in chunks or
    attended fresh), and differ from full precision by more than that agreement."""
    from zili.eval.full_sequence import FullSequenceAttention

    prompt = prompts_of([29], seed=9)[0]
    options = {"max_num_batched_tokens": chunk_tokens} if chunk_tokens else {}
    engine = make_engine(kv_cache_dtype="int8", block_size=4, **options)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    output = run_to_completion(engine, [prompt], params)[0]
    engine_logprobs = torch.tensor([entry.logprob for entry in output.prompt_logprobs[1:]])

    def full_sequence_logprobs(kv_cache_dtype):
        with torch.inference_mode():
            hidden = tiny.model(torch.tensor(prompt), torch.arange(len(prompt)), FullSequenceAttention(kv_cache_dtype))
            logprobs = torch.log_softmax(tiny.model.compute_logits(hidden[:-1]), dim=-1)
        return logprobs.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]

    int8_gap = float((full_sequence_logprobs("int8") - engine_logprobs).abs().max())
    full_gap = float((full_sequence_logprobs("auto") - engine_logprobs).abs().max())
    assert int8_gap < 1e-4
    assert full_gap > 10 * int8_gap


def test_every_entry_point_passes_kv_cache_dtype(tiny_checkpoint, tmp_path, capsys):
    from zili.cli import build_parser, main
    from zili.commands.common import load_llm
    from zili.serve.server import build_client
    from zili.serve.settings import ServeSettings

    args = build_parser(["generate"]).parse_args(["generate", str(tiny_checkpoint), "--kv-cache-dtype", "int8",
                                                  "--dtype", "fp32"])
    llm = load_llm(args)
    assert llm.engine.config.cache.kv_cache_dtype == "int8"
    assert llm.engine.runner.kv_cache.kv.dtype == torch.int8
    for command in ("chat", "serve"):
        assert build_parser([command]).parse_args([command, "--kv-cache-dtype", "int8"]).kv_cache_dtype == "int8"
    client = build_client(ServeSettings(model=tiny_checkpoint, kv_cache_dtype="int8"))
    assert client.config["engine_options"]["kv_cache_dtype"] == "int8"
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 4)
    assert main(["eval", "perplexity", str(tiny_checkpoint), "--text", str(text), "--dtype", "fp32",
                 "--kv-cache-dtype", "int8"]) == 0
    assert capsys.readouterr().out.startswith("KV cache: int8")

"""Moving a model's weights onto huge-page-advised memory (zili/huge_pages.py).

The oracle is the model before the move: every value, every tie between parameters and every view
relation must survive bit for bit, and the loaded model must compute the same logits as one loaded
without the move. Where the kernel backs the memory with huge pages is its choice and is not asserted;
the layout the move promises (2 MiB aligned arenas, 4 KiB aligned tensors in module order) is.
"""

from __future__ import annotations

import ctypes
import gc
import mmap

import pytest
import torch
from torch import nn

from tiny_models import make_checkpoint, random_tokens, zili_logits
from zili import huge_pages
from zili.compress.quantize import quantize_model
from zili.compress.scheme import QuantizeOptions, QuantScheme
from zili.huge_pages import HUGE_PAGE, PAGE, huge_page_buffer, move_to_huge_pages
from zili.models.loader import load_model

pytestmark = pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="needs Linux madvise")


@pytest.fixture(autouse=True)
def thp_available(tmp_path, monkeypatch):
    """Huge pages on, whatever this host's THP mode: madvise is only advice, so the move runs anywhere."""
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    monkeypatch.setattr(huge_pages, "THP_MODE", mode)
    monkeypatch.delenv("ZILI_HUGE_PAGES", raising=False)
    return mode


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(300, 64)          # 76.8 KB
        self.proj = nn.Linear(64, 256)               # 64 KB weight, 1 KB bias (stays: under 4 KiB)
        self.head = nn.Linear(64, 300, bias=False)
        self.head.weight = self.embed.weight         # tied, as in tie_word_embeddings
        self.register_buffer("rows", self.proj.weight.detach()[10:20])  # a view of proj's storage


def test_move_keeps_values_ties_and_views():
    model = Tied()
    before = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    bias_ptr = model.proj.bias.data_ptr()
    moved = move_to_huge_pages(model)

    assert moved == 300 * 64 * 4 + 256 * 64 * 4  # the embedding once (tied), proj's storage once (viewed)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.equal(t, before[name]), name
    assert model.head.weight is model.embed.weight
    assert isinstance(model.proj.weight, nn.Parameter) and model.proj.weight.requires_grad
    assert model.proj.bias.data_ptr() == bias_ptr  # under min_bytes: not moved
    # the view still views the weight: same offset, and writes go through
    assert model.rows.data_ptr() - model.proj.weight.data_ptr() == 10 * 64 * 4
    with torch.no_grad():
        model.proj.weight[12, 5] = 7.0
    assert model.rows[2, 5].item() == 7.0
    # one arena starting on a huge page, storages 4 KiB aligned in order of first appearance (the root's
    # `rows` buffer comes first, so proj's storage does)
    embed, proj = model.embed.weight.data_ptr(), model.proj.weight.data_ptr()
    assert proj % HUGE_PAGE == 0
    assert embed == proj + -(-256 * 64 * 4 // PAGE) * PAGE
    assert model.embed.weight.untyped_storage().data_ptr() == model.proj.weight.untyped_storage().data_ptr()


def test_arenas_are_filled_in_module_order():
    layers = nn.ModuleList(nn.Linear(256, 256, bias=False) for _ in range(6))  # 256 KiB each
    values = [layer.weight.detach().clone() for layer in layers]
    move_to_huge_pages(layers, arena_bytes=600 << 10)  # two weights per arena
    pointers = [layer.weight.data_ptr() for layer in layers]
    storages = [layer.weight.untyped_storage().data_ptr() for layer in layers]
    assert len(set(storages)) == 3
    for first in (0, 2, 4):
        assert storages[first] == storages[first + 1]
        assert pointers[first] % HUGE_PAGE == 0
        assert pointers[first + 1] - pointers[first] == 256 * 256 * 4
    for layer, value in zip(layers, values):
        assert torch.equal(layer.weight, value)


def test_a_second_move_moves_nothing():
    model = Tied()
    move_to_huge_pages(model)
    pointers = [p.data_ptr() for p in model.parameters()]
    assert move_to_huge_pages(model) == 0
    assert [p.data_ptr() for p in model.parameters()] == pointers


@pytest.mark.parametrize("how", ["env", "never"])
def test_switched_off_nothing_moves(how, thp_available, monkeypatch):
    if how == "env":
        monkeypatch.setenv("ZILI_HUGE_PAGES", "0")
    else:
        thp_available.write_text("always madvise [never]\n")
    model = Tied()
    pointers = [p.data_ptr() for p in model.parameters()]
    assert not huge_pages.enabled()
    assert move_to_huge_pages(model) == 0
    assert [p.data_ptr() for p in model.parameters()] == pointers


def test_memory_outlives_the_module_and_buffer():  # while any tensor is on it
    model = Tied()
    move_to_huge_pages(model)
    weight, expected = model.proj.weight, model.proj.weight.detach().clone()
    del model
    gc.collect()
    assert torch.equal(weight, expected)  # the mapping is alive while a tensor uses it
    buffer = huge_page_buffer(3 * HUGE_PAGE + 5)
    assert buffer.dtype == torch.uint8 and buffer.numel() == 3 * HUGE_PAGE + 5
    assert buffer.data_ptr() % HUGE_PAGE == 0
    buffer.fill_(1)  # every byte is writable
    assert int(buffer.sum()) == buffer.numel()


def test_moved_parameters_still_train():
    model = Tied()
    move_to_huge_pages(model)
    x = torch.randint(0, 300, (4,))
    loss = model.head(model.embed(x)).logsumexp(-1).sum()
    loss.backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # in-place updates land in the arena


def test_huge_page_bytes_reads_the_mapping():
    buffer = huge_page_buffer(4 * HUGE_PAGE).fill_(1)
    backed = huge_pages.huge_page_bytes(buffer)
    assert backed is None or 0 <= backed <= 5 * HUGE_PAGE  # this mapping, not the whole process


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("hp"), "LlamaForCausalLM", dtype=torch.bfloat16,
                           tie_word_embeddings=True)


@pytest.fixture(scope="module")
def int4_checkpoint(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("hp-int4") / "q"
    quantize_model(checkpoint, out, QuantizeOptions(method="rtn", scheme=QuantScheme(4, 32)), progress=False)
    return out


@pytest.mark.parametrize("which", ["bf16", "int4"])
def test_loaded_model_computes_the_same_with_and_without_huge_pages(which, checkpoint, int4_checkpoint, monkeypatch):
    """The checkpoint is read straight into empty huge-page arenas, and what loading makes anew (packed
    quantized weights) moves after: both must hold exactly what a plain load holds."""
    folder = checkpoint if which == "bf16" else int4_checkpoint
    monkeypatch.setenv("ZILI_HUGE_PAGES", "0")
    plain, _ = load_model(folder, device="cpu", dtype=torch.bfloat16)
    monkeypatch.delenv("ZILI_HUGE_PAGES")
    moved, _ = load_model(folder, device="cpu", dtype=torch.bfloat16)
    embed = moved.model.embed_tokens.weight
    assert embed.data_ptr() % HUGE_PAGE == 0  # the first tensor in module order opens the arena
    assert moved.lm_head.weight is embed  # tied (the int4 checkpoint keeps the head in bf16)
    big = [t for t in [*moved.parameters(), *moved.buffers()] if t.untyped_storage().nbytes() >= PAGE]
    assert big and all(t.data_ptr() % PAGE == 0 or t.storage_offset() for t in big)
    for (name, a), b in zip(moved.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    tokens = random_tokens(moved.config.vocab_size, 24, seed=5)
    assert torch.equal(zili_logits(moved, tokens), zili_logits(plain, tokens))


def _vm_flags(address: int) -> list[str] | None:
    fields = huge_pages.mapping_fields(address)
    return None if fields is None else fields.get("VmFlags", "").split()


def test_arenas_are_advised_for_huge_pages():
    """The kernel shows MADV_HUGEPAGE as VmFlags "hg" whether or not it found huge pages to back it."""
    model = Tied()
    move_to_huge_pages(model)
    flags = _vm_flags(model.embed.weight.data_ptr())
    if flags is None or not huge_pages.THP_MODE.exists():
        pytest.skip("no /proc/self/smaps or THP on this system")
    assert "hg" in flags
    assert "hg" not in (_vm_flags(model.proj.bias.data_ptr()) or [])  # 1 KiB: left on ordinary memory


def test_arenas_are_unmapped_with_their_last_tensor():
    model = Tied()
    move_to_huge_pages(model)
    arena = model.embed.weight.untyped_storage().data_ptr()
    assert arena in huge_pages._ARENAS
    del model
    gc.collect()
    assert arena not in huge_pages._ARENAS  # the numpy array (and with it the mapping) is gone


def test_quantize_loads_the_dense_model_on_plain_pages(checkpoint, tmp_path, monkeypatch):
    """zili quantize drops each dense layer as it quantizes it: on shared arenas nothing would be freed."""
    import zili.models.loader as loader

    def refuse(module):
        raise AssertionError("quantize moved the dense model onto huge-page arenas")
    monkeypatch.setattr(loader, "move_to_huge_pages", refuse)
    quantize_model(checkpoint, tmp_path / "q", QuantizeOptions(method="rtn", scheme=QuantScheme(8, None)),
                   progress=False)
    assert (tmp_path / "q" / "config.json").is_file()


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("on", [True, False])
def test_the_kv_cache_sits_on_huge_pages_with_its_pad_block_zero(kv_cache_dtype, on, thp_available, monkeypatch):
    from zili.engine.paged_attention import PagedKVCache

    if not on:
        monkeypatch.setenv("ZILI_HUGE_PAGES", "0")
    cache = PagedKVCache(3, 5, 4, 2, 8, torch.bfloat16, "cpu", kv_cache_dtype)
    assert cache.kv.shape == (3, 2, 2, 6 * 4, 8) and cache.kv.dtype == (torch.int8 if kv_cache_dtype == "int8" else torch.bfloat16)
    for tensor in [cache.kv] + ([cache.scales] if cache.scales is not None else []):
        assert tensor.is_contiguous() and torch.count_nonzero(tensor[:, :, :, cache.pad_slot:]) == 0
        flags = _vm_flags(tensor.data_ptr())
        if flags is not None and huge_pages.THP_MODE.exists():
            assert ("hg" in flags) == on
    k = torch.randn(2, 2, 8, dtype=torch.bfloat16)
    cache.write(1, torch.tensor([3, 17]), k, -k)
    assert torch.count_nonzero(cache.kv[:, :, :, cache.pad_slot:]) == 0
    if kv_cache_dtype == "auto":
        assert torch.equal(cache.kv[1, 0, :, 17], k[1]) and torch.equal(cache.kv[1, 1, :, 3], -k[0])


def _resident(address: int) -> bool:
    """Whether the page holding `address` is in memory now (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    start = address - address % mmap.PAGESIZE
    vec = (ctypes.c_ubyte * 1)()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(mmap.PAGESIZE), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return bool(vec[0] & 1)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_the_kv_cache_commits_the_first_block_of_every_stretch_up_front(kv_cache_dtype):
    """Block 0 of each (layer, k|v, head) stretch is in memory before any write (the first request's
    blocks would otherwise fault in a fresh 2 MiB page per stretch, all at once); the rest is not."""
    from zili.engine.paged_attention import PagedKVCache

    cache = PagedKVCache(2, 8192, 16, 2, 64, torch.bfloat16, "cpu", kv_cache_dtype)  # 8 or 16 MiB of k / v each
    for tensor in [cache.kv] + ([cache.scales] if cache.scales is not None else []):
        stretch_bytes = tensor[0, 0, 0].numel() * tensor.element_size()
        for layer in range(2):
            for which in range(2):
                for head in range(2):
                    start = tensor[layer, which, head].data_ptr()
                    assert _resident(start) and _resident(start + 16 * tensor.stride(3) * tensor.element_size() - 1)
                    if stretch_bytes >= 4 * HUGE_PAGE:  # halfway: past block 0's pages, before the next stretch's
                        assert not _resident(start + stretch_bytes // 2)
    assert cache.kv[0, 0, 0].numel() * cache.kv.element_size() >= 4 * HUGE_PAGE

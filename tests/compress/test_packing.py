"""int32 packing: hand-computed words, round trips, and bit-for-bit equality with compressed-tensors."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from zili.compress.packing import awq_deinterleave, awq_interleave, pack_int32, unpack_int32
from zili.errors import CheckpointFormatError


def words(packed):
    """int32 words as unsigned 32-bit numbers, to compare with hex literals."""
    return (packed.long() & 0xFFFFFFFF).tolist()


def test_hand_computed_words():
    nibbles = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert words(pack_int32(nibbles, 4)) == [[0x87654321]]
    assert words(pack_int32(nibbles.t(), 4, dim=0)) == [[0x87654321]]
    assert words(pack_int32(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), 8)) == [[0x04030201]]
    assert pack_int32(torch.full((1, 8), 15, dtype=torch.uint8), 4).tolist() == [[-1]]          # 0xFFFFFFFF
    assert pack_int32(torch.tensor([[0, 0, 0, 0, 0, 0, 0, 8]], dtype=torch.uint8), 4).tolist() == [[-2**31]]
    assert unpack_int32(torch.tensor([[-1]], dtype=torch.int32), 4, 8).tolist() == [[15] * 8]
    # a padded tail: 9 nibbles need 2 words, the 9th value alone in the low bits of the second
    assert pack_int32(torch.tensor([[0] * 8 + [5]], dtype=torch.uint8), 4).tolist() == [[0, 5]]


def test_awq_order_hand_vector():
    columns = torch.arange(8, dtype=torch.uint8)[None]          # column j holds code j
    word = pack_int32(awq_interleave(columns), 4)
    # AutoAWQ: slot i holds column [0, 2, 4, 6, 1, 3, 5, 7][i]
    assert words(word) == [[0x75316420]]
    assert torch.equal(awq_deinterleave(awq_interleave(columns)), columns)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("shape", [(16, 64), (24, 40), (7, 13)])
def test_matches_compressed_tensors_bit_for_bit(bits, dim, shape):
    codes = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(3)).to(torch.uint8)
    signed = (codes.int() - (1 << (bits - 1))).to(torch.int8)   # compressed-tensors takes signed codes
    ours = pack_int32(codes, bits, dim)
    theirs = pack_to_int32(signed, bits, packed_dim=dim)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_int32(ours, bits, shape[dim], dim), codes)
    unpacked = unpack_from_int32(ours, bits, torch.Size(shape), packed_dim=dim)
    assert torch.equal(unpacked.int() + (1 << (bits - 1)), codes.int())


def test_unpack_rejects_wrong_sizes_and_dtypes():
    with pytest.raises(CheckpointFormatError, match="expected 2"):
        unpack_int32(torch.zeros(3, 4, dtype=torch.int32), 4, 16)
    with pytest.raises(CheckpointFormatError, match="must be a 2-D int32"):
        unpack_int32(torch.zeros(3, 2, dtype=torch.int64), 4, 16)

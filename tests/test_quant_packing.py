"""Bit packing: exact round trips for every width, the documented layout, clear errors."""

import pytest
import torch

from deltacomp.quant import packing


@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
@pytest.mark.parametrize("length", [1, 31, 32, 33, 100, 257])
def test_round_trip_is_exact(bits, length):
    g = torch.Generator().manual_seed(bits * 1000 + length)
    codes = torch.randint(0, 1 << bits, (5, length), generator=g)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, packing.packed_words(length, bits))
    assert torch.equal(packing.unpack(packed, bits, length).long(), codes)


@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
def test_extreme_codes_round_trip(bits):
    top = (1 << bits) - 1
    codes = torch.tensor([[top] * 32 + [0] * 32, [0, top] * 32])
    assert torch.equal(packing.unpack(packing.pack(codes, bits), bits, 64).long(), codes)


def test_layout_matches_the_documented_bit_stream():
    # 3 bits: code j occupies stream bits [3j, 3j+3); code 10 straddles words 0 and 1.
    codes = torch.zeros(1, 32, dtype=torch.long)
    codes[0, 10] = 0b111
    words = packing.pack(codes, 3)[0].long() & 0xFFFFFFFF
    assert words.tolist() == [0b11 << 30, 0b1, 0]
    # 2 bits: code j sits at bits [2j, 2j+2) of word 0 for j < 16, least significant first.
    codes = torch.arange(32).remainder(4).view(1, 32)
    words = packing.pack(codes, 2)[0].long() & 0xFFFFFFFF
    expected = sum(int(c) << (2 * j) for j, c in enumerate(codes[0, :16]))
    assert int(words[0]) == expected


def test_bytes_per_row_are_bits_times_padded_length():
    assert packing.packed_words(4096, 2) * 32 == 2 * 4096
    assert packing.packed_words(33, 3) == 6  # two 32-code blocks of 3 words


def test_out_of_range_codes_and_widths_are_refused():
    with pytest.raises(ValueError, match="out of range for 2 bits"):
        packing.pack(torch.tensor([[4]]), 2)
    with pytest.raises(ValueError, match="supported widths"):
        packing.pack(torch.tensor([[1]]), 5)
    with pytest.raises(ValueError, match="need"):
        packing.unpack(torch.zeros(1, 3, dtype=torch.int32), 2, 64)

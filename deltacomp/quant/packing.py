"""Bit packing of integer codes into int32 words: the one definition of the layout.

Layout (read by the CUDA kernel in ``cuda/``, which cites this docstring):

* A quantized factor is a matrix of codes of shape (rows, length) with values in [0, 2**bits). Each row
  is one singular vector (a row of ``U^T`` or of ``V^T``), so a row is contiguous in memory.
* ``length`` is zero-padded to a multiple of 32. Each block of 32 codes of a row takes exactly ``bits``
  consecutive int32 words, so a packed row has ``ceil(length / 32) * bits`` words.
* Within a block, code ``j`` (0..31) occupies bits ``[bits*j, bits*j + bits)`` of the little-endian
  bit stream formed by the block's words: word ``w`` holds stream bits ``[32*w, 32*w + 32)``, its least
  significant bit first. For 1, 2, 4 and 8 bits no code crosses a word (32, 16, 8 and 4 codes per word);
  for 3 bits codes 10 and 21 straddle words 0/1 and 1/2 (as in exllamav2's 32-codes-in-3-words scheme).
* Words are stored as int32 (two's complement of the unsigned 32-bit pattern).

Supported widths: 1, 2, 3, 4, 8.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 8)
BLOCK = 32


def padded_length(length: int) -> int:
    """Codes per row after padding to a whole number of 32-code blocks."""
    return -(-length // BLOCK) * BLOCK


def packed_words(length: int, bits: int) -> int:
    """int32 words per packed row of ``length`` codes."""
    return padded_length(length) // BLOCK * bits


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported widths are {SUPPORTED_BITS}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, length) integer codes in [0, 2**bits) -> (rows, packed_words(length, bits)) int32."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack expects a 2-D (rows, length) tensor, got shape {tuple(codes.shape)}")
    rows, length = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(c.min())}, {int(c.max())}]")
    c = torch.nn.functional.pad(c, (0, padded_length(length) - length))
    blocks = c.view(rows, -1, BLOCK)  # (rows, nblocks, 32)
    words = torch.zeros(rows, blocks.shape[1], bits, dtype=torch.int64, device=codes.device)
    for j in range(BLOCK):
        pos = bits * j
        w, s = divmod(pos, 32)
        v = blocks[:, :, j]
        words[:, :, w] |= (v << s) & 0xFFFFFFFF
        if s + bits > 32:
            words[:, :, w + 1] |= v >> (32 - s)
    words = words.view(rows, -1)
    return (words - ((words >> 31) << 32)).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (rows, words) int32 -> (rows, length) uint8 codes."""
    _check_bits(bits)
    rows = packed.shape[0]
    if packed.shape[1] != packed_words(length, bits):
        raise ValueError(
            f"packed rows have {packed.shape[1]} words; {length} codes at {bits} bits need "
            f"{packed_words(length, bits)}"
        )
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = words.view(rows, -1, bits)  # (rows, nblocks, bits)
    mask = (1 << bits) - 1
    out = torch.empty(rows, words.shape[1], BLOCK, dtype=torch.int64, device=packed.device)
    for j in range(BLOCK):
        pos = bits * j
        w, s = divmod(pos, 32)
        v = words[:, :, w] >> s
        if s + bits > 32:
            v = v | (words[:, :, w + 1] << (32 - s))
        out[:, :, j] = v & mask
    return out.view(rows, -1)[:, :length].to(torch.uint8)

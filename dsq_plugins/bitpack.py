"""Packing of small unsigned integers into bytes, so that a b-bit value costs b bits on the wire.

Bit order is big-endian within each byte (numpy's default): element 0 is the most significant bit of byte 0.
"""
import numpy as np
import torch

__all__ = ["packed_nbytes", "pack_bits", "unpack_bits", "pack_uint", "unpack_uint"]

# Row v holds the 8 bits of the byte v, most significant first: the decoding table of `unpack_bits`.
_BYTE_BITS = torch.from_numpy(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1))

# An integer dtype of each element size, to move any dtype's bit patterns through numpy (which has no bfloat16).
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def packed_nbytes(count: int, bits: int = 1) -> int:
    """Bytes that `count` values of `bits` bits occupy once packed."""
    return (count * bits + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor of n elements -> uint8 tensor of ceil(n / 8) bytes (zero padding bits at the end)."""
    flat = mask.reshape(-1)
    if flat.dtype != torch.bool:
        flat = flat != 0
    return torch.from_numpy(np.packbits(flat.contiguous().numpy()))


def unpack_bits(packed: torch.Tensor, count: int, table: torch.Tensor = None) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` bits as uint8 0/1, or, with `table` (2 values, dtype D),
    as `table[bit]` of dtype D, decoded eight elements at a time by one table look-up per byte."""
    packed = packed.reshape(-1)
    lut = _BYTE_BITS if table is None else table[_BYTE_BITS.long()]
    if packed.device.type != "cpu" or lut.device.type != "cpu" or lut.element_size() not in _SAME_SIZE_INT:
        out = torch.empty((packed.numel(), 8), dtype=lut.dtype, device=lut.device)
        torch.index_select(lut, 0, packed.long(), out=out)
        return out.view(-1)[:count]
    # The look-up is a plain copy of 8-element rows, done by numpy on the bit patterns (an integer view of the
    # table, so any dtype works, bfloat16 included): numpy's `take` is several times faster than
    # `index_select` here, and numpy allocates the large output with transparent huge pages (far fewer page
    # faults than a fresh torch allocation of the same size).
    int_dtype = _SAME_SIZE_INT[lut.element_size()]
    lut_np = lut.contiguous().view(int_dtype).numpy()
    out = np.take(lut_np, packed.contiguous().numpy(), axis=0)
    return torch.from_numpy(out).view(lut.dtype).view(-1)[:count]


# Groups of 8 values per block in `pack_uint` / `unpack_uint` (bounds the temporaries; they stay in cache).
_GROUPS_PER_BLOCK = 1 << 15


def pack_uint(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 values, each < 2**bits (1 <= bits <= 8), -> uint8 tensor of ceil(n * bits / 8) bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    values = values.reshape(-1).to(torch.uint8)
    if bits == 8:
        return values.clone()
    # Eight values of `bits` bits are exactly `bits` bytes: each group of eight is assembled into one big-endian
    # integer (value 0 in the most significant bits), whose bytes are then written out most significant first.
    v = values.cpu().contiguous().numpy()
    n = v.size
    groups = -(-n // 8)
    out = np.empty(groups * bits, dtype=np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for g0 in range(0, groups, _GROUPS_PER_BLOCK):
        g1 = min(groups, g0 + _GROUPS_PER_BLOCK)
        block = v[g0 * 8:g1 * 8]
        if block.size < (g1 - g0) * 8:                      # the last group: zero padding, as np.packbits does
            block = np.concatenate([block, np.zeros((g1 - g0) * 8 - block.size, dtype=np.uint8)])
        block = block.reshape(-1, 8)
        acc = np.zeros(g1 - g0, dtype=np.uint64)
        for i in range(8):
            acc |= (block[:, i].astype(np.uint64) & mask) << np.uint64(bits * (7 - i))
        dest = out[g0 * bits:g1 * bits].reshape(-1, bits)
        for j in range(bits):
            dest[:, j] = acc >> np.uint64(8 * (bits - 1 - j))     # the assignment keeps the low byte
    return torch.from_numpy(out[:packed_nbytes(n, bits)])


def unpack_uint(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of `pack_uint`: `count` uint8 values."""
    if bits == 8:
        return packed.reshape(-1)[:count].clone()
    p = packed.reshape(-1).cpu().contiguous().numpy()
    if p.size < packed_nbytes(count, bits):
        raise ValueError(f"{p.size} packed bytes hold fewer than {count} values of {bits} bits")
    groups = -(-count // 8)
    out = np.empty(groups * 8, dtype=np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for g0 in range(0, groups, _GROUPS_PER_BLOCK):
        g1 = min(groups, g0 + _GROUPS_PER_BLOCK)
        block = p[g0 * bits:g1 * bits]
        if block.size < (g1 - g0) * bits:
            block = np.concatenate([block, np.zeros((g1 - g0) * bits - block.size, dtype=np.uint8)])
        block = block.reshape(-1, bits)
        acc = np.zeros(g1 - g0, dtype=np.uint64)
        for j in range(bits):
            acc = (acc << np.uint64(8)) | block[:, j]
        dest = out[g0 * 8:g1 * 8].reshape(-1, 8)
        for i in range(8):
            dest[:, i] = (acc >> np.uint64(bits * (7 - i))) & mask
    return torch.from_numpy(out[:count])

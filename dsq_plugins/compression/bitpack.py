"""Packing of small unsigned integers into bytes, so that a b-bit value costs b bits on the wire.

Bit order is big-endian within each byte (numpy's): element 0 is the most significant bit of byte 0, and a group
of eight b-bit values fills exactly b bytes, value 0 in the most significant bits. Every function is written in
torch ops that run on any device; numpy does the same on CPU tensors while `fastpath` is on. A (rows, n) batch with
``n % 8 == 0`` packs row by row exactly as its flattening does (rows end on byte boundaries), so the batched
callers reshape and call these.
"""
import numpy as np
import torch

from . import fastpath

__all__ = ["packed_nbytes", "pack_bits", "pack_negative", "unpack_bits", "unpack_signs", "pack_uint", "unpack_uint"]

# Row v holds the 8 bits of the byte v, most significant first.
_BYTE_BITS = torch.from_numpy(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1))
_TABLES = {}        # (what, dtype, device) -> a decoding table, built once


def _table(what: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (what, dtype, device)
    t = _TABLES.get(key)
    if t is None:
        base = _BYTE_BITS if what == "bits" else 1 - 2 * _BYTE_BITS.to(torch.int8)      # "signs": bit 1 -> -1
        t = _TABLES[key] = base.to(dtype=dtype, device=device)
    return t


def packed_nbytes(count: int, bits: int = 1) -> int:
    """Bytes that `count` values of `bits` bits occupy once packed."""
    return (count * bits + 7) // 8


def _padded(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -flat.numel() % multiple
    return flat if not pad else torch.cat([flat, flat.new_zeros(pad)])


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool (or 0/1) tensor of n elements -> uint8 tensor of ceil(n / 8) bytes (zero padding bits at the end),
    on the mask's device."""
    flat = mask.reshape(-1)
    if flat.dtype != torch.bool:
        flat = flat != 0
    if fastpath.on_cpu(flat):
        return torch.from_numpy(np.packbits(flat.contiguous().numpy()))
    groups = _padded(flat.to(torch.uint8), 8).view(-1, 8)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=flat.device)
    return (groups << shifts).sum(1, dtype=torch.uint8)


def pack_negative(x: torch.Tensor) -> torch.Tensor:
    """``pack_bits(x < 0)`` of a (rows, n) float tensor with ``n % 8 == 0``, as (rows, n / 8) uint8 (so -0.0 and NaN
    give 0 bits). On the CPU numpy's comparison is several times faster than torch's (which writes a bool tensor
    through a slow path)."""
    rows = x.shape[0]
    if fastpath.on_cpu(x) and x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
        return torch.from_numpy(np.packbits(np.less(x.contiguous().numpy(), 0), axis=-1)).view(rows, -1)
    return pack_bits(x < 0).view(rows, -1)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` bits as uint8 0/1."""
    packed = packed.reshape(-1)
    if fastpath.on_cpu(packed):
        return torch.from_numpy(np.unpackbits(packed.contiguous().numpy(), count=count))
    return _table("bits", torch.uint8, packed.device)[packed.long()].view(-1)[:count]


def unpack_signs(packed: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    """The first `count` bits as +1 (bit 0) or -1 (bit 1) of `dtype`, decoded eight at a time by one table look-up
    per byte."""
    packed = packed.reshape(-1)
    lut = _table("signs", dtype, packed.device)
    if fastpath.on_cpu(packed) and lut.element_size() in _SAME_SIZE_INT:
        # numpy's `take` of 8-element rows is several times faster than `index_select` here; it moves the
        # table's bit patterns, so any dtype works (bfloat16 included).
        lut_np = lut.view(_SAME_SIZE_INT[lut.element_size()]).numpy()
        out = np.take(lut_np, packed.contiguous().numpy(), axis=0)
        return torch.from_numpy(out).view(dtype).view(-1)[:count]
    return lut[packed.long()].view(-1)[:count]


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack_uint(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Values below 2**bits (1 <= bits <= 8), any integer dtype -> uint8 tensor of ceil(n * bits / 8) bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    values = values.reshape(-1).to(torch.uint8)
    n = values.numel()
    if bits == 8:
        return values.clone()
    if fastpath.on_cpu(values):
        return _pack_uint_numpy(values.contiguous().numpy(), bits)
    # Eight values make one big-endian integer of `bits * 8` bits (value 0 in the most significant bits), whose
    # `bits` bytes are then written out most significant first.
    groups = _padded(values, 8).view(-1, 8).long()
    dev = values.device
    acc = (groups << torch.arange(7 * bits, -1, -bits, device=dev)).sum(1, keepdim=True)
    out = (acc >> torch.arange(8 * (bits - 1), -1, -8, device=dev)).bitwise_and_(255).to(torch.uint8)
    return out.view(-1)[:packed_nbytes(n, bits)]


def unpack_uint(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of `pack_uint`: `count` uint8 values."""
    packed = packed.reshape(-1)
    if packed.numel() < packed_nbytes(count, bits):
        raise ValueError(f"{packed.numel()} packed bytes hold fewer than {count} values of {bits} bits")
    if bits == 8:
        return packed[:count].clone()
    if fastpath.on_cpu(packed):
        return _unpack_uint_numpy(packed.contiguous().numpy(), count, bits)
    groups = -(-count // 8)
    p = _padded(packed[:packed_nbytes(count, bits)], bits)[:groups * bits].view(groups, bits).long()
    dev = packed.device
    acc = (p << torch.arange(8 * (bits - 1), -1, -8, device=dev)).sum(1, keepdim=True)
    out = (acc >> torch.arange(7 * bits, -1, -bits, device=dev)).bitwise_and_((1 << bits) - 1).to(torch.uint8)
    return out.view(-1)[:count]


# Groups of 8 values per piece in the numpy paths (bounds the temporaries; they stay in cache).
_GROUPS_PER_PIECE = 1 << 15


def _pack_uint_numpy(v: np.ndarray, bits: int) -> torch.Tensor:
    n = v.size
    groups = -(-n // 8)
    out = np.empty(groups * bits, dtype=np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for g0 in range(0, groups, _GROUPS_PER_PIECE):
        g1 = min(groups, g0 + _GROUPS_PER_PIECE)
        piece = v[g0 * 8:g1 * 8]
        if piece.size < (g1 - g0) * 8:                      # the last group: zero padding, as np.packbits does
            piece = np.concatenate([piece, np.zeros((g1 - g0) * 8 - piece.size, dtype=np.uint8)])
        piece = piece.reshape(-1, 8)
        acc = np.zeros(g1 - g0, dtype=np.uint64)
        for i in range(8):
            acc |= (piece[:, i].astype(np.uint64) & mask) << np.uint64(bits * (7 - i))
        dest = out[g0 * bits:g1 * bits].reshape(-1, bits)
        for j in range(bits):
            dest[:, j] = acc >> np.uint64(8 * (bits - 1 - j))     # the assignment keeps the low byte
    return torch.from_numpy(out[:packed_nbytes(n, bits)])


def _unpack_uint_numpy(p: np.ndarray, count: int, bits: int) -> torch.Tensor:
    groups = -(-count // 8)
    out = np.empty(groups * 8, dtype=np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for g0 in range(0, groups, _GROUPS_PER_PIECE):
        g1 = min(groups, g0 + _GROUPS_PER_PIECE)
        piece = p[g0 * bits:g1 * bits]
        if piece.size < (g1 - g0) * bits:
            piece = np.concatenate([piece, np.zeros((g1 - g0) * bits - piece.size, dtype=np.uint8)])
        piece = piece.reshape(-1, bits)
        acc = np.zeros(g1 - g0, dtype=np.uint64)
        for j in range(bits):
            acc = (acc << np.uint64(8)) | piece[:, j]
        dest = out[g0 * 8:g1 * 8].reshape(-1, 8)
        for i in range(8):
            dest[:, i] = (acc >> np.uint64(bits * (7 - i))) & mask
    return torch.from_numpy(out[:count])

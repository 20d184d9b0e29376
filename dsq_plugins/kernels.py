"""Fused CPU kernels (numba) of the parameter server's hot passes with the ``sign`` compressor.

Each is a specialisation of what `BlockCodec.decode_add`, `BlockCodec.encode_delta` and `BlockCodec.apply_delta`
do in torch ops on any device; they run only for contiguous float32 CPU tensors while `fastpath` is on. Rows are
blocks of ``B`` elements, the last one possibly short (a frame's tail block); ``bits`` holds ``B / 8`` bytes per
full block and ``ceil(n / 8)`` for a short one, element 0 in the most significant bit, a set bit meaning negative
(`bitpack.pack_negative`), padding bits 0; a short row's scale is its mean over its ``n`` elements.

- `sign_apply`: ``acc += alpha * scale[r] * (+-1)``: one pass over ``acc`` (the server applying a push).
- `sign_delta`: ``d = x - x_hat``, ``scale[r] = mean |d|`` over the block, the sign bits of ``d``, and
  ``x_hat += scale[r] * sign(d)`` (the downlink of a worker's copy, DESIGN.md section 1, "Asynchronous variant").
- `sign_apply_delta`: both, block by block, while a block is in cache (a push answered by its pull).

Per block, the bits are unpacked with one table look-up per byte (eight flags as one 64-bit word) and packed with
one multiplication per byte (eight 0/1 flag bytes times 0x8040201008040201 gather their bits in the top byte), so
that the per-element loops are branch-free and vectorise. Only the block's L1 sum may be reordered (fastmath);
every value added is exactly ``+-scale``, added with one rounding, as the torch path does. The kernels release the
GIL, so that the server's shard threads run them side by side. numba compiles them on first use (cached on disk
next to this file).
"""
import sys

import numpy as np

__all__ = ["available", "sign_apply", "sign_delta", "sign_apply_delta"]

try:
    import numba
except ImportError:        # pragma: no cover - numba is a pinned dependency; the torch path still works
    numba = None

# Row v: the eight bits of byte v, most significant first, as eight 0/1 bytes read as one little-endian word.
_FLAGS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).copy().view(np.uint64).reshape(-1)
_GATHER = np.uint64(0x8040201008040201)


def available() -> bool:
    return numba is not None and sys.byteorder == "little"


if numba is not None:
    _FAST = {"reassoc", "nsz"}

    @numba.njit(nogil=True, cache=True, inline="always")
    def _unpack(bits, start, nb, words):                   # pragma: no cover - compiled
        for j in range(nb):
            words[j] = _FLAGS[bits[start + j]]

    @numba.njit(nogil=True, cache=True, inline="always")
    def _pack(words, nb, bits, start):                     # pragma: no cover - compiled
        for j in range(nb):
            bits[start + j] = np.uint8((words[j] * _GATHER) >> np.uint64(56))

    @numba.njit(nogil=True, cache=True, inline="always")
    def _apply_row(acc, base, n, s, flags):                # pragma: no cover - compiled
        for i in range(n):
            acc[base + i] += -s if flags[i] else s

    @numba.njit(nogil=True, cache=True, inline="always")
    def _diff_l1(x, xh, base, n, tmp):                     # pragma: no cover - compiled
        l1 = np.float32(0.0)
        for i in range(n):
            d = x[base + i] - xh[base + i]
            tmp[i] = d
            l1 += abs(d)
        return l1

    @numba.njit(nogil=True, cache=True, inline="always")
    def _move_copy(xh, base, n, t, tmp, flags, padded):    # pragma: no cover - compiled
        for i in range(n):
            neg = tmp[i] < 0
            xh[base + i] += -t if neg else t
            flags[i] = neg
        for i in range(n, padded):                         # a short row's padding packs as 0 bits
            flags[i] = 0

    # The helpers are inlined (numba IR), so that the callers' flags apply: reordering can only change the L1 sum.
    # Row r holds elements [r * B, (r + 1) * B) and its bits start at byte r * B / 8. The full rows loop over
    # ``range(scale.shape[0])`` (the callers pass the full rows' scales): so written, LLVM vectorises the row loops
    # (a bound computed from numel measured 8x slower). A short last row (the frame's tail block, whose fields
    # follow the full blocks' in a sign frame) is one call of its own.
    @numba.njit(nogil=True, cache=True, fastmath=_FAST)
    def _sign_apply(acc, scale, bits, alpha, B, words):                 # pragma: no cover - compiled
        flags = words.view(np.uint8)
        for r in range(scale.shape[0]):
            _unpack(bits, r * (B // 8), B // 8, words)
            _apply_row(acc, r * B, B, np.float32(alpha) * scale[r], flags)

    @numba.njit(nogil=True, cache=True, fastmath=_FAST)
    def _sign_apply_short(acc, scale, bits, alpha, B, r, n, words):     # pragma: no cover - compiled
        _unpack(bits, r * (B // 8), (n + 7) // 8, words)
        _apply_row(acc, r * B, n, np.float32(alpha) * scale[r], words.view(np.uint8))

    @numba.njit(nogil=True, cache=True, fastmath=_FAST)
    def _sign_delta(x, xh, scale, bits, B, tmp, words):                 # pragma: no cover - compiled
        flags = words.view(np.uint8)
        for r in range(scale.shape[0]):
            t = np.float32(_diff_l1(x, xh, r * B, B, tmp) / np.float32(B))
            scale[r] = t
            _move_copy(xh, r * B, B, t, tmp, flags, B)
            _pack(words, B // 8, bits, r * (B // 8))

    @numba.njit(nogil=True, cache=True, fastmath=_FAST)
    def _sign_delta_short(x, xh, scale, bits, B, r, n, tmp, words):     # pragma: no cover - compiled
        nb = (n + 7) // 8
        t = np.float32(_diff_l1(x, xh, r * B, n, tmp) / np.float32(n))
        scale[r] = t
        _move_copy(xh, r * B, n, t, tmp, words.view(np.uint8), 8 * nb)
        _pack(words, nb, bits, r * (B // 8))

    @numba.njit(nogil=True, cache=True, fastmath=_FAST)
    def _sign_apply_delta(x, scale, bits, alpha, xh, dscale, dbits, B, tmp, words):   # pragma: no cover
        flags = words.view(np.uint8)
        for r in range(scale.shape[0]):
            _unpack(bits, r * (B // 8), B // 8, words)
            _apply_row(x, r * B, B, np.float32(alpha) * scale[r], flags)
            t = np.float32(_diff_l1(x, xh, r * B, B, tmp) / np.float32(B))
            dscale[r] = t
            _move_copy(xh, r * B, B, t, tmp, flags, B)
            _pack(words, B // 8, dbits, r * (B // 8))


def _buffers(block: int):
    return np.empty(block, np.float32), np.zeros(block // 8, np.uint64)


def sign_apply(acc: np.ndarray, scale: np.ndarray, bits: np.ndarray, alpha: float, block: int) -> None:
    """``acc += alpha * decode(scale, bits)`` in place: one row per scale (``len(acc)`` elements in all)."""
    full, n = divmod(acc.shape[0], block)
    words = _buffers(block)[1]
    _sign_apply(acc, scale[:full], bits, float(alpha), block, words)
    if n:
        _sign_apply_short(acc, scale, bits, float(alpha), block, full, n, words)


def sign_delta(x: np.ndarray, x_hat: np.ndarray, scale: np.ndarray, bits: np.ndarray, block: int) -> None:
    """Encode ``x - x_hat`` into `scale` (one per row) and `bits`, and add what the receiver decodes to `x_hat`
    in place."""
    full, n = divmod(x.shape[0], block)
    tmp, words = _buffers(block)
    _sign_delta(x, x_hat, scale[:full], bits, block, tmp, words)
    if n:
        _sign_delta_short(x, x_hat, scale, bits, block, full, n, tmp, words)


def sign_apply_delta(x: np.ndarray, scale: np.ndarray, bits: np.ndarray, alpha: float, x_hat: np.ndarray,
                     dscale: np.ndarray, dbits: np.ndarray, block: int) -> None:
    """`sign_apply` to `x`, then `sign_delta` of `x` against `x_hat` into `dscale` and `dbits`, row by row."""
    full, n = divmod(x.shape[0], block)
    tmp, words = _buffers(block)
    _sign_apply_delta(x, scale[:full], bits, float(alpha), x_hat, dscale[:full], dbits, block, tmp, words)
    if n:
        _sign_apply_short(x, scale, bits, float(alpha), block, full, n, words)
        _sign_delta_short(x, x_hat, dscale, dbits, block, full, n, tmp, words)

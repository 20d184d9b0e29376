"""Fused CPU kernels (numba) of the hot passes of the parameter server and its workers with ``sign``, and of the
min-max quantisers (``int8``, ``int4``, ``int2``: quantise and pack in one pass, unpack and dequantise in one).

Each is a specialisation of what `BlockCodec.decode_add`, `BlockCodec.encode_delta`, `BlockCodec.apply_delta` and
`BlockCodec.encode_residual` do in torch ops on any device; they run only for contiguous float32 CPU tensors while
`fastpath` is on. Rows are blocks of ``B`` elements, the last one possibly short (a frame's tail block); ``bits``
holds ``B / 8`` bytes per full block and ``ceil(n / 8)`` for a short one, element 0 in the most significant bit, a
set bit meaning negative (`bitpack.pack_negative`), padding bits 0; a short row's scale is its mean over its ``n``
elements.

- `sign_apply`: ``acc += alpha * scale[r] * (+-1)``: one pass over ``acc`` (the server applying a push).
- `sign_delta`: ``d = x - x_hat``, ``scale[r] = mean |d|`` over the block, the sign bits of ``d``, and
  ``x_hat += scale[r] * sign(d)`` (the downlink of a worker's copy, docs/ARCHITECTURE.md section 1, "Asynchronous variant").
- `sign_apply_delta`: both, block by block, while a block is in cache (a push answered by its pull).
- `sign_residual`: ``c = x + e``, its scales and sign bits, and ``e' = c - scale[r] * sign(c)`` (a worker's error
  feedback: compensate, compress, keep what was left behind).
- `divide_finite`: ``x /= W`` and whether any result is NaN or infinite, in one pass (a dense bucket's all-reduced
  sum into its mean, and the skip check on it).

Per block, the bits are unpacked with one table look-up per byte (eight flags as one 64-bit word) and packed with
one multiplication per byte (eight 0/1 flag bytes times 0x8040201008040201 gather their bits in the top byte), so
that the per-element loops are branch-free and vectorise. Only the block's L1 sum may be reordered (fastmath);
every value added is exactly ``+-scale``, added with one rounding, as the torch path does. The kernels release the
GIL, so that the server's shard threads run them side by side. numba compiles them on first use (cached on disk
next to this file).
"""
import sys

import numpy as np

__all__ = ["available", "sign_apply", "sign_delta", "sign_apply_delta", "sign_residual", "int_quantize", "int_decode",
           "divide_finite"]

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
    def _diff_l1(x, xh, base, n, flags):                   # pragma: no cover - compiled
        l1 = np.float32(0.0)
        for i in range(n):
            d = x[base + i] - xh[base + i]
            flags[i] = d < 0
            l1 += abs(d)
        return l1

    @numba.njit(nogil=True, cache=True, inline="always")
    def _apply_diff_l1(x, xh, base, n, s, fin, fout):      # pragma: no cover - compiled
        l1 = np.float32(0.0)
        for i in range(n):
            v = x[base + i] + (-s if fin[i] else s)
            x[base + i] = v
            d = v - xh[base + i]
            fout[i] = d < 0
            l1 += abs(d)
        return l1

    @numba.njit(nogil=True, cache=True, inline="always")
    def _move(xh, base, n, t, flags, padded):              # pragma: no cover - compiled
        for i in range(n):
            xh[base + i] += -t if flags[i] else t
        for i in range(n, padded):                         # a short row's padding packs as 0 bits
            flags[i] = 0

    @numba.njit(nogil=True, cache=True, inline="always")
    def _sum_l1(x, e, base, n, flags):                     # pragma: no cover - compiled
        l1 = np.float32(0.0)
        for i in range(n):
            c = x[base + i] + e[base + i]
            flags[i] = c < 0
            l1 += abs(c)
        return l1

    @numba.njit(nogil=True, cache=True, inline="always")
    def _left(x, e, out, base, n, t, flags, padded):       # pragma: no cover - compiled
        for i in range(n):
            out[base + i] = (x[base + i] + e[base + i]) - (-t if flags[i] else t)
        for i in range(n, padded):
            flags[i] = 0

    # The helpers are inlined (numba IR), so that the callers' flags apply: reordering can only change the L1 sum.
    # Row r holds elements [r * B, (r + 1) * B) and its bits start at byte r * B / 8. The full rows loop over
    # ``range(scale.shape[0])`` (the callers pass the full rows' scales): so written, LLVM vectorises the row loops
    # (a bound computed from numel measured 8x slower). A short last row (the frame's tail block, whose fields
    # follow the full blocks' in a sign frame) is one call of its own. The sign of ``d`` is kept as a flag byte
    # while its L1 sum is taken, so that each row comes from memory once (its second read hits the cache).
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
    def _sign_delta(x, xh, scale, bits, B, words):                      # pragma: no cover - compiled
        flags = words.view(np.uint8)
        for r in range(scale.shape[0]):
            t = np.float32(_diff_l1(x, xh, r * B, B, flags) / np.float32(B))
            scale[r] = t
            _move(xh, r * B, B, t, flags, B)
            _pack(words, B // 8, bits, r * (B // 8))

    @numba.njit(nogil=True, cache=True, fastmath=_FAST)
    def _sign_delta_short(x, xh, scale, bits, B, r, n, words):          # pragma: no cover - compiled
        nb = (n + 7) // 8
        flags = words.view(np.uint8)
        t = np.float32(_diff_l1(x, xh, r * B, n, flags) / np.float32(n))
        scale[r] = t
        _move(xh, r * B, n, t, flags, 8 * nb)
        _pack(words, nb, bits, r * (B // 8))

    @numba.njit(nogil=True, cache=True, fastmath=_FAST)
    def _sign_apply_delta(x, scale, bits, alpha, xh, dscale, dbits, B, win, wout):   # pragma: no cover
        fin, fout = win.view(np.uint8), wout.view(np.uint8)
        for r in range(scale.shape[0]):
            _unpack(bits, r * (B // 8), B // 8, win)
            t = _apply_diff_l1(x, xh, r * B, B, np.float32(alpha) * scale[r], fin, fout)
            t = np.float32(t / np.float32(B))
            dscale[r] = t
            _move(xh, r * B, B, t, fout, B)
            _pack(wout, B // 8, dbits, r * (B // 8))

    @numba.njit(nogil=True, cache=True, fastmath=_FAST)
    def _sign_residual(x, e, out, scale, bits, B, words):               # pragma: no cover - compiled
        flags = words.view(np.uint8)
        for r in range(scale.shape[0]):
            t = np.float32(_sum_l1(x, e, r * B, B, flags) / np.float32(B))
            scale[r] = t
            _left(x, e, out, r * B, B, t, flags, B)
            _pack(words, B // 8, bits, r * (B // 8))

    @numba.njit(nogil=True, cache=True, fastmath=_FAST)
    def _sign_residual_short(x, e, out, scale, bits, B, r, n, words):   # pragma: no cover - compiled
        nb = (n + 7) // 8
        flags = words.view(np.uint8)
        t = np.float32(_sum_l1(x, e, r * B, n, flags) / np.float32(n))
        scale[r] = t
        _left(x, e, out, r * B, n, t, flags, 8 * nb)
        _pack(words, nb, bits, r * (B // 8))


def _words(block: int) -> np.ndarray:
    """Eight sign flags per word: one row's worth."""
    return np.zeros(block // 8, np.uint64)


def sign_apply(acc: np.ndarray, scale: np.ndarray, bits: np.ndarray, alpha: float, block: int) -> None:
    """``acc += alpha * decode(scale, bits)`` in place: one row per scale (``len(acc)`` elements in all)."""
    full, n = divmod(acc.shape[0], block)
    words = _words(block)
    _sign_apply(acc, scale[:full], bits, float(alpha), block, words)
    if n:
        _sign_apply_short(acc, scale, bits, float(alpha), block, full, n, words)


def sign_delta(x: np.ndarray, x_hat: np.ndarray, scale: np.ndarray, bits: np.ndarray, block: int) -> None:
    """Encode ``x - x_hat`` into `scale` (one per row) and `bits`, and add what the receiver decodes to `x_hat`
    in place."""
    full, n = divmod(x.shape[0], block)
    words = _words(block)
    _sign_delta(x, x_hat, scale[:full], bits, block, words)
    if n:
        _sign_delta_short(x, x_hat, scale, bits, block, full, n, words)


def sign_apply_delta(x: np.ndarray, scale: np.ndarray, bits: np.ndarray, alpha: float, x_hat: np.ndarray,
                     dscale: np.ndarray, dbits: np.ndarray, block: int) -> None:
    """`sign_apply` to `x`, then `sign_delta` of `x` against `x_hat` into `dscale` and `dbits`, row by row."""
    full, n = divmod(x.shape[0], block)
    win, wout = _words(block), _words(block)
    _sign_apply_delta(x, scale[:full], bits, float(alpha), x_hat, dscale[:full], dbits, block, win, wout)
    if n:
        _sign_apply_short(x, scale, bits, float(alpha), block, full, n, win)
        _sign_delta_short(x, x_hat, dscale, dbits, block, full, n, wout)


def sign_residual(x: np.ndarray, residual: np.ndarray, out: np.ndarray, scale: np.ndarray, bits: np.ndarray,
                  block: int) -> None:
    """Encode ``c = x + residual`` into `scale` and `bits`, and write ``c - decode`` (what the compressor left
    behind) to `out`, which may be `residual` itself."""
    full, n = divmod(x.shape[0], block)
    words = _words(block)
    _sign_residual(x, residual, out, scale[:full], bits, block, words)
    if n:
        _sign_residual_short(x, residual, out, scale, bits, block, full, n, words)


# -- min-max quantisers (`IntCompressor`: int8, int4, int2), whole chunks -----------------------------------------
if numba is not None:
    _MAGIC = np.float32(12582912.0)         # 1.5 * 2^23: (y + M) - M rounds 0 <= y < 2^22 half to even

    @numba.njit(nogil=True, cache=True, error_model="numpy")
    def _int_quantize(x, chunk, bits, mins, steps, q):               # pragma: no cover - compiled
        top = np.float32((1 << bits) - 1)
        zero = np.float32(0.0)
        per = 8 // bits
        levels = np.empty(chunk, dtype=np.uint8)
        for k in range(mins.shape[0]):
            base = k * chunk
            qbase = base // per
            lo = mins[k]
            step = steps[k]
            if not (abs(lo) < np.inf and abs(step) < np.inf):     # a NaN or an infinity: the step is skipped
                for j in range(chunk // per):
                    q[qbase + j] = 0
                continue
            safe = step if step > zero else np.float32(1.0)
            for i in range(chunk):                 # branch-free, so that it vectorises
                y = (x[base + i] - lo) / safe
                y = y if y > zero else zero
                y = y if y < top else top
                levels[i] = np.uint8(np.int32((y + _MAGIC) - _MAGIC))
            if bits == 8:
                for j in range(chunk):
                    q[qbase + j] = levels[j]
            elif bits == 4:
                for j in range(chunk // 2):
                    q[qbase + j] = (levels[2 * j] << 4) | levels[2 * j + 1]
            else:
                for j in range(chunk // 4):
                    q[qbase + j] = ((levels[4 * j] << 6) | (levels[4 * j + 1] << 4) | (levels[4 * j + 2] << 2)
                                    | levels[4 * j + 3])

    @numba.njit(nogil=True, cache=True, error_model="numpy")
    def _int_decode(q, chunk, bits, mins, steps, out):               # pragma: no cover - compiled
        per = 8 // bits
        levels = np.empty(chunk, dtype=np.uint8)
        for k in range(mins.shape[0]):
            base = k * chunk
            qbase = base // per
            if bits == 8:
                for j in range(chunk):
                    levels[j] = q[qbase + j]
            elif bits == 4:
                for j in range(chunk // 2):
                    b = q[qbase + j]
                    levels[2 * j] = b >> 4
                    levels[2 * j + 1] = b & 15
            else:
                for j in range(chunk // 4):
                    b = q[qbase + j]
                    levels[4 * j] = b >> 6
                    levels[4 * j + 1] = (b >> 4) & 3
                    levels[4 * j + 2] = (b >> 2) & 3
                    levels[4 * j + 3] = b & 3
            lo = mins[k]
            step = steps[k]
            for i in range(chunk):
                v = np.float32(levels[i]) * step
                out[base + i] = v + lo


def int_quantize(x: np.ndarray, chunk: int, bits: int, mins: np.ndarray, steps: np.ndarray, q: np.ndarray) -> None:
    """The levels of float32 `x` (whole chunks of `chunk` elements, ``chunk * bits`` a multiple of 8) given each
    chunk's minimum and step, packed ``8 / bits`` to a byte, the first in the most significant bits, into `q`:
    `IntCompressor.encode`'s arithmetic in float32 (round half to even, clamp to the levels), bit for bit. A chunk
    whose minimum or step is not finite gets zero levels (the engine skips that step)."""
    _int_quantize(x, chunk, bits, mins, steps, q)


def int_decode(q: np.ndarray, chunk: int, bits: int, mins: np.ndarray, steps: np.ndarray, out: np.ndarray) -> None:
    """Inverse of `int_quantize`: ``out = level * step + min`` (two roundings, as the torch path)."""
    _int_decode(q, chunk, bits, mins, steps, out)


if numba is not None:
    @numba.njit(nogil=True, cache=True)
    def _divide_finite(x, w):                          # pragma: no cover - compiled
        bad = False
        for i in range(x.shape[0]):
            v = x[i] / w
            x[i] = v
            bad |= not np.isfinite(v)
        return bad


def divide_finite(x: np.ndarray, divisor: int) -> bool:
    """``x /= divisor`` in place (1-D float32; one rounding per element, as torch's ``div_``); whether any result is
    NaN or infinite."""
    return bool(_divide_finite(x, np.float32(divisor)))

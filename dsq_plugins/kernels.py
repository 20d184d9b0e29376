"""Fused CPU kernels (numba) of the parameter server's two hot passes with the ``sign`` compressor.

Both are specialisations of what `BlockCodec.decode_add` and `BlockCodec.encode_delta` do in torch ops on any
device; they run only for contiguous float32 CPU tensors while `fastpath` is on, and only on the full blocks (the
tail block takes the torch path). Rows are blocks of ``B`` elements; ``bits`` holds ``B / 8`` bytes per block,
element 0 in the most significant bit, a set bit meaning negative (`bitpack.pack_negative`).

- `sign_apply`: ``acc += alpha * scale[r] * (+-1)``: one pass over ``acc`` (the server applying a push).
- `sign_delta`: ``d = x - x_hat``, ``scale[r] = mean |d|`` over the block, the sign bits of ``d``, and
  ``x_hat += scale[r] * sign(d)``: two passes over ``x`` and ``x_hat`` where the torch path makes five (the
  downlink of a worker's copy, DESIGN.md section 1, "Asynchronous variant").

Both release the GIL, so that the server's shard threads run them side by side. numba compiles them on first use
(cached on disk next to this file).
"""
import numpy as np

__all__ = ["available", "sign_apply", "sign_delta"]

try:
    import numba
except ImportError:        # pragma: no cover - numba is a pinned dependency; the torch path still works
    numba = None


def available() -> bool:
    return numba is not None


if numba is not None:
    # Branch-free inner loops over one block at a time, through a block-sized buffer, so that LLVM vectorises
    # them: 4-6x faster than a loop per bit. Only the block's L1 sum may be reordered (fastmath); every value added
    # is exactly +-scale, added with one rounding, as the torch path does.
    @numba.njit(nogil=True, cache=True)
    def _sign_apply(acc, scale, bits, alpha, B, tmp):     # pragma: no cover - compiled
        nb = B // 8
        for r in range(scale.shape[0]):
            s = np.float32(alpha * np.float64(scale[r]))
            s2 = np.float32(2.0) * s
            base = r * B
            for j in range(nb):
                byte = bits[r * nb + j]
                for k in range(8):
                    tmp[8 * j + k] = np.float32((byte >> (7 - k)) & 1)
            for i in range(B):
                acc[base + i] += s - s2 * tmp[i]

    @numba.njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})
    def _sign_delta(x, xh, scale, bits, B, tmp):          # pragma: no cover - compiled
        nb = B // 8
        for r in range(scale.shape[0]):
            base = r * B
            l1 = np.float32(0.0)
            for i in range(B):
                d = x[base + i] - xh[base + i]
                tmp[i] = d
                l1 += abs(d)
            s = np.float32(l1 / np.float32(B))
            scale[r] = s
            for i in range(B):
                xh[base + i] += -s if tmp[i] < 0 else s
            for j in range(nb):
                byte = 0
                for k in range(8):
                    byte |= np.int32(tmp[8 * j + k] < 0) << (7 - k)
                bits[r * nb + j] = byte


def sign_apply(acc: np.ndarray, scale: np.ndarray, bits: np.ndarray, alpha: float, block: int) -> None:
    """``acc[:R * block] += alpha * decode(scale, bits)`` in place (R = ``len(scale)`` full blocks)."""
    _sign_apply(acc, scale, bits, float(alpha), block, np.empty(block, np.float32))


def sign_delta(x: np.ndarray, x_hat: np.ndarray, scale: np.ndarray, bits: np.ndarray, block: int) -> None:
    """Encode ``x - x_hat`` (the first ``len(scale)`` full blocks) into `scale` and `bits`, and add what the
    receiver decodes to `x_hat` in place."""
    _sign_delta(x, x_hat, scale, bits, block, np.empty(block, np.float32))

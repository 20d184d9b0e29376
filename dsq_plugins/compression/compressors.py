"""The built-in compressors. Each has one job: a block of elements -> its wire fields (packed to their true size)
-> the block again.

A compressor works on *blocks* (docs/ARCHITECTURE.md section 3): `compress(t)` treats the tensor `t` as one block, and the
engine applies the same compressor to every block of every tensor at once through the batched pair
`encode` / `decode`, on a (rows, cap) batch of blocks, one block per row, each row zero beyond its length. Semantics,
per block of ``n`` elements (exact, so results can be checked against a reference):

- ``none``: identity. ``fp16``, ``bf16``: cast (fp16 saturates at +-65504; what saturation drops is error, and
  error feedback keeps it).
- ``sign``: ``s * sign(v)`` with ``sign(0) = +1`` and ``s = mean(|v|)``; 1 bit per element + one fp32 scale.
- ``topk:R``: the ``k = max(1, ceil(R * n))`` entries of largest magnitude, unscaled; values + indices in the
  smallest integer type that holds an index of the block (uint8 up to 256 elements, int16 up to 32768, else int32).
- ``grouptopk:R``: the ``max(1, ceil(R * g))`` of a block's g groups of 32 elements of largest energy, kept whole;
  values + group indices.
- ``randomk:R``: ``k`` entries chosen uniformly without replacement by the block's seed, scaled by ``n / k``
  (unbiased); values only (both ends derive the indices from the seed, which is context, like the shape).
- ``qsgd:S``: QSGD with ``S`` levels and stochastic rounding (unbiased); fp32 norm + packed signs + levels packed
  in ``ceil(log2(S + 1))`` bits.
- ``int8[:C]``, ``int4[:C]``, ``int2[:C]``: min-max quantization to 8, 4 or 2 bits per chunk of ``C`` elements
  (default 512; chunks never straddle blocks), round to nearest; per chunk a fp32 minimum and step, then the
  levels packed (one byte, half a byte, a quarter of a byte per element).
- ``S+Q`` (``topk:0.01+int4``, ``topk:0.01+sign``, ``randomk:0.05+int8``): the sparsifier ``S`` keeps ``k(n)``
  values of the block, which the quantiser ``Q`` compresses as one block of ``k(n)`` elements; on the wire the
  sparsifier's indices (topk) and the quantiser's fields.

Every compressor takes any floating dtype and returns the same dtype. Random numbers come from `rng`: a 32-bit
seed per block, the same on every device. All of it is torch ops that run on any device; the numpy paths in
`bitpack` are CPU-only specialisations (`fastpath`).

Batched contract (what a new compressor implements to run at full speed in the engine; the defaults here loop
over rows with `_compress` / `_decompress`, which is correct for any compressor, only slower):

- ``row_layout(n, dtype, cap)``: the fields of one block of ``n`` elements in a batch of capacity ``cap``:
  ``[(name, dtype, count)]``. Counts depend on ``n`` only, dtypes on ``cap`` at most, and a field of a short row is
  the *prefix* of that field at full capacity.
- ``encode(x, lengths, seeds)``: x (rows, cap), zero beyond each row's length; ``lengths`` (rows,) int64 or None
  (every row full); ``seeds`` (rows,) int64 32-bit seeds or None. Returns {name: (rows, count(cap))}, row r's first
  count(n_r) entries being its block's field.
- ``decode(fields, cap, dtype, lengths, seeds, out)``: fields as `encode` returns them, entries beyond a row's
  count zero -> (rows, cap) of `dtype` (into `out` if given). Entries beyond a row's length are unspecified.
"""
import math
from typing import Dict, List, Optional

import torch

from . import bitpack
from . import fastpath
from . import kernels
from . import rng
from .payload import Field, Payload

__all__ = ["Compressor", "NoneCompressor", "CastCompressor", "SignCompressor", "TopKCompressor",
           "GroupTopKCompressor", "RandomKCompressor", "QSGDCompressor", "IntCompressor", "Int8Compressor",
           "ComposedCompressor", "index_dtype", "acc_dtype"]

_INT64_MAX = torch.iinfo(torch.int64).max


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scales and sums are computed in: float64 for float64 blocks, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def index_dtype(cap: int) -> torch.dtype:
    """The smallest integer type that holds an index into a block of `cap` elements."""
    return torch.uint8 if cap <= 256 else torch.int16 if cap <= 32768 else torch.int32


def _valid(lengths: torch.Tensor, cap: int) -> torch.Tensor:
    """(rows, cap) bool: column < the row's length."""
    return torch.arange(cap, device=lengths.device) < lengths.reshape(-1, 1)


def _col(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device)


def _ratio_k(ratio: float, n):
    """``max(1, ceil(ratio * n))`` of an int, or elementwise of an int64 tensor (the same float64 arithmetic)."""
    if isinstance(n, int):
        return max(1, math.ceil(ratio * n))
    return torch.ceil(n.double() * ratio).clamp_(min=1).long()


class Compressor:
    """Base class. A third-party compressor sets `name` and implements `layout`, `_compress` and `_decompress` (one
    block at a time); the built-ins also implement the batched `encode` / `decode` (see the module docstring).

    Attributes:
        spec: the canonical spec string (``"topk:0.01"``) that `get_compressor` turns back into this compressor.
        uses_seed: whether compressing draws random numbers (from a per-block seed).
        seed_per_rank: whether distributed callers should give each rank its own seed (independent noise)
            rather than one seed all ranks agree on.
        lossless: whether decompressing always gives the input back: error feedback then has nothing to keep.
        cap_multiple: batches of this compressor have a capacity that is a multiple of it (bit packing: 8).
    """

    name = "base"
    lossless = False
    uses_seed = False
    seed_per_rank = False
    accepts_empty = False
    cap_multiple = 1

    def __init__(self, arg: Optional[str] = None):
        self.spec = self.name if arg is None else f"{self.name}:{arg}"

    # -- the wire layout ---------------------------------------------------------------------------------------
    def layout(self, numel: int, dtype: torch.dtype) -> List[Field]:
        """The wire fields of one block of `numel` elements of `dtype`: [(name, dtype, count), ...]."""
        raise NotImplementedError

    def row_layout(self, numel: int, dtype: torch.dtype, cap: int) -> List[Field]:
        """The fields of a block of `numel` elements in a batch of capacity `cap` (default: `layout`)."""
        return self.layout(numel, dtype)

    def capacity(self, numel: int) -> int:
        """The batch capacity a single block of `numel` elements is compressed in."""
        return -(-numel // self.cap_multiple) * self.cap_multiple

    def nbytes(self, numel: int, dtype: torch.dtype) -> int:
        """Bytes on the wire for a block of `numel` elements of `dtype`, known without compressing."""
        return sum(count * _itemsize(dt) for _, dt, count in self.layout(numel, dtype))

    # -- one block ---------------------------------------------------------------------------------------------
    def compress(self, tensor: torch.Tensor, seed: Optional[int] = None) -> Payload:
        """`tensor` as one block -> its `Payload`. `seed` (any int >= 0) seeds a random compressor; None draws one."""
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"{self.spec}: expected a floating-point tensor, got "
                            f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
        if tensor.numel() == 0 and not self.accepts_empty:
            raise ValueError(f"{self.spec}: cannot compress an empty tensor")
        if self.uses_seed:
            seed = rng.fold_seed(int(torch.randint(0, 2 ** 62, (1,)).item()) if seed is None else seed)
        else:
            seed = None
        flat = tensor.detach().reshape(-1)
        fields = self._compress(flat, seed)
        return Payload(self.spec, tensor.shape, tensor.dtype, fields, seed=seed)

    def decompress(self, payload: Payload) -> torch.Tensor:
        """The dense tensor (payload's shape and dtype)."""
        if payload.spec != self.spec:
            raise ValueError(f"payload was made by {payload.spec!r}, cannot be decompressed by {self.spec!r}")
        return self._decompress(payload, payload.numel, payload.dtype).view(payload.shape)

    def unpack(self, buffer: torch.Tensor, shape, dtype: torch.dtype, seed: Optional[int] = None) -> Payload:
        """Wire bytes (uint8 tensor) + context (shape, dtype, and the seed of a random compressor) -> `Payload`."""
        numel = math.prod(shape)
        return Payload.from_buffer(buffer, self.spec, shape, dtype, self.layout(numel, dtype), seed=seed)

    def _compress(self, flat: torch.Tensor, seed: Optional[int]) -> Dict[str, torch.Tensor]:
        """One block (1-D) -> its fields, 1-D, as `layout` says. Built-ins: `encode` of a one-row batch."""
        n = flat.numel()
        cap = self.capacity(n)
        x = flat.reshape(1, n)
        if cap != n:
            x = torch.cat([x, x.new_zeros(1, cap - n)], dim=1)
        lengths = None if cap == n else torch.tensor([n], device=flat.device)
        seeds = None if seed is None else torch.tensor([seed], dtype=torch.int64, device=flat.device)
        fields = self.encode(x, lengths, seeds)
        return {name: fields[name][0, :count] for name, _, count in self.row_layout(n, flat.dtype, cap)}

    def _decompress(self, payload: Payload, numel: int, dtype: torch.dtype) -> torch.Tensor:
        cap = self.capacity(numel)
        fields = {}
        for name, dt, count in self.row_layout(cap, dtype, cap):
            f = payload.fields[name].reshape(1, -1)
            if f.shape[1] != count:
                f = torch.cat([f, f.new_zeros(1, count - f.shape[1])], dim=1)
            fields[name] = f
        device = next(iter(payload.fields.values())).device if payload.fields else torch.device("cpu")
        lengths = None if cap == numel else torch.tensor([numel], device=device)
        seeds = None if payload.seed is None else torch.tensor([payload.seed], dtype=torch.int64, device=device)
        return self.decode(fields, cap, dtype, lengths, seeds)[0, :numel]

    # -- batches of blocks: defaults that loop over rows (third-party compressors) ----------------------------
    def encode(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None,
               seeds: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        rows, cap = x.shape
        ns = [cap] * rows if lengths is None else lengths.tolist()
        out = {name: torch.zeros(rows, count, dtype=dt, device=x.device)
               for name, dt, count in self.row_layout(cap, x.dtype, cap)}
        for r, n in enumerate(ns):
            seed = None if seeds is None else int(seeds[r])
            for name, f in type(self)._compress_block(self, x[r, :n], seed).items():
                out[name][r, :f.numel()] = f
        return out

    def decode(self, fields: Dict[str, torch.Tensor], cap: int, dtype: torch.dtype,
               lengths: Optional[torch.Tensor] = None, seeds: Optional[torch.Tensor] = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = next(iter(fields.values())).shape[0]
        device = next(iter(fields.values())).device
        ns = [cap] * rows if lengths is None else lengths.tolist()
        if out is None:
            out = torch.zeros(rows, cap, dtype=dtype, device=device)
        for r, n in enumerate(ns):
            layout = self.layout(n, dtype)
            p = Payload(self.spec, torch.Size([n]), dtype, {name: fields[name][r, :count] for name, _, count in layout},
                        seed=None if seeds is None else int(seeds[r]))
            out[r, :n] = self._decompress(p, n, dtype)
        return out

    def decode_add(self, fields: Dict[str, torch.Tensor], cap: int, dtype: torch.dtype, acc: torch.Tensor,
                   lengths: Optional[torch.Tensor] = None, seeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``acc += decode(fields)`` (the server's sum over ranks), as `decode` then an add unless a compressor
        does it in one pass."""
        return acc.add_(self.decode(fields, cap, dtype, lengths, seeds))

    def variance(self, numel: int) -> Optional[float]:
        """For an unbiased compressor, a bound on ``E|C(x) - x|^2 / |x|^2`` over blocks of `numel` elements (error
        feedback is a contraction only below 1); None for a biased (contractive) or unknown one."""
        return None

    def _compress_block(self, flat, seed):
        return self._compress(flat, seed)

    def nonfinite(self, fields: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """A 0-d bool tensor, True when the blocks `encode` produced `fields` from held a NaN or an infinity, where
        the fields tell (sign: the scales); None where they do not (the engine then sums the blocks)."""
        return None

    def __repr__(self):
        return f"<Compressor {self.spec}>"

    def __eq__(self, other):
        return isinstance(other, Compressor) and other.spec == self.spec

    def __hash__(self):
        return hash(self.spec)


class _Batched(Compressor):
    """A built-in: one-block calls go through the batched `encode` / `decode` (the code the engine runs)."""

    def layout(self, numel, dtype):
        return self.row_layout(numel, dtype, self.capacity(numel))

    def row_layout(self, numel, dtype, cap):
        raise NotImplementedError

    def encode(self, x, lengths=None, seeds=None):
        raise NotImplementedError

    def decode(self, fields, cap, dtype, lengths=None, seeds=None, out=None):
        raise NotImplementedError


def _into(out: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    if out is None:
        return value.contiguous()
    out.copy_(value)
    return out


class NoneCompressor(_Batched):
    name = "none"
    lossless = True
    accepts_empty = True

    def row_layout(self, numel, dtype, cap):
        return [("values", dtype, numel)]

    def encode(self, x, lengths=None, seeds=None):
        return {"values": x}

    def decode(self, fields, cap, dtype, lengths=None, seeds=None, out=None):
        values = fields["values"]
        return _into(out, values if values.dtype == dtype else values.to(dtype))


class CastCompressor(_Batched):
    """Cast to a 16-bit float type on the wire (values outside its range saturate)."""

    accepts_empty = True

    def __init__(self, name: str, wire_dtype: torch.dtype):
        self.name = name
        self.wire_dtype = wire_dtype
        super().__init__()

    def row_layout(self, numel, dtype, cap):
        return [("values", self.wire_dtype, numel)]

    def encode(self, x, lengths=None, seeds=None):
        if x.dtype == self.wire_dtype:
            return {"values": x}
        limit = torch.finfo(self.wire_dtype).max
        if torch.finfo(x.dtype).max > limit:
            if x.dtype == torch.bfloat16:
                # fp16's limit 65504 is not a bfloat16: clamped in bf16 it would round up to 65536, which
                # overflows to inf in fp16. bf16 -> fp32 is exact, so clamping in fp32 changes nothing else.
                x = x.float()
            x = torch.clamp(x, -limit, limit)
        return {"values": x.to(self.wire_dtype)}

    def decode(self, fields, cap, dtype, lengths=None, seeds=None, out=None):
        values = fields["values"]
        return _into(out, values if values.dtype == dtype else values.to(dtype))


class SignCompressor(_Batched):
    name = "sign"
    cap_multiple = 8

    def row_layout(self, numel, dtype, cap):
        return [("scale", torch.float32, 1), ("bits", torch.uint8, bitpack.packed_nbytes(numel))]

    def encode(self, x, lengths=None, seeds=None):
        rows, cap = x.shape
        acc = x if x.dtype in (torch.float32, torch.float64) else x.to(acc_dtype(x.dtype))
        l1 = acc.abs().sum(1)
        scale = (l1 / (cap if lengths is None else lengths.to(acc.dtype))).float()
        return {"scale": scale.reshape(rows, 1), "bits": bitpack.pack_negative(x)}

    def nonfinite(self, fields):
        return ~torch.isfinite(fields["scale"]).all()

    def decode(self, fields, cap, dtype, lengths=None, seeds=None, out=None):
        bits = fields["bits"]
        rows = bits.shape[0]
        signs = bitpack.unpack_signs(bits, rows * cap, dtype).view(rows, cap)
        return torch.mul(signs, fields["scale"].to(dtype), out=out)      # (rows, 1) scale broadcasts

    def decode_add(self, fields, cap, dtype, acc, lengths=None, seeds=None):
        rows = fields["bits"].shape[0]
        signs = bitpack.unpack_signs(fields["bits"], rows * cap, dtype).view(rows, cap)
        return acc.addcmul_(signs, fields["scale"].to(dtype))           # acc + (+-s): s * +-1 is exact


def _parse_ratio(name: str, arg: Optional[str], default: float) -> float:
    if arg is None:
        return default
    try:
        ratio = float(arg)
    except ValueError:
        ratio = float("nan")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{name}: the ratio must be a number in (0, 1], e.g. '{name}:0.01'; got {arg!r}")
    return ratio


def _top_indices(score: torch.Tensor, k: int, keep_n: Optional[torch.Tensor]) -> torch.Tensor:
    """(rows, k) int64: the columns of the `keep_n` (rows,) largest scores of each row (k each if None), in
    column order; of equal scores at the last place, the lower columns. Entries of a row beyond its `keep_n` are
    `cols - 1` (ignored). NaN scores count as the largest; scores of -1 mark padding (never kept)."""
    rows, cols = score.shape
    dev = score.device
    score = score.nan_to_num(nan=torch.inf)
    top = torch.topk(score, k, dim=1, sorted=True)
    keep_n = torch.full((rows, 1), k, device=dev) if keep_n is None else keep_n.reshape(-1, 1)
    kth = top.values.gather(1, keep_n - 1)                  # the keep_n-th largest score of each row
    col = _col(k, dev)
    # Entries above it are kept whatever the order; of those equal to it, the lowest columns (found by a second
    # top-k over the reversed column of each tie) fill the remaining places.
    above = (top.values > kth) & (col < keep_n)
    reverse = torch.arange(cols, 0, -1, device=dev, dtype=torch.float32)
    ties = torch.topk(torch.where(score == kth, reverse, 0.0), k, dim=1, sorted=True)
    room = keep_n - above.sum(1, keepdim=True)
    tied = (col < room) & (ties.values > 0)
    big = torch.iinfo(torch.int64).max
    both = torch.cat([torch.where(above, top.indices, big), torch.where(tied, ties.indices, big)], dim=1)
    idx = both.sort(dim=1).values[:, :k]
    return torch.where(idx == big, cols - 1, idx)


class _RatioCompressor(_Batched):
    """Keeps `k = max(1, ceil(ratio * n))` of a block's n elements; spec ``name:ratio`` (default 0.01)."""

    def __init__(self, arg: Optional[str] = None):
        self.ratio = _parse_ratio(self.name, arg, 0.01)
        super().__init__(repr(self.ratio))

    def k(self, numel: int) -> int:
        return _ratio_k(self.ratio, numel)

    def k_tensor(self, lengths: torch.Tensor) -> torch.Tensor:
        """`k` of each row length, as an int64 tensor (on the lengths' device: no host round trip)."""
        return _ratio_k(self.ratio, lengths)

    def place_add(self, values, fields, cap, dtype, acc, lengths=None, seeds=None):
        """``acc += place(values)``: the kept values added at their places (the server's sum over ranks). Full
        rows add only the k kept entries (a scatter-add, not a dense pass), with the same values."""
        if lengths is None:
            idx = self._places(fields, cap, seeds)
            if idx is not None:
                return acc.scatter_add_(1, idx, values.to(dtype))
        return acc.add_(self.place(values, fields, cap, dtype, lengths, seeds))

    def _places(self, fields, cap, seeds):
        """(rows, k) int64 columns of the kept values of full rows, or None where they are not per element."""
        return None

    def decode_add(self, fields, cap, dtype, acc, lengths=None, seeds=None):
        return self.place_add(fields["values"], fields, cap, dtype, acc, lengths, seeds)

    @staticmethod
    def _scatter(values, idx, cap, dtype, lengths, keep, out):
        """(rows, cap) zeros with the kept values at their indices; entries beyond a row's `keep` count are
        sent to the last column, which is padding for every row shorter than the capacity."""
        if lengths is not None:
            k = values.shape[1]
            live = torch.arange(k, device=idx.device) < keep.reshape(-1, 1)
            idx = torch.where(live, idx, cap - 1)
            values = torch.where(live, values, 0)
        if out is None:
            out = torch.zeros(values.shape[0], cap, dtype=dtype, device=values.device)
        else:
            out.zero_()
        return out.scatter_(1, idx, values.to(dtype))


class TopKCompressor(_RatioCompressor):
    name = "topk"

    def row_layout(self, numel, dtype, cap):
        k = self.k(numel)
        return [("values", dtype, k), ("indices", index_dtype(cap), k)]

    def select(self, x, lengths=None, seeds=None):
        """(values (rows, k(cap)), {"indices": ...}): the kept entries of each row in the order of their indices,
        and what else goes on the wire. Among equal magnitudes the lower index is kept, so the selection is one
        function of the row, whatever the batch and the device. A short row's first k(n) entries are its kept
        ones."""
        rows, cap = x.shape
        mag = x.abs()
        if lengths is not None:
            mag.masked_fill_(~_valid(lengths, cap), -1)     # padding is never kept
        keep_n = None if lengths is None else self.k_tensor(lengths)
        idx = _top_indices(mag, self.k(cap), keep_n)
        return x.gather(1, idx), {"indices": idx.to(index_dtype(cap))}

    def place(self, values, fields, cap, dtype, lengths=None, seeds=None, out=None):
        """(rows, cap): zeros with each row's kept `values` at their places (the inverse of `select`)."""
        keep = None if lengths is None else _ratio_k(self.ratio, lengths)
        return self._scatter(values, fields["indices"].long(), cap, dtype, lengths, keep, out)

    def _places(self, fields, cap, seeds):
        return fields["indices"].long()

    def encode(self, x, lengths=None, seeds=None):
        values, fields = self.select(x, lengths, seeds)
        return dict(fields, values=values)

    def nonfinite(self, fields):
        return ~torch.isfinite(fields["values"]).all()      # topk keeps NaN and +-inf first: they are the largest

    def decode(self, fields, cap, dtype, lengths=None, seeds=None, out=None):
        return self.place(fields["values"], fields, cap, dtype, lengths, seeds, out)


class GroupTopKCompressor(_RatioCompressor):
    """``grouptopk:R``: a block's elements in groups of 32 (its last group may be short); the ``max(1, ceil(R * g))``
    of its ``g`` groups of largest energy (L2 norm) are kept whole, in group order (of equal energies at the
    last place, the lower groups), their values unscaled; on the wire the kept groups' 32 values each and their
    group indices (uint8 for blocks of up to 8192). A contraction: ``|x - C(x)|^2 <= (1 - k/g) |x|^2``. Selecting
    among g = n/32 group scores instead of n magnitudes makes it cost about one pass over the block, where ``topk``
    costs a sort-like selection over every element; followed by a quantiser (``grouptopk:0.03+sign``: 1 bit per
    kept value and one scale) it sends about 24 bytes per block of 4096."""

    name = "grouptopk"
    group = 32

    def groups(self, numel: int) -> int:
        return -(-numel // self.group)

    def kept_groups(self, numel: int) -> int:
        return _ratio_k(self.ratio, self.groups(numel))

    def k(self, numel: int) -> int:
        """Values on the wire: the kept groups' (a block shorter than them sends just its elements)."""
        return min(self.kept_groups(numel) * self.group, numel)

    def k_tensor(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.minimum(_ratio_k(self.ratio, -(-lengths // self.group)) * self.group, lengths)

    def row_layout(self, numel, dtype, cap):
        return [("values", dtype, self.k(numel)), ("indices", index_dtype(self.groups(cap)),
                                                    self.kept_groups(numel))]

    def select(self, x, lengths=None, seeds=None):
        rows, cap = x.shape
        G = self.group
        gc = -(-cap // G)
        if gc * G != cap:               # a batch narrower than whole groups: zeros complete the last one
            x = torch.cat([x, x.new_zeros(rows, gc * G - cap)], dim=1)
        grouped = x.view(rows, gc, G)
        score = torch.linalg.vector_norm(grouped, dim=2, dtype=acc_dtype(x.dtype))   # one fused pass
        keep_n = None
        if lengths is not None:
            n_groups = -(-lengths // G)
            score.masked_fill_(~_valid(n_groups, gc), -1)    # groups wholly beyond a row's length: padding
            keep_n = _ratio_k(self.ratio, n_groups)
        gidx = _top_indices(score, self.kept_groups(cap), keep_n)
        values = grouped.gather(1, gidx[..., None].expand(-1, -1, G)).reshape(rows, -1)
        return values[:, :self.k(cap)], {"indices": gidx.to(index_dtype(gc))}

    def place(self, values, fields, cap, dtype, lengths=None, seeds=None, out=None):
        G = self.group
        gidx = fields["indices"].long()
        rows, kg = gidx.shape
        gc = -(-cap // G)
        if values.shape[1] != kg * G:   # a block shorter than its kept groups sent only its elements
            values = torch.cat([values, values.new_zeros(rows, kg * G - values.shape[1])], dim=1)
        vals = values.reshape(rows, kg, G).to(dtype)
        if lengths is None and gc * G == cap and out is not None and out.is_contiguous():
            out.zero_()
            out.view(rows, gc, G).scatter_(1, gidx[..., None].expand(-1, -1, G), vals)
            return out
        extra = 0
        if lengths is not None:         # groups beyond a row's count go to a spare group, dropped below
            live = _col(kg, gidx.device) < _ratio_k(self.ratio, -(-lengths // G)).reshape(-1, 1)
            gidx = torch.where(live, gidx, gc)
            extra = 1
        buf = torch.zeros(rows, gc + extra, G, dtype=dtype, device=values.device)
        buf.scatter_(1, gidx[..., None].expand(-1, -1, G), vals)
        return _into(out, buf[:, :gc].reshape(rows, gc * G)[:, :cap])

    def place_add(self, values, fields, cap, dtype, acc, lengths=None, seeds=None):
        G = self.group
        gidx = fields["indices"].long()
        rows, kg = gidx.shape
        if lengths is not None or cap % G or values.shape[1] != kg * G or not acc.is_contiguous():
            return acc.add_(self.place(values, fields, cap, dtype, lengths, seeds))
        vals = values.reshape(rows, kg, G).to(dtype)
        acc.view(rows, cap // G, G).scatter_add_(1, gidx[..., None].expand(-1, -1, G), vals)
        return acc

    def encode(self, x, lengths=None, seeds=None):
        values, fields = self.select(x, lengths, seeds)
        return dict(fields, values=values)

    def nonfinite(self, fields):
        return ~torch.isfinite(fields["values"]).all()      # a NaN or inf makes its group the largest

    def decode(self, fields, cap, dtype, lengths=None, seeds=None, out=None):
        return self.place(fields["values"], fields, cap, dtype, lengths, seeds, out)


class RandomKCompressor(_RatioCompressor):
    name = "randomk"
    uses_seed = True

    def row_layout(self, numel, dtype, cap):
        return [("values", dtype, self.k(numel))]

    def variance(self, numel: int) -> float:
        return numel / self.k(numel) - 1.0

    def _indices(self, seeds, cap, lengths):
        if seeds is None:
            raise ValueError("randomk: the indices are derived from the block's seed, and none was given")
        keys = rng.keys(seeds, cap)
        if lengths is not None:
            keys.masked_fill_(~_valid(lengths, cap), _INT64_MAX)
        # The k smallest keys, smallest first, on every device: the same indices in the same order.
        return torch.topk(keys, self.k(cap), dim=1, largest=False, sorted=True).indices

    def select(self, x, lengths=None, seeds=None):
        rows, cap = x.shape
        idx = self._indices(seeds, cap, lengths)
        acc = acc_dtype(x.dtype)
        if lengths is None:
            factor = cap / self.k(cap)
        else:
            factor = (lengths.to(torch.float64) / _ratio_k(self.ratio, lengths)).to(acc).reshape(-1, 1)
        return (x.gather(1, idx).to(acc) * factor).to(x.dtype), {}

    def place(self, values, fields, cap, dtype, lengths=None, seeds=None, out=None):
        keep = None if lengths is None else _ratio_k(self.ratio, lengths)
        return self._scatter(values, self._indices(seeds, cap, lengths), cap, dtype, lengths, keep, out)

    def _places(self, fields, cap, seeds):
        return self._indices(seeds, cap, None)

    def encode(self, x, lengths=None, seeds=None):
        return {"values": self.select(x, lengths, seeds)[0]}

    def decode(self, fields, cap, dtype, lengths=None, seeds=None, out=None):
        return self.place(fields["values"], fields, cap, dtype, lengths, seeds, out)


class QSGDCompressor(_Batched):
    name = "qsgd"
    uses_seed = True
    seed_per_rank = True
    cap_multiple = 8

    def __init__(self, arg: Optional[str] = None):
        try:
            levels = 16 if arg is None else int(arg)
        except ValueError:
            levels = 0
        if not 1 <= levels <= 255:
            raise ValueError(f"qsgd: the number of levels must be an integer in 1..255, e.g. 'qsgd:16'; got {arg!r}")
        self.levels = levels
        self.bits = max(1, math.ceil(math.log2(levels + 1)))
        super().__init__(str(levels))

    def variance(self, numel: int) -> float:
        # per element (|x|/S)^2 p(1-p), p the rounding probability: p(1-p) <= 1/4, and sum p <= S |x|_1/|x|
        return min(numel / (4 * self.levels ** 2), math.sqrt(numel) / self.levels)

    def row_layout(self, numel, dtype, cap):
        return [("norm", torch.float32, 1), ("signs", torch.uint8, bitpack.packed_nbytes(numel)),
                ("levels", torch.uint8, bitpack.packed_nbytes(numel, self.bits))]

    def encode(self, x, lengths=None, seeds=None):
        if seeds is None:
            raise ValueError("qsgd: stochastic rounding needs the block's seed, and none was given")
        rows, cap = x.shape
        v = x.float()
        norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        # floor(noise + |v| / norm * S): stochastic rounding to a neighbouring level (level 0 where norm is 0)
        a = v.abs().div_(torch.where(norm > 0, norm, torch.inf)).mul_(self.levels)
        levels = a.add_(rng.uniform(seeds, cap)).floor_().clamp_(0, self.levels).to(torch.uint8)
        return {"norm": norm, "signs": bitpack.pack_negative(v),
                "levels": bitpack.pack_uint(levels, self.bits).view(rows, -1)}

    def nonfinite(self, fields):
        return ~torch.isfinite(fields["norm"]).all()

    def decode(self, fields, cap, dtype, lengths=None, seeds=None, out=None):
        rows = fields["norm"].shape[0]
        mags = bitpack.unpack_uint(fields["levels"], rows * cap, self.bits).view(rows, cap).float()
        mags.mul_(fields["norm"] / self.levels)
        mags.mul_(bitpack.unpack_signs(fields["signs"], rows * cap, torch.float32).view(rows, cap))
        return _into(out, mags if dtype == torch.float32 else mags.to(dtype))


class IntCompressor(_Batched):
    """Min-max quantization to `bits` bits per element, per chunk of `chunk` elements (chunks never straddle
    blocks): per chunk a fp32 minimum and step ``(max - min) / (2**bits - 1)``, then each element rounded to the
    nearest of the ``2**bits`` levels, packed ``8 / bits`` to a byte. Specs ``int8``, ``int4``, ``int2``, each with
    an optional chunk size (``int4:128``; default 512). Biased and contractive: each element moves at most half a
    step."""

    def __init__(self, name: str, bits: int, arg: Optional[str] = None):
        self.name, self.bits = name, bits
        self.cap_multiple = 1 if bits == 8 else 8
        try:
            chunk = 512 if arg is None else int(arg)
        except ValueError:
            chunk = 0
        if chunk < 1:
            raise ValueError(f"{name}: the chunk size must be a positive integer, e.g. '{name}:512'; got {arg!r}")
        self.chunk = chunk
        super().__init__(None if chunk == 512 else str(chunk))

    def row_layout(self, numel, dtype, cap):
        chunks = -(-numel // self.chunk)
        return [("mins", torch.float32, chunks), ("steps", torch.float32, chunks),
                ("q", torch.uint8, bitpack.packed_nbytes(numel, self.bits))]

    def _fast(self, t: torch.Tensor, cap: int, lengths) -> bool:
        """Whether the numba kernels take this batch: float32 on the CPU, whole chunks, every row full."""
        return (lengths is None and cap % self.chunk == 0 and self.chunk % 4 == 0
                and t.dtype == torch.float32 and kernels.available() and fastpath.on_cpu(t))

    def encode(self, x, lengths=None, seeds=None):
        rows, cap = x.shape
        c, top = self.chunk, 2 ** self.bits - 1
        chunks = -(-cap // c)
        if self._fast(x, cap, lengths):            # the range in torch, the levels and packing in one numba pass
            v = x.contiguous().view(rows, chunks, c)
            lo, hi = v.amin(dim=2), v.amax(dim=2)
            step = (hi - lo) / float(top)
            q = torch.empty(rows, cap * self.bits // 8, dtype=torch.uint8)
            kernels.int_quantize(v.view(-1).numpy(), c, self.bits, lo.view(-1).numpy(), step.view(-1).numpy(),
                                 q.view(-1).numpy())
            return {"mins": lo, "steps": step, "q": q}
        v = x.float()
        if chunks * c != cap:
            v = torch.cat([v, v.new_zeros(rows, chunks * c - cap)], dim=1)
        v = v.view(rows, chunks, c)
        if lengths is None and chunks * c == cap:
            lo, hi = v.amin(dim=2), v.amax(dim=2)
        else:       # padding takes no part in a chunk's range
            n = cap if lengths is None else lengths
            valid = torch.arange(chunks * c, device=x.device).view(1, chunks, c) < torch.as_tensor(
                n, device=x.device).reshape(-1, 1, 1)
            lo = torch.where(valid, v, torch.inf).amin(dim=2)
            hi = torch.where(valid, v, -torch.inf).amax(dim=2)
        step = (hi - lo) / float(top)
        safe = torch.where(step > 0, step, 1.0)
        q = (v - lo[..., None]).div_(safe[..., None]).round_().clamp_(0, top).to(torch.uint8)
        q = q.view(rows, -1)[:, :cap]
        if self.bits < 8:
            q = bitpack.pack_uint(q, self.bits).view(rows, -1)
        return {"mins": lo, "steps": step, "q": q}

    def nonfinite(self, fields):
        return ~(torch.isfinite(fields["mins"]).all() & torch.isfinite(fields["steps"]).all())

    def decode(self, fields, cap, dtype, lengths=None, seeds=None, out=None):
        q = fields["q"]
        rows = q.shape[0]
        c = self.chunk
        chunks = fields["mins"].shape[1]
        if dtype == torch.float32 and self._fast(q.new_empty((), dtype=dtype), cap, lengths) \
                and (out is None or out.is_contiguous()):
            out = torch.empty(rows, cap, dtype=dtype) if out is None else out
            kernels.int_decode(q.contiguous().view(-1).numpy(), c, self.bits,
                               fields["mins"].contiguous().view(-1).numpy(),
                               fields["steps"].contiguous().view(-1).numpy(), out.view(-1).numpy())
            return out
        if self.bits < 8:
            q = bitpack.unpack_uint(q, rows * cap, self.bits).view(rows, cap)
        v = q.float()
        if chunks * c != cap:
            v = torch.cat([v, v.new_zeros(rows, chunks * c - cap)], dim=1)
        # q * step + min, chunk by chunk (each chunk's step and min broadcast over its elements)
        v = v.view(rows, chunks, c).mul_(fields["steps"][..., None]).add_(fields["mins"][..., None])
        v = v.view(rows, -1)[:, :cap]
        return _into(out, v.to(dtype))


def Int8Compressor(arg: Optional[str] = None) -> IntCompressor:
    """`IntCompressor` of 8 bits (the name of earlier versions)."""
    return IntCompressor("int8", 8, arg)


class ComposedCompressor(_Batched):
    """A sparsifier, then a quantiser of the values it keeps: spec ``"topk:0.01+int4"``, ``"topk:0.01+sign"``,
    ``"randomk:0.05+int8"``. Per block of ``n`` elements: the sparsifier's ``k(n)`` kept values form one block of
    ``k(n)`` elements that the quantiser compresses (sign: one scale over the kept values; intN: its chunks);
    the wire holds the sparsifier's own fields (topk: the indices, in the smallest type) and the quantiser's
    fields of the values. The sparsifier is `TopKCompressor`, `GroupTopKCompressor` or `RandomKCompressor`
    (anything with `select` / `place` / `k` / `k_tensor`); the quantiser any batched compressor."""

    name = "composed"

    def __init__(self, sparsifier: Compressor, quantizer: Compressor):
        if not hasattr(sparsifier, "select"):
            raise ValueError(f"in {sparsifier.spec}+{quantizer.spec}: the first part must be a sparsifier "
                             f"(topk, randomk), got {sparsifier.spec!r}")
        if hasattr(quantizer, "select") or isinstance(quantizer, ComposedCompressor):
            raise ValueError(f"in {sparsifier.spec}+{quantizer.spec}: the second part must be a quantiser of "
                             f"values (sign, int8, int4, int2, qsgd, fp16, bf16), got {quantizer.spec!r}")
        if type(quantizer).encode is Compressor.encode:
            raise ValueError(f"{quantizer.spec!r} has no batched encode/decode, so it cannot follow a sparsifier")
        self.sparsifier, self.quantizer = sparsifier, quantizer
        self.cap_multiple = sparsifier.cap_multiple
        self.uses_seed = sparsifier.uses_seed or quantizer.uses_seed
        self.seed_per_rank = sparsifier.seed_per_rank or quantizer.seed_per_rank
        self.lossless = False
        super().__init__()
        self.spec = f"{sparsifier.spec}+{quantizer.spec}"

    def k(self, numel):
        return self.sparsifier.k(numel)

    def _kcap(self, cap: int) -> int:
        m = self.quantizer.cap_multiple
        return -(-self.k(cap) // m) * m

    def row_layout(self, numel, dtype, cap):
        s, q = self.sparsifier, self.quantizer
        own = [f for f in s.row_layout(numel, dtype, cap) if f[0] != "values"]
        return own + [("v_" + name, dt, count) for name, dt, count in q.row_layout(self.k(numel), dtype,
                                                                                   self._kcap(cap))]

    def variance(self, numel: int) -> Optional[float]:
        a, b = self.sparsifier.variance(numel), self.quantizer.variance(self.k(numel))
        if a is None and b is None:
            return None
        return (1 + (a or 0.0)) * (1 + (b or 0.0)) - 1

    def _inner(self, cap, lengths, seeds, device):
        """The quantiser's batch: capacity, row lengths (None: all full) and seeds (derived from the block's)."""
        kcap = self._kcap(cap)
        if lengths is not None:
            klens = self.sparsifier.k_tensor(lengths)
        elif kcap != self.k(cap):
            klens = torch.full((1,), self.k(cap), dtype=torch.int64, device=device)
        else:
            klens = None
        qseeds = None
        if seeds is not None and self.quantizer.uses_seed:
            qseeds = rng.mix32_((seeds ^ 0x2545F491) & rng.MASK32)
        return kcap, klens, qseeds

    def encode(self, x, lengths=None, seeds=None):
        rows, cap = x.shape
        values, fields = self.sparsifier.select(x, lengths, seeds)
        kcap, klens, qseeds = self._inner(cap, lengths, seeds, x.device)
        if kcap != values.shape[1]:
            values = torch.cat([values, values.new_zeros(rows, kcap - values.shape[1])], dim=1)
        if klens is not None:
            klens = klens.expand(rows)
            values = values.masked_fill(~_valid(klens, kcap), 0)
        qf = self.quantizer.encode(values, klens, qseeds)
        # the quantiser's fields at capacity kcap, cut to what k(cap) values take (the rest is padding)
        for name, _, count in self.quantizer.row_layout(self.k(cap), x.dtype, kcap):
            fields["v_" + name] = qf[name][:, :count]
        return fields

    def nonfinite(self, fields):
        q = self.quantizer.nonfinite({k[2:]: f for k, f in fields.items() if k.startswith("v_")})
        keeps_nan = isinstance(self.sparsifier, (TopKCompressor, GroupTopKCompressor))
        return q if keeps_nan else None         # randomk may drop a NaN

    def decode(self, fields, cap, dtype, lengths=None, seeds=None, out=None):
        values = self._values(fields, cap, dtype, lengths, seeds)
        return self.sparsifier.place(values, fields, cap, dtype, lengths, seeds, out)

    def decode_add(self, fields, cap, dtype, acc, lengths=None, seeds=None):
        values = self._values(fields, cap, dtype, lengths, seeds)
        return self.sparsifier.place_add(values, fields, cap, dtype, acc, lengths, seeds)

    def _values(self, fields, cap, dtype, lengths, seeds):
        """The kept values (rows, k(cap)), decoded by the quantiser."""
        rows = next(iter(fields.values())).shape[0]
        device = next(iter(fields.values())).device
        kcap, klens, qseeds = self._inner(cap, lengths, seeds, device)
        if klens is not None:
            klens = klens.expand(rows)
        qf = {}
        for name, _, count in self.quantizer.row_layout(kcap, dtype, kcap):
            f = fields["v_" + name]
            qf[name] = f if f.shape[1] == count else torch.cat([f, f.new_zeros(rows, count - f.shape[1])], dim=1)
        return self.quantizer.decode(qf, kcap, dtype, klens, qseeds)[:, :self.k(cap)]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

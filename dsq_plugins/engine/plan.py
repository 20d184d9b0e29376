"""Where every block of a bucket lives: rows, owners, chunks and wire layouts, computed once per bucket layout.

A bucket is a list of tensors (1-D, one dtype, one device). Each tensor of ``d`` elements is cut into
``d // B`` full blocks of ``B = block_size`` elements and, when ``d % B``, one shorter *tail* block. The engine
keeps two batches per bucket, in *tensor order* (tensor by tensor, block by block):

- the *full rows*: a (R, B) batch, one row per full block;
- the *tail rows*: a (T, cap) batch, one row per tail block, ``cap`` the longest tail rounded up to 8, each row zero
  beyond its length.

Block ``b`` of the tensor named ``key`` is owned by rank ``(b + crc32(key)) % W`` (its server pass and server
residual live there): a function of the tensor and the world size only, never of the bucket. A rank's message
lists the rows it owns in tensor order (its *server order*). Messages are field-major, so that every field is
aligned for its dtype and packing is a row gather::

    message to rank j = [header][dense blocks j][field 0: full rows j | tail rows j][field 1: ...]...

fields in decreasing item size, each full row ``count(B)`` items, each tail row ``count(n)`` items of that field
(the compressor's `row_layout`), each section padded to 8 bytes (so that a full row moves as int64 where its size
allows: packing is a gather of a few wide items per row).

Tensors a bucket sends dense (below ``min_numel``) have no rows: their blocks travel uncompressed in the *dense
section* of the same messages, the blocks rank j owns in tensor order, and their owner averages them (what a ring
all-reduce moves, without a collective of its own). A bucket that is dense throughout (warm-up) is averaged by one
all-reduce of its buffer instead.
"""
import zlib
from typing import Dict, Hashable, List, NamedTuple, Sequence, Tuple

import numpy as np
import torch

from ..compression.compressors import Compressor
from .kinds import Pass, TailSlots

__all__ = ["BucketPlan", "WireLayout", "Span", "owner_offset", "owned_blocks", "expand_owned",
           "residual_dtype_for"]

UPLINK_HEADER = 8       # bytes in front of every uplink message; byte 0 is the sender's non-finite flag


def residual_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype a bucket of `dtype` gradients keeps its residuals and computes ``g + e`` in: float32 for 16-bit
    gradients (a bfloat16 residual would round away, every step, the small values error feedback exists to send
    later), else the gradients' own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def owner_offset(key: Hashable) -> int:
    """The rotation of a tensor's block owners: block b of `key` is owned by ``(b + owner_offset(key)) % W``."""
    return zlib.crc32(str(key).encode())


def owned_blocks(key: Hashable, numel: int, block_size: int, world_size: int, rank: int) -> List[Tuple[int, int]]:
    """[(start, end), ...] in elements: the blocks of tensor `key` (`numel` elements) that `rank` owns."""
    off, blocks = owner_offset(key), -(-numel // block_size)
    return [(b * block_size, min(numel, (b + 1) * block_size)) for b in range(blocks)
            if (b + off) % world_size == rank]


def expand_owned(key: Hashable, compact: torch.Tensor, numel: int, block_size: int, world_size: int,
                 rank: int) -> torch.Tensor:
    """`compact` (the owned blocks of `key`, in block order, concatenated) in a zero tensor of `numel` elements."""
    full = torch.zeros(numel, dtype=compact.dtype, device=compact.device)
    off = 0
    for a, b in owned_blocks(key, numel, block_size, world_size, rank):
        full[a:b] = compact[off:off + b - a]
        off += b - a
    if off != compact.numel():
        raise ValueError(f"server residual of {key!r}: {compact.numel()} elements, rank {rank} owns {off}")
    return full


class Span(NamedTuple):
    """One tensor of a bucket: its place among the items, and its rows (-1 / 0 where it has none)."""
    item: int
    key: Hashable
    numel: int
    dense: bool
    row0: int        # its first full row
    full: int        # number of full rows
    tail_row: int    # its tail row, or -1
    tail: int        # tail length (0: none)


class BucketPlan:
    """The blocks of one bucket layout on one rank (see the module docstring).

    Args:
        keys, numels: the tensors, in the order the integration passes them.
        dense: per tensor, whether it travels dense this step.
        dtype, device: of every tensor (the wire carries `dtype`; residuals and sums are in `compute_dtype`,
            `residual_dtype_for(dtype)`).
        world_size, rank: the process group's.
        block_size: B.
        chunk_elements: full rows are processed this many elements at a time (temporaries stay in cache).
    """

    def __init__(self, keys: Sequence[Hashable], numels: Sequence[int], dense: Sequence[bool], dtype: torch.dtype,
                 device: torch.device, world_size: int, rank: int, block_size: int, chunk_elements: int):
        self.keys, self.numels = list(keys), list(numels)
        self.dtype, self.device = dtype, torch.device(device)
        self.compute_dtype = residual_dtype_for(dtype)
        self.low_precision = self.compute_dtype != dtype
        self.world_size, self.rank, self.block_size = world_size, rank, block_size
        B, W = block_size, world_size
        spans, row, tail_row, tails, owners_full, owners_tail = [], 0, 0, [], [], []
        row_tensor, tail_tensor = [], []
        for i, (key, d, dn) in enumerate(zip(keys, numels, dense)):
            if dn:
                spans.append(Span(i, key, d, True, 0, 0, -1, 0))
                continue
            full, tail = divmod(d, B)
            c = len(spans) - sum(x.dense for x in spans)       # its place among the compressed tensors
            row_tensor += [c] * full
            if tail:
                tail_tensor.append(c)
            off = owner_offset(key)
            owners_full.append((np.arange(full, dtype=np.int64) + off) % W)
            if tail:
                owners_tail.append((full + off) % W)
                tails.append(tail)
            spans.append(Span(i, key, d, False, row, full, tail_row if tail else -1, tail))
            row += full
            tail_row += bool(tail)
        self.spans: List[Span] = spans
        self.dense_items = [s.item for s in spans if s.dense]
        self.compressed = [s for s in spans if not s.dense]
        self.R, self.T = row, tail_row
        # per row, the place of its tensor among `compressed` (the quality guard sums rows by tensor)
        self.row_tensor = np.array(row_tensor, dtype=np.int64)
        self.tail_tensor = np.array(tail_tensor, dtype=np.int64)
        self.tail_lengths = np.array(tails, dtype=np.int64)
        self.cap = -(-int(self.tail_lengths.max()) // 8) * 8 if tails else 8
        self.owner_full = np.concatenate(owners_full) if owners_full else np.zeros(0, dtype=np.int64)
        self.owner_tail = np.array(owners_tail, dtype=np.int64)
        # rows each rank owns, in tensor order (= that rank's server order)
        self.owned_full = [np.flatnonzero(self.owner_full == j) for j in range(W)]
        self.owned_tail = [np.flatnonzero(self.owner_tail == j) for j in range(W)]
        self.F_me, self.T_me = len(self.owned_full[rank]), len(self.owned_tail[rank])
        self.dense_numel = sum(numels[i] for i in self.dense_items)
        self.numel = sum(numels)
        self.all_dense = not self.compressed
        # the dense blocks of a mixed bucket, by owner: [(item, start, length)] in tensor order
        self.dense_owned: List[List[Tuple[int, int, int]]] = [[] for _ in range(W)]
        if not self.all_dense:
            for s in spans:
                if s.dense:
                    off = owner_offset(s.key)
                    for b, a in enumerate(range(0, s.numel, B)):
                        self.dense_owned[(b + off) % W].append((s.item, a, min(B, s.numel - a)))
        self.dense_count = [sum(n for _, _, n in blocks) for blocks in self.dense_owned]
        self.chunk_rows = max(1, chunk_elements // B)
        self._device_cache: Dict[Tuple, torch.Tensor] = {}
        self.layouts: Dict[Tuple[str, str], "WireLayout"] = {}

    # -- device copies of host tables, made once ---------------------------------------------------------------
    def on_device(self, name: str, make) -> torch.Tensor:
        t = self._device_cache.get(name)
        if t is None:
            t = self._device_cache[name] = torch.as_tensor(make(), device=self.device)
        return t

    def tail_lengths_t(self) -> torch.Tensor:
        return self.on_device("tail_lengths", lambda: self.tail_lengths)

    def my_tail_lengths_t(self) -> torch.Tensor:
        return self.on_device("my_tail_lengths", lambda: self.tail_lengths[self.owned_tail[self.rank]])

    def tensor_of_rows(self, tail: bool, mine: bool) -> torch.Tensor:
        """Per row (full or tail rows; all in tensor order, or this rank's owned ones in server order), the place
        of its tensor among `compressed`."""
        src = self.tail_tensor if tail else self.row_tensor
        rows = (self.owned_tail if tail else self.owned_full)[self.rank] if mine else slice(None)
        return self.on_device(f"tensor_of_rows{int(tail)}{int(mine)}", lambda: src[rows])

    def tail_pad_mask(self, mine: bool) -> torch.Tensor:
        """(rows, cap) bool, True beyond each tail row's length (all tails, or this rank's owned ones)."""
        lengths = self.tail_lengths[self.owned_tail[self.rank]] if mine else self.tail_lengths
        return self.on_device(f"pad_mask{int(mine)}", lambda: np.arange(self.cap)[None, :] >= lengths[:, None])

    # -- row <-> item element ranges ---------------------------------------------------------------------------
    def chunks(self, rows: int):
        """[(a, b), ...]: row ranges of at most `chunk_rows` rows covering `rows`."""
        c = self.chunk_rows
        return [(a, min(rows, a + c)) for a in range(0, rows, c)]

    def full_segments(self, a: int, b: int) -> List[Tuple[int, int, int, int]]:
        """[(item, item_start, chunk_start, length)] in elements: where the full rows [a, b) live in the items."""
        B, out = self.block_size, []
        for s in self.compressed:
            lo, hi = max(a, s.row0), min(b, s.row0 + s.full)
            if lo < hi:
                out.append((s.item, (lo - s.row0) * B, (lo - a) * B, (hi - lo) * B))
        return out

    def tail_segments(self) -> List[Tuple[int, int, int, int]]:
        """[(item, item_start, batch_start, length)] in elements: the tail rows in the (T, cap) batch."""
        return [(s.item, s.full * self.block_size, s.tail_row * self.cap, s.tail) for s in self.compressed
                if s.tail_row >= 0]

    def layout(self, compressor: Compressor, direction: Pass, align: int = 8) -> "WireLayout":
        """The message layout of `compressor` in `direction` (`Pass.UP`: rank i to each rank j; `Pass.DOWN`: each
        rank's own rows to every rank), field sections padded to `align` bytes."""
        key = (compressor.spec, direction, align)
        lay = self.layouts.get(key)
        if lay is None:
            lay = self.layouts[key] = WireLayout(self, compressor, direction, align)
        return lay


class _Field(NamedTuple):
    name: str
    dtype: torch.dtype
    itemsize: int
    full: int               # items per full row
    tail_cap: int           # items per tail row at capacity
    tail: np.ndarray        # items per tail row (tensor order)
    move: torch.dtype       # the widest integer type a full row of the field is moved as (rows are gathered in it)
    move_items: int         # a full row's size in `move` items


_MOVE = [(8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8)]


class WireLayout:
    """Message sizes, field offsets and the index tables that pack and unpack one compressor's fields, for one
    bucket plan and one direction. Sizes are bytes; offsets into a dtype view of a buffer are items."""

    def __init__(self, plan: BucketPlan, compressor: Compressor, direction: Pass, align: int = 8):
        self.plan, self.compressor, self.direction, self.align = plan, compressor, direction, align
        B, W, dtype = plan.block_size, plan.world_size, plan.dtype
        full_layout = compressor.row_layout(B, dtype, B)
        tail_layouts = {n: compressor.row_layout(n, dtype, plan.cap) for n in set(plan.tail_lengths.tolist())}
        cap_layout = compressor.row_layout(plan.cap, dtype, plan.cap)
        fields = []
        for i, (name, dt, count) in enumerate(full_layout):
            itemsize = torch.empty((), dtype=dt).element_size()
            tail = np.array([_count(tail_layouts[n], name) for n in plan.tail_lengths.tolist()], dtype=np.int64)
            size, move = next((w, t) for w, t in _MOVE if (count * itemsize) % w == 0)
            fields.append((-itemsize, i, _Field(name, dt, itemsize, count, _count(cap_layout, name), tail, move,
                                                count * itemsize // size)))
        self.fields: List[_Field] = [f for _, _, f in sorted(fields, key=lambda x: (x[0], x[1]))]
        header = UPLINK_HEADER if direction is Pass.UP else 0
        self.header = header
        itemsize = torch.empty((), dtype=dtype).element_size()
        # message j: sizes, the dense section's byte offset, and the byte offset of each field's full and tail part
        self.sizes, self.full_off, self.tail_off, self.dense_off = [], [], [], []
        for j in range(W):
            F_j, tails_j = len(plan.owned_full[j]), plan.owned_tail[j]
            self.dense_off.append(header)
            off = -(-(header + plan.dense_count[j] * itemsize) // align) * align
            fo, to = [], []
            for f in self.fields:              # each section starts aligned (under `align` bytes of padding)
                fo.append(off)
                off += F_j * f.full * f.itemsize
                to.append(off)
                off += int(f.tail[tails_j].sum()) * f.itemsize
                off = -(-off // align) * align
            self.sizes.append(off)
            self.full_off.append(fo)
            self.tail_off.append(to)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.total = int(sum(self.sizes))

    def dense_views(self, buf: torch.Tensor, mine: bool = False):
        """(segments, views): the dense blocks of every message in a buffer of all W messages (mine: of this
        rank's one message), as [(item, start, length)] and the matching 1-D views of `buf` in the grads' dtype."""
        plan = self.plan
        ranks = [plan.rank] if mine else range(plan.world_size)
        typed = buf.view(plan.dtype)
        itemsize = typed.element_size()
        segs, views = [], []
        for j in ranks:
            pos = ((0 if mine else int(self.starts[j])) + self.dense_off[j]) // itemsize
            for item, start, length in plan.dense_owned[j]:
                segs.append((item, start, length))
                views.append(typed.narrow(0, pos, length))
                pos += length
        return segs, views

    # -- full rows: per-row starts, in `move` items, in a buffer of all W messages (up: the send buffer;
    #    down: the gathered buffer), for tensor-order rows -------------------------------------------------------
    def row_starts(self, f: int) -> torch.Tensor:
        plan, fld = self.plan, self.fields[f]

        def make():
            starts = np.zeros(plan.R, dtype=np.int64)
            width = fld.itemsize * fld.full // fld.move_items
            for j in range(plan.world_size):
                rows = plan.owned_full[j]
                base = (self.starts[j] + self.full_off[j][f]) // width
                starts[rows] = base + np.arange(len(rows), dtype=np.int64) * fld.move_items
            return starts
        return plan.on_device(f"rows:{self.compressor.spec}:{self.direction.name}:{f}", make)

    def tail_index(self, f: int, which: TailSlots) -> Tuple[torch.Tensor, torch.Tensor]:
        """(positions in the padded tail batch, positions in a dtype view of a buffer) of field f's tail items.

        `TailSlots.ALL`: every tail row (tensor order) against the buffer of all W messages (the uplink send buffer,
        the downlink gathered buffer); `MINE_UP`: this rank's owned tail rows (server order) against ONE uplink
        message to this rank; `MINE_DOWN`: the same rows against this rank's own downlink message."""
        plan, fld = self.plan, self.fields[f]

        def make():
            pad, buf = [], []
            me = plan.rank
            every = which is TailSlots.ALL
            ranks = range(plan.world_size) if every else [me]
            for j in ranks:
                rows = plan.owned_tail[j]
                start = self.tail_off[j][f] // fld.itemsize
                if every:
                    start += self.starts[j] // fld.itemsize
                for p, r in enumerate(rows):
                    n = int(fld.tail[r])
                    slot = r if every else p
                    pad.append(slot * fld.tail_cap + np.arange(n, dtype=np.int64))
                    buf.append(start + np.arange(n, dtype=np.int64))
                    start += n
            cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64))
            return np.stack([cat(pad), cat(buf)])
        both = plan.on_device(f"tail:{self.compressor.spec}:{self.direction.name}:{f}:{which.value}", make)
        return both[0], both[1]

    def tail_invalid(self, f: int, mine: bool) -> torch.Tensor:
        """(rows, tail_cap) bool: the items of field f beyond each tail row's count."""
        plan, fld = self.plan, self.fields[f]
        counts = fld.tail[plan.owned_tail[plan.rank]] if mine else fld.tail
        return plan.on_device(f"tinv:{self.compressor.spec}:{self.direction.name}:{f}:{int(mine)}",
                              lambda: np.arange(fld.tail_cap)[None, :] >= counts[:, None])


def _count(layout, name) -> int:
    for n, _, count in layout:
        if n == name:
            return count
    raise ValueError(f"field {name!r} is missing from a row layout {layout}")

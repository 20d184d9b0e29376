"""`Payload`: what a compressor produces and what crosses the wire, byte for byte."""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["Payload", "Field"]

# A field of a payload's wire layout: (name, dtype, number of elements).
Field = Tuple[str, torch.dtype, int]

# spec -> the compressor that unpacks it: the registry installs `get_compressor` here when it is imported, so that
# this module (which the compressors import) does not import the registry (which imports the compressors).
_resolve: Optional[Callable[[str], object]] = None


def set_spec_resolver(resolve: Callable[[str], object]) -> None:
    """Install the function that `Payload.from_bytes` uses to find a spec's compressor."""
    global _resolve
    _resolve = resolve


@dataclass
class Payload:
    """The compressed form of one tensor.

    `fields` holds the 1-D tensors that go on the wire, in wire order; `shape`, `dtype` and the compressor's
    spec are context both ends already know (the collective's layout, the async PS's handshake), so they are
    not sent; nor is `seed`, the 32-bit seed of a random compressor, which both ends derive from where and when
    the block was compressed. `nbytes` is therefore exactly the number of bytes `to_bytes()` returns and the
    collectives move.
    """

    spec: str
    shape: torch.Size
    dtype: torch.dtype
    fields: Dict[str, torch.Tensor] = field(default_factory=dict)
    seed: Optional[int] = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Bytes on the wire."""
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    def to_buffer(self) -> torch.Tensor:
        """The wire bytes as one uint8 tensor of `nbytes` elements."""
        parts = [t.contiguous().reshape(-1).view(torch.uint8) for t in self.fields.values()]
        if not parts:
            device = next(iter(self.fields.values())).device if self.fields else None
            return torch.empty(0, dtype=torch.uint8, device=device)
        return parts[0].clone() if len(parts) == 1 else torch.cat(parts)

    def to_bytes(self) -> bytes:
        """The wire bytes, copied to host memory (once) wherever the fields live."""
        return self.to_buffer().cpu().numpy().tobytes()

    @staticmethod
    def from_buffer(buffer: torch.Tensor, spec: str, shape, dtype: torch.dtype,
                    layout: List[Field], seed: Optional[int] = None) -> "Payload":
        """Split `buffer` (uint8, exactly the layout's size) into the layout's fields. Zero-copy where the
        field is aligned for its dtype."""
        buffer = buffer.reshape(-1)
        expected = sum(count * _itemsize(dt) for _, dt, count in layout)
        if buffer.dtype != torch.uint8 or buffer.numel() != expected:
            raise ValueError(
                f"payload for {spec!r} with shape {tuple(shape)} and dtype {dtype} must be {expected} bytes of "
                f"uint8, got {buffer.numel()} elements of {buffer.dtype}")
        fields, offset = {}, 0
        for name, dt, count in layout:
            size = count * _itemsize(dt)
            chunk = buffer[offset:offset + size]
            if (chunk.storage_offset() * 1) % _itemsize(dt) or chunk.data_ptr() % _itemsize(dt):
                chunk = chunk.clone()
            fields[name] = chunk.view(dt)
            offset += size
        return Payload(spec, torch.Size(shape), dtype, fields, seed=seed)

    @classmethod
    def from_bytes(cls, data: bytes, spec: str, shape, dtype: torch.dtype, seed: Optional[int] = None) -> "Payload":
        """Rebuild a payload from `to_bytes()` output and the context: the compressor spec, shape and dtype, and
        the seed of a random compressor."""
        if _resolve is None:
            raise RuntimeError("no compressor registry is installed: import dsq_plugins first")
        buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data)
                  else torch.empty(0, dtype=torch.uint8))
        return _resolve(spec).unpack(buffer, shape, dtype, seed=seed)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

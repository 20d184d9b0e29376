"""The wire protocol of the asynchronous parameter server: ZeroMQ multipart messages, no pickle.

A message is ``[header, payload_0, ..., payload_{k-1}]`` (the server's ROUTER socket sees the peer's identity
frame in front). ``header`` is a small UTF-8 JSON object; each payload frame is one key of the server's key range
(`split_keys`: a tensor, or a block-aligned piece of one) compressed block by block (`dsq_plugins.engine.codec.BlockCodec`),
in key order. Shape, dtype, compressor spec, block size and the keys are context both ends agree on at the
handshake (``hello`` -> ``welcome``), so a frame carries no metadata and its size is checked against the exact
size the codec produces (`BlockCodec.nbytes`). Random compressors draw from the frame seed, ``seed`` in the header
of the message that carries compressed frames. A job with several servers talks to each of them alone; server
``i`` of ``N`` holds the i-th of N key ranges (`partition`).

Every header carries:

- ``p``: the protocol version (`PROTOCOL_VERSION`); a peer speaking another version gets an error reply.
- ``t``: the shared token (``DSQ_PS_TOKEN``); compared in constant time, a wrong one gets an ``auth`` error.
- ``type``: the message type (`REQUEST_TYPES` from workers, `REPLY_TYPES` from the server).
- ``w``: the worker's id (a short string), ``s``: the request's sequence number, echoed by the reply.

Requests and their type-specific header fields (replies echo ``s``):

========== ============================================================ =====================================
request    fields and frames                                            reply
========== ============================================================ =====================================
hello      ``layout`` [[name, shape, dtype], ...] (the whole model),    ``welcome``: ``session``, ``epoch``,
           ``held`` (the previous session and its pull count, or null)  ``version``, ``up``/``down`` specs,
                                                                        ``block``, ``max_staleness``, ``mode``,
                                                                        ``num_servers``, ``server_index``,
                                                                        ``key_elems``, ``key_range``,
                                                                        ``initialised``
init       ``session``; frames: the worker's parameters of the          ``status``
           server's keys, dense (taken if the server has no model)
pull       ``session``, ``full`` (true: send x dense)                   ``model``: ``kind`` full|delta,
                                                                        ``version``, ``seed``; frames: dense
                                                                        keys (full) or ``down`` frames
push       ``session``, ``base`` (version the update was computed at),  ``ack``: ``status`` applied|rejected|
           ``loss``, ``rnorm`` (worker residual norm), ``skipped``,     skipped, ``version``, ``tau``,
           ``seed``; frames: ``up`` frames of the compensated update    ``scale``, ``reason``
step       as push: a push whose answer is the pull that follows it     ``model`` with the ``ack`` fields
heartbeat  ``session``, ``skipped``                                     ``hb``: ``known``, ``epoch``,
                                                                        ``session`` (echoed)
done       ``session``                                                  ``status``
status     (none)                                                       ``status``: ``version``, ``done``,
                                                                        ``live``, ``applied``, ...
bye        ``session`` (the worker leaves; its downlink state goes)     ``status``
========== ============================================================ =====================================

Any request can instead get ``error``: ``code`` (one of `ERROR_CODES`) and a human ``message``.
"""
import hmac
import json
from typing import Dict, List, Sequence, Tuple

import torch


__all__ = ["PROTOCOL_VERSION", "REQUEST_TYPES", "REPLY_TYPES", "ERROR_CODES", "ProtocolError", "Limits",
           "encode", "decode", "dtype_name", "dtype_from_name", "layout_of", "check_layout", "split_keys",
           "partition", "key_layout", "key_seed", "DEFAULT_KEY_ELEMS"]

PROTOCOL_VERSION = 3
REQUEST_TYPES = ("hello", "init", "pull", "push", "step", "heartbeat", "done", "status", "bye")
REPLY_TYPES = ("welcome", "model", "ack", "hb", "status", "error")
ERROR_CODES = ("malformed", "auth", "version", "too_many_frames", "oversized", "bad_type", "bad_field",
               "bad_payload", "layout", "unknown_worker", "internal")

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64}


class ProtocolError(Exception):
    """A message that breaks the protocol. `code` is one of `ERROR_CODES`; the text says what was wrong."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Limits:
    """Bounds on what the server reads before it trusts a message.

    Args:
        max_frames: frames in one message, header included (before the layout is known).
        max_header_bytes: bytes of the JSON header.
        max_frame_bytes: bytes of any one frame; ZeroMQ itself drops a connection that sends a bigger frame
            (``ZMQ_MAXMSGSIZE``), so such a frame never reaches the server's memory.
    """

    def __init__(self, max_frames: int = 4097, max_header_bytes: int = 1 << 20, max_frame_bytes: int = 1 << 30):
        self.max_frames = max_frames
        self.max_header_bytes = max_header_bytes
        self.max_frame_bytes = max_frame_bytes


def encode(msg_type: str, token: str, worker: str = "", seq: int = 0, frames: Sequence[bytes] = (),
           **fields) -> List[bytes]:
    """The frames of one message: the JSON header then `frames` (each ``Payload.to_bytes()`` output)."""
    header = {"p": PROTOCOL_VERSION, "t": token, "type": msg_type, "w": worker, "s": seq, **fields}
    return [json.dumps(header, separators=(",", ":")).encode("utf-8"), *frames]


def decode(frames: Sequence[bytes], token: str, limits: Limits, types=REQUEST_TYPES) -> Tuple[dict, List[bytes]]:
    """Check and parse one message (without the ROUTER identity frame): ``(header, payload frames)``.

    Raises `ProtocolError` for an empty, oversized, unparsable, unauthenticated or wrong-version message.
    ``token=None`` skips the token check (the worker reading the server's replies, which carry none).
    """
    if not frames:
        raise ProtocolError("malformed", "empty message")
    if len(frames) > limits.max_frames:
        raise ProtocolError("too_many_frames", f"{len(frames)} frames, at most {limits.max_frames} allowed")
    raw = frames[0]
    if len(raw) > limits.max_header_bytes:
        raise ProtocolError("oversized", f"header of {len(raw)} bytes, at most {limits.max_header_bytes}")
    for i, f in enumerate(frames[1:], 1):
        if len(f) > limits.max_frame_bytes:
            raise ProtocolError("oversized", f"frame {i} has {len(f)} bytes, at most {limits.max_frame_bytes}")
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError("malformed", f"header is not UTF-8 JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError("malformed", "header is not a JSON object")
    if token is not None and (not isinstance(header.get("t"), str)
                              or not hmac.compare_digest(header["t"].encode(), token.encode())):
        raise ProtocolError("auth", "missing or wrong token (DSQ_PS_TOKEN)")
    if header.get("p") != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {header.get('p')!r}, this end speaks {PROTOCOL_VERSION}")
    if header.get("type") not in types:
        raise ProtocolError("bad_type", f"message type {header.get('type')!r}, expected one of {list(types)}")
    for key, kind in (("w", str), ("s", int)):
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            raise ProtocolError("bad_field", f"header field {key!r} must be a {kind.__name__}")
    return header, list(frames[1:])


def field(header: dict, key: str, kind, default=None):
    """`header[key]` checked to be of `kind` (a type or tuple); `default` when absent and a default is given."""
    if key not in header and default is not None:
        return default
    value = header.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ProtocolError("bad_field", f"header field {key!r} must be a {name}, got {value!r}")
    return value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ProtocolError("layout", f"dtype {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


Layout = List[Tuple[str, Tuple[int, ...], torch.dtype]]


def layout_of(named_tensors) -> Layout:
    """``[(name, shape, dtype), ...]`` of (name, tensor) pairs: the context every payload frame is read in."""
    return [(name, tuple(t.shape), t.dtype) for name, t in named_tensors]


def layout_to_json(layout: Layout) -> list:
    return [[name, list(shape), dtype_name(dt)] for name, shape, dt in layout]


def layout_from_json(value) -> Layout:
    """Parse a ``layout`` header field, checking every entry (names, non-negative int dims, float dtypes)."""
    if not isinstance(value, list) or not value:
        raise ProtocolError("layout", "layout must be a non-empty list of [name, shape, dtype]")
    out = []
    for entry in value:
        if (not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], str)
                or not isinstance(entry[1], list) or not isinstance(entry[2], str)
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 40 for d in entry[1])):
            raise ProtocolError("layout", f"bad layout entry {str(entry)[:200]}: expected [name, [dims], dtype]")
        out.append((entry[0], tuple(entry[1]), dtype_from_name(entry[2])))
    return out


def check_layout(expected: Layout, got: Layout) -> None:
    """Raise ``ProtocolError('layout')`` naming the first tensor whose name, shape or dtype differ."""
    if len(expected) != len(got):
        raise ProtocolError("layout", f"the server's model has {len(expected)} tensors, this one {len(got)}")
    for i, (e, g) in enumerate(zip(expected, got)):
        if e != g:
            raise ProtocolError("layout", f"tensor {i}: the server has {e[0]!r} {list(e[1])} {dtype_name(e[2])}, "
                                          f"this worker {g[0]!r} {list(g[1])} {dtype_name(g[2])} "
                                          "(shape/dtype mismatch: a different model?)")


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def header_summary(header: Dict) -> str:
    """The header without its token, for logs."""
    return json.dumps({k: v for k, v in header.items() if k != "t"})[:300]


def pack(codec, tensors, seed: int = 0) -> Tuple[List[bytes], list]:
    """Compress each tensor block by block (`BlockCodec`): ``(frames, dense)`` where ``frames[i]`` is the frame's
    bytes (copied to host memory once, wherever the tensor lives) and ``dense[i]`` the value the receiver will
    decode from it (on the tensor's device). `seed` is the frame seed of random compressors (sent in the header)."""
    frames, dense = [], []
    for t in tensors:
        frame, decoded = codec.encode(t, seed)
        frames.append(frame.cpu().numpy().tobytes())
        dense.append(decoded)
    return frames, dense


def frame_tensors(codec, frames: Sequence[bytes], layout: Layout) -> List[torch.Tensor]:
    """One uint8 tensor per layout entry from its frame, checking the frame count and each frame's exact size."""
    if len(frames) != len(layout):
        raise ProtocolError("bad_payload", f"{len(frames)} payload frames for a model of {len(layout)} tensors")
    out = []
    for i, (frame, (name, shape, dtype)) in enumerate(zip(frames, layout)):
        expected = codec.nbytes(numel(shape), dtype)
        if len(frame) != expected:
            raise ProtocolError("bad_payload", f"frame {i + 1} ({name!r}, {codec.spec}) has {len(frame)} "
                                               f"bytes, expected exactly {expected}")
        out.append(torch.frombuffer(bytearray(frame), dtype=torch.uint8) if expected
                   else torch.empty(0, dtype=torch.uint8))
    return out


def frames_finite(codec, frames: Sequence[torch.Tensor], layout: Layout) -> bool:
    """Whether every floating-point field of every frame is finite (see `BlockCodec.finite`)."""
    return all(codec.finite(f, numel(shape), dtype) for f, (_, shape, dtype) in zip(frames, layout))


def unpack(codec, frames: Sequence, layout: Layout, seed: int = 0, device=None) -> List[torch.Tensor]:
    """Decode one frame per layout entry (bytes, checked as `frame_tensors` does, or its tensors), on `device`."""
    if frames and not isinstance(frames[0], torch.Tensor):
        frames = frame_tensors(codec, frames, layout)
    return [codec.decode(f, shape, dtype, seed, device) for f, (_, shape, dtype) in zip(frames, layout)]


# ---------------------------------------------------------------------------------------------------------- keys
Key = Tuple[int, int, int]          # (tensor index in the layout, first element, one past the last element)

DEFAULT_KEY_ELEMS = 1 << 19


def split_keys(layout: Layout, block_size: int, key_elems: int = DEFAULT_KEY_ELEMS) -> List[Key]:
    """The model's keys: each tensor cut into pieces of `key_elems` elements (rounded up to whole blocks of
    `block_size`), in layout order. A piece starts on a block boundary, so compressing a key block by block gives
    exactly the blocks of the whole tensor; its frame is the next one of a message."""
    step = max(1, -(-key_elems // block_size)) * block_size
    keys = []
    for i, (_, shape, _) in enumerate(layout):
        n = numel(shape)
        keys += [(i, a, min(a + step, n)) for a in range(0, n, step)] or [(i, 0, 0)]
    return keys


def partition(keys: Sequence[Key], parts: int) -> List[Tuple[int, int]]:
    """`parts` contiguous ranges ``[k0, k1)`` of `keys`, each about an equal share of the elements (as ps-lite
    and BytePS partition keys over servers); every range holds at least one key."""
    if parts < 1 or parts > len(keys):
        raise ValueError(f"cannot split a model of {len(keys)} keys into {parts} parts (1 to {len(keys)})")
    sizes = [max(1, b - a) for _, a, b in keys]
    total, bounds, acc, k = sum(sizes), [0], 0, 0
    for p in range(1, parts):
        target = total * p / parts
        while k < len(keys) - (parts - p) and (acc + sizes[k] / 2 < target or k < bounds[-1] + 1):
            acc += sizes[k]
            k += 1
        bounds.append(k)
    bounds.append(len(keys))
    return list(zip(bounds[:-1], bounds[1:]))


def key_layout(layout: Layout, keys: Sequence[Key]) -> Layout:
    """The layout of the frames of `keys`: one 1-D entry per key (``name[a:b]``), in the tensor's dtype."""
    return [(f"{layout[i][0]}[{a}:{b}]", (b - a,), layout[i][2]) for i, a, b in keys]


def key_seed(seed: int, key: int) -> int:
    """The frame seed of key `key` (its index among the model's keys) in a message whose header says `seed`:
    random compressors draw independently per key (the codec numbers blocks from 0 in every frame)."""
    return (seed + 0x9E3779B9 * key) & 0xFFFFFFFF

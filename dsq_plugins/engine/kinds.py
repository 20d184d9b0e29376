"""The engine's small vocabularies: which pass, which rows, which side of the algorithm, which seed table.

Enums rather than strings, so that a typo is an error at import and the choices are listed in one place."""
from enum import Enum, IntEnum

__all__ = ["Pass", "Rows", "Side", "SeedSite", "TailSlots"]


class Pass(IntEnum):
    """The two passes of a round. The value enters every seed (`rng.static_seed`): keep 0 and 1."""

    UP = 0        # the worker pass: each rank sends each block's owner C_w(g + e_i)
    DOWN = 1      # the server pass: each owner sends every rank C_s(mean + e)


class Rows(Enum):
    """The two kinds of compressed rows of a bucket: full blocks of `block_size` elements, in a (R, B) batch, and
    each tensor's last, shorter block, in a (T, cap) batch padded to the longest."""

    FULL = "full"
    TAIL = "tail"


class Side(Enum):
    """Whose residual: a worker's `e_i` (every block, every rank) or the server's `e` (the blocks a rank owns)."""

    WORKER = "worker"
    SERVER = "server"


class SeedSite(Enum):
    """Where a random compressor runs, hence which blocks' seeds a rank needs (module `bucket`)."""

    SEND = "send"      # this rank encodes its uplink: every block, tensor order
    RECV = "recv"      # this rank, an owner, decodes each sender's uplink: its owned blocks, one table per sender
    OWN = "own"        # this rank, an owner, encodes its downlink: its owned blocks
    GATHER = "gather"  # every rank decodes every owner's downlink: every block, tensor order


class TailSlots(Enum):
    """Which tail rows a `WireLayout.tail_index` table addresses, and in which buffer."""

    ALL = "all"              # every tail row (tensor order) in the buffer of all W messages
    MINE_UP = "mine_up"      # this rank's owned tail rows (server order) in one uplink message to this rank
    MINE_DOWN = "mine_down"  # the same rows in this rank's own downlink message

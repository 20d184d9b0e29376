"""Asynchronous parameter server for DoubleSqueeze: compressed, error-compensated pushes and pulls over ZeroMQ.

- `ParameterServer`: holds the model, applies pushes as they arrive with a staleness-aware step and bound,
  compresses each worker's downlink against the copy it holds (server.py; sessions and staleness in sessions.py,
  the shard threads and their jobs in shards.py, its TensorBoard log in telemetry.py).
- `Worker`: pulls, pushes with its residual, heartbeats, rejoins after a server restart; `Worker.from_env` and
  `Worker.step` are the training-loop helper (worker.py).
- the wire format: JSON header + one `BlockCodec` frame per key (a tensor, or a block-aligned piece of one), no
  pickle (protocol.py).
- `dsq-async-ps`: the launcher (launcher.py); checkpoints and their writer (checkpoint.py).
"""
from .protocol import PROTOCOL_VERSION, Limits, ProtocolError
from .server import STALENESS_POLICIES, ParameterServer
from .worker import ServerError, ServerLost, StepResult, Worker

__all__ = ["PROTOCOL_VERSION", "Limits", "ParameterServer", "ProtocolError", "STALENESS_POLICIES", "ServerError",
           "ServerLost", "StepResult", "Worker"]

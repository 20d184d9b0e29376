"""dsq_plugins: DoubleSqueeze (Tang et al., ICML 2019), double-pass error-compensated compressed SGD.

The core: compressors and their wire payloads, the block-wise engine and the double-pass collective, the PyTorch
DDP communication hook, the single-process reference `Simulator`, and TensorBoard monitoring. The Horovod,
DeepSpeed and async parameter-server integrations are thin adapters over these.
"""
from .engine.collective import DoubleSqueezeCollective
from .engine.communicator import Communicator, TorchDistributedCommunicator
from .compression.compressors import Compressor
from .config import DivergenceWarning, DoubleSqueezeConfig
from .frontends.ddp_hook import DoubleSqueezeState, doublesqueeze_hook
from .engine.memory import ErrorFeedback
from .engine.guard import QualityWarning
from .monitoring.monitor import Monitor, RoundStats, TensorBoardMonitor
from .frontends.optim import DoubleSqueezeAdamW
from .compression.payload import Payload
from .compression.registry import ENTRY_POINT_GROUP, available_compressors, get_compressor, register_compressor
from .engine.simulator import Simulator
from .engine.threadcomm import ThreadWorld

__version__ = "0.2.0"

__all__ = [
    "Communicator", "Compressor", "DivergenceWarning", "DoubleSqueezeAdamW", "DoubleSqueezeCollective", "Monitor",
    "DoubleSqueezeConfig", "DoubleSqueezeState", "QualityWarning", "ENTRY_POINT_GROUP", "ErrorFeedback", "Payload", "RoundStats", "Simulator",
    "TensorBoardMonitor", "ThreadWorld",
    "TorchDistributedCommunicator", "available_compressors", "doublesqueeze_hook", "get_compressor",
    "register_compressor",
]

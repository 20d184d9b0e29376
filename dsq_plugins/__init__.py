"""dsq_plugins: DoubleSqueeze (Tang et al., ICML 2019), double-pass error-compensated compressed SGD.

The core: compressors and their wire payloads, the block-wise engine and the double-pass collective, the PyTorch
DDP communication hook, the single-process reference `Simulator`, and TensorBoard monitoring. The Horovod,
DeepSpeed and async parameter-server integrations are thin adapters over these.
"""
from .collective import DoubleSqueezeCollective
from .communicator import Communicator, TorchDistributedCommunicator
from .compressors import Compressor
from .config import DivergenceWarning, DoubleSqueezeConfig
from .ddp_hook import DoubleSqueezeState, doublesqueeze_hook
from .memory import ErrorFeedback
from .guard import QualityWarning
from .monitor import Monitor, RoundStats, TensorBoardMonitor
from .optim import DoubleSqueezeAdamW
from .payload import Payload
from .registry import ENTRY_POINT_GROUP, available_compressors, get_compressor, register_compressor
from .simulator import Simulator
from .threadcomm import ThreadWorld

__version__ = "0.2.0"

__all__ = [
    "Communicator", "Compressor", "DivergenceWarning", "DoubleSqueezeAdamW", "DoubleSqueezeCollective", "Monitor",
    "DoubleSqueezeConfig", "DoubleSqueezeState", "QualityWarning", "ENTRY_POINT_GROUP", "ErrorFeedback", "Payload", "RoundStats", "Simulator",
    "TensorBoardMonitor", "ThreadWorld",
    "TorchDistributedCommunicator", "available_compressors", "doublesqueeze_hook", "get_compressor",
    "register_compressor",
]

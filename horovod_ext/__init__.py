"""DoubleSqueeze for Horovod: compressors in Horovod's API, a DistributedOptimizer that moves compressed bytes,
and the `dsq-horovodrun` flag.

    import horovod.torch as hvd, horovod_ext
    hvd.init()
    optimizer = horovod_ext.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                                 compression=horovod_ext.Compression.sign)

or leave `compression` out and launch with ``dsq-horovodrun --dsq-compressor sign -np 4 python train.py``.
"""
from .communicator import HorovodCommunicator
from .compression import Compression, DoubleSqueezeCompressor
from .optimizer import DistributedOptimizer

__all__ = ["Compression", "DistributedOptimizer", "DoubleSqueezeCompressor", "HorovodCommunicator"]

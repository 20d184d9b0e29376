"""DoubleSqueeze's compressors in Horovod's compressor API (`horovod.torch.compression.Compressor`).

    from horovod_ext import Compression
    Compression.none, Compression.fp16, Compression.bf16, Compression.sign, Compression.int8,
    Compression.topk(0.01), Compression.randomk(0.01), Compression.qsgd(16), Compression.from_spec("int8:256")

Only a compressor whose compressed tensor Horovod's allreduce can sum (`summable`: `none` and `fp16`) works in
the stock `hvd.DistributedOptimizer`, exactly as Horovod's own. The others produce packed bytes (sign bits,
indices, levels) that an allreduce cannot add up; in the stock optimizer their `compress` raises a TypeError
that points to `horovod_ext.DistributedOptimizer`, which runs them through the double pass instead. `bf16` is
in that group too: Horovod 0.28's allreduce refuses bfloat16 tensors.
"""
import horovod.torch.compression as hvd_compression

from dsq_plugins.compression.registry import get_compressor

__all__ = ["Compression", "DoubleSqueezeCompressor"]


class DoubleSqueezeCompressor(hvd_compression.Compressor):
    """A core compressor, named by its spec (``"sign"``, ``"topk:0.01"``...), in Horovod's API."""

    summable = False

    def __init__(self, spec: str):
        self.spec = get_compressor(spec).spec     # validates: a bad spec raises ValueError naming the valid ones

    def compress(self, tensor):
        raise TypeError(
            f"Compression {self.spec!r} packs gradients into bytes that an allreduce cannot sum, so the stock "
            f"hvd.DistributedOptimizer cannot use it. Use horovod_ext.DistributedOptimizer(optimizer, "
            f"named_parameters=..., compression=horovod_ext.Compression.from_spec({self.spec!r})), which sends "
            f"it through DoubleSqueeze's double pass.")

    def decompress(self, tensor, ctx):
        self.compress(tensor)

    def __repr__(self):
        return f"horovod_ext.Compression.from_spec({self.spec!r})"


class _Summable(DoubleSqueezeCompressor):
    """Horovod's own compressor for this spec, unchanged in the stock optimizer's allreduce."""

    summable = True

    def __init__(self, spec: str, horovod_compressor):
        super().__init__(spec)
        self._horovod = horovod_compressor

    def compress(self, tensor):
        return self._horovod.compress(tensor)

    def decompress(self, tensor, ctx):
        return self._horovod.decompress(tensor, ctx)


class Compression:
    """The compressors, by name, as in `hvd.Compression`. Parametrised ones are functions."""

    none = _Summable("none", hvd_compression.Compression.none)
    fp16 = _Summable("fp16", hvd_compression.Compression.fp16)
    bf16 = DoubleSqueezeCompressor("bf16")
    sign = DoubleSqueezeCompressor("sign")
    int8 = DoubleSqueezeCompressor("int8")

    @staticmethod
    def topk(ratio: float) -> DoubleSqueezeCompressor:
        """The `ratio` (0 < ratio <= 1) of entries of largest magnitude, with their indices."""
        return DoubleSqueezeCompressor(f"topk:{ratio}")

    @staticmethod
    def randomk(ratio: float) -> DoubleSqueezeCompressor:
        """A shared random `ratio` of entries, scaled by 1/ratio (unbiased)."""
        return DoubleSqueezeCompressor(f"randomk:{ratio}")

    @staticmethod
    def qsgd(levels: int) -> DoubleSqueezeCompressor:
        """QSGD with `levels` levels and stochastic rounding (unbiased)."""
        return DoubleSqueezeCompressor(f"qsgd:{levels}")

    @staticmethod
    def from_spec(spec: str) -> DoubleSqueezeCompressor:
        """Any compressor of the core's registry, third-party ones included, by its spec string."""
        for summable in (Compression.none, Compression.fp16):
            if get_compressor(spec).spec == summable.spec:
                return summable
        return DoubleSqueezeCompressor(spec)

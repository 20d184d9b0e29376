"""`hvd.DistributedOptimizer` switched by `dsq-horovodrun --dsq-compressor ...` in scripts that never import
`horovod_ext` (see `dsq_autohook`): under the flag (environment variable ``DSQ_HOROVOD_CONFIG``) it is
`horovod_ext.DistributedOptimizer`; without it nothing is changed."""
import functools
import os

__all__ = ["patch"]


def patch(hvd) -> None:
    """Under the flag, replace `hvd.DistributedOptimizer` (once); the original stays as
    `hvd._dsq_original_DistributedOptimizer`."""
    from .flags import ENV_CONFIG

    if not os.environ.get(ENV_CONFIG) or getattr(hvd, "_dsq_original_DistributedOptimizer", None) is not None:
        return
    original = hvd.DistributedOptimizer

    @functools.wraps(original)
    def DistributedOptimizer(optimizer, *args, **kwargs):
        from .optimizer import DistributedOptimizer as doublesqueeze_optimizer
        return doublesqueeze_optimizer(optimizer, *args, **kwargs)

    hvd._dsq_original_DistributedOptimizer = original
    hvd.DistributedOptimizer = DistributedOptimizer

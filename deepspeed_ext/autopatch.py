"""`deepspeed.initialize` with DoubleSqueeze, for programs that never import `deepspeed_ext` (see `dsq_autohook`):
any caller of `deepspeed.initialize` whose config enables the "doublesqueeze" section gets it installed in the
engine, and a section the engine cannot honour fails before training with the reason."""
import functools

__all__ = ["patch"]


def patch(deepspeed) -> None:
    """Wrap `deepspeed.initialize` (once); the original stays as `deepspeed._dsq_original_initialize`."""
    if getattr(deepspeed, "_dsq_original_initialize", None) is not None:
        return
    original = deepspeed.initialize

    @functools.wraps(original)
    def initialize(*args, **kwargs):
        from deepspeed_ext import initialize_with         # on first use: importing DeepSpeed stays as cheap as it was
        return initialize_with(original, *args, **kwargs)

    deepspeed._dsq_original_initialize = original
    deepspeed.initialize = initialize

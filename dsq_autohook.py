"""Switches DoubleSqueeze on in programs that import only DeepSpeed or Horovod, with no edit to the script.

`doublesqueeze.pth`, which the package installs into site-packages, runs ``import dsq_autohook`` at interpreter
start. That is all it does then: it puts an import hook on `sys.meta_path` and imports nothing else (no torch), so
a program that never imports DeepSpeed or Horovod pays a dictionary look-up per import. When a program imports

- ``deepspeed``: `deepspeed.initialize` is wrapped (`deepspeed_ext.autopatch`), so that any caller (a script, the
  Hugging Face Trainer through Accelerate, Lightning's DeepSpeedStrategy) gets DoubleSqueeze when its config has
  ``"doublesqueeze": {"enabled": true, ...}``, and stock DeepSpeed otherwise;
- ``horovod.torch`` under ``dsq-horovodrun --dsq-compressor ...`` (environment variable ``DSQ_HOROVOD_CONFIG``):
  `hvd.DistributedOptimizer` becomes `horovod_ext.DistributedOptimizer` (`horovod_ext.autopatch`).

``DSQ_AUTOHOOK=0`` in the environment turns it all off (the explicit forms `deepspeed_ext.initialize` and
`horovod_ext.DistributedOptimizer` keep working).
"""
import importlib.abc
import importlib.util
import os
import sys

__all__ = ["ENV", "install", "installed"]

ENV = "DSQ_AUTOHOOK"
# module imported -> "module:function" run on it right after it has executed
_PATCHES = {"deepspeed": "deepspeed_ext.autopatch:patch",
            "horovod.torch": "horovod_ext.autopatch:patch"}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, patch: str):
        self.inner, self.patch = inner, patch

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        name, _, func = self.patch.partition(":")
        getattr(importlib.import_module(name), func)(module)

    def __getattr__(self, name):                  # get_resource_reader, is_package, ... of the real loader
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self._looking = set()

    def find_spec(self, fullname, path=None, target=None):
        patch = _PATCHES.get(fullname)
        if patch is None or fullname in self._looking:
            return None
        self._looking.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)         # the real one, from the finders after this one
        finally:
            self._looking.discard(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, patch)
        return spec


def installed() -> bool:
    return any(isinstance(f, _Finder) for f in sys.meta_path)


def install() -> None:
    """Put the import hook in place (once), unless ``DSQ_AUTOHOOK=0``."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off") or installed():
        return
    sys.meta_path.insert(0, _Finder())


install()

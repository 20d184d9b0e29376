"""Compressors by name: built-ins, `register_compressor`, and the entry-point group ``dsq_plugins.compressors``.

A spec is ``"name"`` or ``"name:arg"`` (``"topk:0.01"``), or a sparsifier and a quantiser of the values it keeps
joined by ``+`` (``"topk:0.01+int4"``). A factory is a callable ``factory(arg)`` that returns a
`Compressor`; ``arg`` is the text after the colon, or None. A third-party package adds one without touching ours
by declaring, in its packaging metadata::

    [options.entry_points]
    dsq_plugins.compressors =
        mine = mypackage.compression:MyCompressor
"""
from importlib import metadata
from typing import Callable, Dict, List, Optional

import torch

from .compressors import (CastCompressor, ComposedCompressor, Compressor, GroupTopKCompressor, IntCompressor,
                          NoneCompressor, QSGDCompressor, RandomKCompressor, SignCompressor, TopKCompressor)
from .payload import set_spec_resolver

__all__ = ["ENTRY_POINT_GROUP", "register_compressor", "get_compressor", "available_compressors"]

ENTRY_POINT_GROUP = "dsq_plugins.compressors"

Factory = Callable[[Optional[str]], Compressor]


def _no_arg(cls_or_fn, name):
    def factory(arg):
        if arg is not None:
            raise ValueError(f"compressor {name!r} takes no argument, got {name}:{arg}")
        return cls_or_fn()
    return factory


_BUILTINS: Dict[str, Factory] = {
    "none": _no_arg(NoneCompressor, "none"),
    "fp16": _no_arg(lambda: CastCompressor("fp16", torch.float16), "fp16"),
    "bf16": _no_arg(lambda: CastCompressor("bf16", torch.bfloat16), "bf16"),
    "sign": _no_arg(SignCompressor, "sign"),
    "topk": TopKCompressor,
    "grouptopk": GroupTopKCompressor,
    "randomk": RandomKCompressor,
    "qsgd": QSGDCompressor,
    "int8": lambda arg: IntCompressor("int8", 8, arg),
    "int4": lambda arg: IntCompressor("int4", 4, arg),
    "int2": lambda arg: IntCompressor("int2", 2, arg),
}
_registered: Dict[str, Factory] = {}


def register_compressor(name: str, factory: Factory, *, override: bool = False) -> None:
    """Make `name` available to `get_compressor`. `factory(arg)` returns a `Compressor`."""
    if not name or ":" in name or "+" in name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"a compressor name is letters, digits, '_' and '-', got {name!r}")
    if not override and name in _all_factories():
        raise ValueError(f"compressor {name!r} is already registered; pass override=True to replace it")
    if not callable(factory):
        raise TypeError(f"the factory for {name!r} must be callable, got {factory!r}")
    _registered[name] = factory


def _entry_points() -> Dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _all_factories() -> Dict[str, object]:
    found: Dict[str, object] = dict(_entry_points())
    found.update(_BUILTINS)
    found.update(_registered)
    return found


def available_compressors() -> List[str]:
    """Sorted names: built-ins, registered, and those of installed entry points."""
    return sorted(_all_factories())


def get_compressor(spec) -> Compressor:
    """``"name"`` or ``"name:arg"`` -> a `Compressor`. A `Compressor` passes through. Raises ValueError naming
    the valid compressors for an unknown name or a malformed spec."""
    if isinstance(spec, Compressor):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a compressor spec is a string 'name' or 'name:arg', got {spec!r}; "
                         f"valid names: {', '.join(available_compressors())}")
    if "+" in spec:
        parts = [p.strip() for p in spec.split("+")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"a composed spec is 'sparsifier+quantiser' (e.g. 'topk:0.01+int4'), got {spec!r}")
        return ComposedCompressor(get_compressor(parts[0]), get_compressor(parts[1]))
    name, _, arg = spec.strip().partition(":")
    # Built-ins and registered names first: scanning the installed entry points costs milliseconds per call.
    factories = _registered if name in _registered else _BUILTINS if name in _BUILTINS else _all_factories()
    if name not in factories:
        raise ValueError(f"unknown compressor {name!r} in spec {spec!r}; valid names: "
                         f"{', '.join(sorted(factories))} (spec 'name' or 'name:arg', e.g. 'topk:0.01')")
    factory = factories[name]
    if isinstance(factory, metadata.EntryPoint):
        factory = factory.load()
    compressor = factory(arg if _ else None)
    if not isinstance(compressor, Compressor):
        raise TypeError(f"the factory of compressor {name!r} returned {compressor!r}, not a dsq_plugins.Compressor")
    return compressor


set_spec_resolver(get_compressor)

"""Compressors by name: `get_compressor`, `available_compressors`, `register_compressor`, and third-party
compressors found through the entry-point group ``dsq_plugins.compressors`` of an installed distribution."""
import importlib
import sys
import textwrap

import pytest
import torch

import dsq_plugins as dsq
from dsq_plugins.compression import registry
from dsq_plugins.compression.compressors import Compressor, TopKCompressor
from dsq_plugins.compression.payload import Payload

BUILTINS = ["bf16", "fp16", "grouptopk", "int2", "int4", "int8", "none", "qsgd", "randomk", "sign", "topk"]


@pytest.fixture(autouse=True)
def clean_registry():
    saved = dict(registry._registered)
    registry._registered.clear()
    yield
    registry._registered.clear()
    registry._registered.update(saved)


def test_available_lists_builtins_sorted():
    names = dsq.available_compressors()
    assert names == sorted(names)
    assert set(BUILTINS) <= set(names)
    assert dsq.ENTRY_POINT_GROUP == "dsq_plugins.compressors"


@pytest.mark.parametrize("spec,cls_name,canonical", [
    ("none", "NoneCompressor", "none"), ("fp16", "CastCompressor", "fp16"), ("bf16", "CastCompressor", "bf16"),
    ("sign", "SignCompressor", "sign"), ("topk:0.01", "TopKCompressor", "topk:0.01"),
    ("topk", "TopKCompressor", "topk:0.01"), ("topk:1e-2", "TopKCompressor", "topk:0.01"),
    (" topk:0.5 ", "TopKCompressor", "topk:0.5"), ("topk:1", "TopKCompressor", "topk:1.0"),
    ("randomk:0.25", "RandomKCompressor", "randomk:0.25"), ("qsgd:16", "QSGDCompressor", "qsgd:16"),
    ("qsgd", "QSGDCompressor", "qsgd:16"), ("int8", "IntCompressor", "int8"),
    ("int8:256", "IntCompressor", "int8:256"), ("int4", "IntCompressor", "int4"),
    ("int2:64", "IntCompressor", "int2:64"), ("topk:0.01+int4", "ComposedCompressor", "topk:0.01+int4"),
    (" topk + sign", "ComposedCompressor", "topk:0.01+sign"),
    ("randomk:0.5+int8:64", "ComposedCompressor", "randomk:0.5+int8:64"),
    ("grouptopk:0.03", "GroupTopKCompressor", "grouptopk:0.03"),
    ("grouptopk:0.03+sign", "ComposedCompressor", "grouptopk:0.03+sign"),
])
def test_get_compressor(spec, cls_name, canonical):
    c = dsq.get_compressor(spec)
    assert isinstance(c, Compressor) and type(c).__name__ == cls_name
    assert c.spec == canonical
    assert dsq.get_compressor(c.spec) == c                      # the spec round-trips
    assert dsq.get_compressor(c) is c                           # a Compressor passes through
    x = torch.randn(3, 50)
    assert dsq.get_compressor(spec).decompress(c.compress(x, seed=1)).shape == x.shape


def test_every_builtin_name_works_bare():
    for name in BUILTINS:
        assert dsq.get_compressor(name).spec.partition(":")[0] == name


@pytest.mark.parametrize("spec", ["nope", "nope:1", "topK", "SIGN", ":0.1"])
def test_unknown_name_lists_valid_ones(spec):
    with pytest.raises(ValueError) as err:
        dsq.get_compressor(spec)
    for name in BUILTINS:
        assert name in str(err.value)


@pytest.mark.parametrize("spec", ["", "   ", None, 3, 0.01, b"sign", ["sign"]])
def test_not_a_spec_lists_valid_ones(spec):
    with pytest.raises(ValueError) as err:
        dsq.get_compressor(spec)
    for name in BUILTINS:
        assert name in str(err.value)


@pytest.mark.parametrize("spec", ["topk:2", "topk:0", "topk:-0.1", "topk:abc", "topk:", "topk:nan", "topk:inf",
                                  "randomk:1.5", "randomk:x", "qsgd:0", "qsgd:256", "qsgd:1.5", "qsgd:x",
                                  "int8:0", "int8:-4", "int8:x", "sign:1", "none:0", "fp16:x", "bf16:", "sign:",
                                  "int4:0", "int2:x", "topk:2+int4", "topk+int4:0", "topk+", "+int4", "topk+int4+sign",
                                  "nope+int4", "topk+nope"])
def test_malformed_spec(spec):
    with pytest.raises(ValueError):
        dsq.get_compressor(spec)


@pytest.mark.parametrize("spec,why", [("sign+int4", "sparsifier"), ("int4+sign", "sparsifier"),
                                      ("topk+randomk", "quantiser"), ("topk+topk:0.1", "quantiser")])
def test_composition_says_which_part_is_wrong(spec, why):
    with pytest.raises(ValueError, match=why):
        dsq.get_compressor(spec)


class Halve(Compressor):
    """A toy compressor: values halved on the wire, doubled back."""

    name = "halve"

    def layout(self, numel, dtype):
        return [("values", dtype, numel)]

    def _compress(self, flat, seed):
        return {"values": flat / 2}

    def _decompress(self, payload, numel, dtype):
        return payload.fields["values"] * 2


def test_register_compressor():
    assert "halve" not in dsq.available_compressors()
    dsq.register_compressor("halve", lambda arg: Halve(arg))
    assert "halve" in dsq.available_compressors()
    assert dsq.available_compressors() == sorted(dsq.available_compressors())
    c = dsq.get_compressor("halve")
    assert isinstance(c, Halve) and c.spec == "halve"
    assert dsq.get_compressor("halve:x").spec == "halve:x"    # the argument reaches the factory
    x = torch.randn(4, 5)
    p = c.compress(x)
    assert p.nbytes == len(p.to_bytes()) == c.nbytes(20, torch.float32) == 80
    assert torch.equal(c.decompress(Payload.from_bytes(p.to_bytes(), p.spec, x.shape, x.dtype)), x)


def test_register_compressor_rules():
    with pytest.raises(ValueError):
        dsq.register_compressor("sign", Halve)                  # taken by a built-in
    dsq.register_compressor("halve", Halve)
    with pytest.raises(ValueError):
        dsq.register_compressor("halve", Halve)                 # taken by a registration
    dsq.register_compressor("halve", lambda arg: TopKCompressor("0.5"), override=True)
    assert isinstance(dsq.get_compressor("halve"), TopKCompressor)
    for bad in ("", "a:b", "a b", "x/y"):
        with pytest.raises(ValueError):
            dsq.register_compressor(bad, Halve)
    with pytest.raises(TypeError):
        dsq.register_compressor("notcallable", 42)
    assert "notcallable" not in dsq.available_compressors()


def test_override_builtin_and_clean_up():
    dsq.register_compressor("sign", lambda arg: Halve(arg), override=True)
    assert isinstance(dsq.get_compressor("sign"), Halve)
    registry._registered.clear()
    assert type(dsq.get_compressor("sign")).__name__ == "SignCompressor"


def test_factory_must_return_a_compressor():
    dsq.register_compressor("bogus", lambda arg: "not a compressor")
    with pytest.raises(TypeError):
        dsq.get_compressor("bogus")


def test_registration_does_not_leak_between_tests():
    assert "halve" not in dsq.available_compressors()
    assert "bogus" not in dsq.available_compressors()


# --------------------------------------------------------------------------------------------- entry points


PLUGIN_MODULE = '''
import torch
from dsq_plugins import Compressor


class NegateCompressor(Compressor):
    """Third-party toy: the negated values on the wire, an optional fp32 offset argument."""

    name = "{name}"

    def __init__(self, arg=None):
        self.offset = 0.0 if arg is None else float(arg)
        super().__init__(arg)

    def layout(self, numel, dtype):
        return [("values", dtype, numel)]

    def _compress(self, flat, seed):
        return {{"values": -(flat + self.offset)}}

    def _decompress(self, payload, numel, dtype):
        return -payload.fields["values"] - self.offset
'''


def make_distribution(root, dist: str, module: str, name: str):
    """A real installed distribution under `root`: a module and its ``<dist>-0.1.dist-info`` with METADATA and
    an entry_points.txt declaring `name` in the group ``dsq_plugins.compressors``."""
    (root / f"{module}.py").write_text(PLUGIN_MODULE.format(name=name))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [dsq_plugins.compressors]
        {name} = {module}:NegateCompressor
        """))
    (info / "RECORD").write_text("")


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    make_distribution(tmp_path, "dsq_negate_plugin", "dsq_negate_plugin", "negate")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield "negate"
    sys.modules.pop("dsq_negate_plugin", None)


def test_entry_point_not_there_without_the_distribution():
    assert "negate" not in dsq.available_compressors()
    with pytest.raises(ValueError):
        dsq.get_compressor("negate")


def test_entry_point_compressor(plugin):
    from importlib import metadata

    eps = metadata.entry_points(group="dsq_plugins.compressors")
    assert plugin in eps.names                                 # visible to the standard machinery
    assert "dsq_negate_plugin" not in sys.modules               # nothing imported just by listing
    names = dsq.available_compressors()
    assert plugin in names and names == sorted(names)
    assert "dsq_negate_plugin" not in sys.modules

    c = dsq.get_compressor(plugin)
    assert type(c).__name__ == "NegateCompressor" and c.spec == "negate"
    x = torch.randn(6, 7, dtype=torch.float64)
    p = c.compress(x)
    assert torch.equal(p.fields["values"], -x.reshape(-1))
    data = p.to_bytes()
    assert len(data) == p.nbytes == c.nbytes(x.numel(), x.dtype)
    y = c.decompress(Payload.from_bytes(data, p.spec, x.shape, x.dtype))  # found again by spec
    assert y.shape == x.shape and y.dtype == x.dtype and torch.equal(y, x)

    c2 = dsq.get_compressor("negate:1.5")                          # with an argument
    assert c2.spec == "negate:1.5"
    assert torch.equal(c2.compress(x).fields["values"], -(x.reshape(-1) + 1.5))
    torch.testing.assert_close(c2.decompress(c2.compress(x)), x)


def test_entry_point_cannot_shadow_builtin_but_blocks_registration(tmp_path, monkeypatch):
    make_distribution(tmp_path, "dsq_shadow_plugin", "dsq_shadow_plugin", "sign")
    make_distribution(tmp_path, "dsq_other_plugin", "dsq_other_plugin", "other")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        assert type(dsq.get_compressor("sign")).__name__ == "SignCompressor"    # built-ins win
        assert dsq.available_compressors().count("sign") == 1
        assert "other" in dsq.available_compressors()
        with pytest.raises(ValueError):
            dsq.register_compressor("other", Halve)                              # taken by the entry point
        dsq.register_compressor("other", Halve, override=True)
        assert isinstance(dsq.get_compressor("other"), Halve)
    finally:
        for m in ("dsq_shadow_plugin", "dsq_other_plugin"):
            sys.modules.pop(m, None)


def test_int8_default_chunk_is_one_spec():
    assert dsq.get_compressor("int8:512") == dsq.get_compressor("int8")
    assert dsq.get_compressor("int8:512").spec == "int8"


@pytest.mark.parametrize("spec", ["sign", "topk:0.1", "randomk:0.1", "qsgd:4", "int8"])
def test_empty_tensor_is_a_clear_error(spec):
    with pytest.raises(ValueError, match="empty tensor"):
        dsq.get_compressor(spec).compress(torch.empty(0))
    for ok in ("none", "fp16", "bf16"):
        assert dsq.get_compressor(ok).compress(torch.empty(0)).nbytes == 0

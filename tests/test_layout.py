"""The package's layout (docs/ARCHITECTURE.md section 2): no import cycle among dsq_plugins' modules, function-level
imports included; the subpackages import each other in one direction only; the public API is where the README
says it is."""
import ast
from pathlib import Path

import dsq_plugins as dsq

from .conftest import ROOT

PKG = ROOT / "dsq_plugins"
# Which subpackage may import which (config and the package's face at the top level).
ALLOWED = {"compression": set(), "monitoring": set(), "config": {"compression"},
           "engine": {"compression", "config", "monitoring"},
           "frontends": {"compression", "config", "engine", "monitoring"}}


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set) -> set:
    """The dsq_plugins modules `path` imports, at any depth of its code."""
    here = module_of(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != here}


def graph():
    files = sorted(PKG.rglob("*.py"))
    modules = {module_of(f) for f in files}
    return {module_of(f): imports(f, modules) for f in files}


def test_no_import_cycle():
    g = graph()
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"
    for m in sorted(g):
        if m not in state:
            visit(m)
    assert len(g) > 20 and any(g.values()), "the graph was not read"


def test_subpackages_import_in_one_direction():
    def group(m):
        parts = m.split(".")
        return parts[1] if len(parts) > 1 else "face"
    for m, targets in graph().items():
        if group(m) in ("face", "hf_trainer", "lightning_callback", "fsdp"):
            continue                                   # the package's face and the README's import paths
        for t in targets:
            if group(t) != group(m):
                assert group(t) in ALLOWED[group(m)], f"{m} imports {t}"


def test_public_api_is_where_the_readme_says():
    from dsq_plugins.hf_trainer import DoubleSqueezeCallback as Trainer
    from dsq_plugins.lightning_callback import DoubleSqueezeCallback as Lightning
    assert Trainer.__module__ == "dsq_plugins.frontends.hf_trainer"
    assert Lightning.__module__ == "dsq_plugins.frontends.lightning_callback"
    from dsq_plugins.fsdp import install
    assert install.__module__ == "dsq_plugins.frontends.fsdp"
    for name in dsq.__all__:
        assert getattr(dsq, name) is not None, name
    assert {"DoubleSqueezeState", "doublesqueeze_hook", "DoubleSqueezeConfig", "DoubleSqueezeAdamW", "Simulator",
            "TensorBoardMonitor", "Payload", "get_compressor", "register_compressor"} <= set(dsq.__all__)

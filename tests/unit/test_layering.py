"""Dependencies point one way: every import inside spark_megatron (module level and inside functions) goes to a
lower layer of docs/architecture.md, or stays inside its own package. The layers are read from that page, so the
rule tested here and the rule documented there are the same data. Private names (`_x`) are not imported across
modules.
"""
import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "spark_megatron"
DOC = REPO / "docs" / "architecture.md"


def documented_layers() -> dict:
    """unit (a subpackage or a top-level module of spark_megatron) -> layer number, from the fenced block after
    `<!-- layers -->` in docs/architecture.md."""
    text = DOC.read_text()
    block = text.split("<!-- layers -->", 1)[1].split("```", 2)[1]
    layers = {}
    for line in block.splitlines():
        m = re.match(r"\s*(\d+)\s+(.+?)\s*$", line)
        if m:
            for unit in m.group(2).split():
                assert unit not in layers, f"{unit} is in two layers of {DOC.name}"
                layers[unit] = int(m.group(1))
    return layers


def _modules() -> dict:
    """dotted module name -> path, for every module of the package."""
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _target(name: str, modules: dict):
    """The longest module prefix of a dotted name (`pkg.mod.Class` -> `pkg.mod`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_edges() -> list:
    """(importing module, imported module, line, imported name) for every import of a spark_megatron module."""
    modules, edges = _modules(), []
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    parent = parent[:len(parent) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                names = [(f"{base}.{a.name}", a.name) for a in node.names]
            else:
                continue
            for dotted, name in names:
                if dotted.startswith("spark_megatron"):
                    target = _target(dotted, modules)
                    if target and target != mod:
                        edges.append((mod, target, node.lineno, name))
    return edges


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "spark_megatron"


def test_every_package_and_module_has_a_layer():
    layers = documented_layers()
    units = {unit_of(m) for m in _modules()} - {"spark_megatron"}
    assert not units - set(layers), f"not in {DOC.name}'s layer table: {sorted(units - set(layers))}"
    assert not set(layers) - units, f"{DOC.name} lists what does not exist: {sorted(set(layers) - units)}"


def test_imports_point_down_the_layers():
    layers = {**documented_layers(), "spark_megatron": -1}
    wrong = []
    for src, dst, line, _ in import_edges():
        a, b = unit_of(src), unit_of(dst)
        if a != b and layers[b] >= layers[a]:
            wrong.append(f"{src} (layer {layers[a]}) imports {dst} (layer {layers[b]}) at line {line}")
    assert not wrong, "imports against docs/architecture.md:\n" + "\n".join(sorted(set(wrong)))


def test_no_private_name_is_imported_from_another_module():
    private = [f"{src} imports {dst}.{name} (line {line})" for src, dst, line, name in import_edges()
               if name and name.startswith("_") and not name.startswith("__")]
    assert not private, "private names used across modules:\n" + "\n".join(sorted(set(private)))


def test_the_checker_sees_function_local_and_relative_imports():
    """The walk must find imports inside functions (most heavy imports are there)."""
    edges = {(s, d) for s, d, _, _ in import_edges()}
    assert ("spark_megatron.roles", "spark_megatron.train.actor") in edges  # inside build_roles
    assert ("spark_megatron.launch.train_entry", "spark_megatron.controller") in edges  # inside _train

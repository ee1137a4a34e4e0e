"""Every config key is read by something: a walk over the config tree against the package's source.

A key counts as read when some function of the package that is itself used (referenced somewhere in the package
outside its own body, or a dunder / registered / entry-point function) loads an attribute of that name
(`cfg.rollout.colocate`, `rc.colocate`) or asks `getattr(x, "colocate")`. The scan finds readers by name, so keys
that other parts of the code wire up count without a hand-kept list; a reader nobody calls does not count (that is
how `algorithm.adv_estimator` stayed unread while `compute_advantages` read it). Keys read only by tools outside
the package are listed in LAUNCH_ONLY with the reason.
"""
from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

from spark_megatron import config as config_module

pytestmark = pytest.mark.unit

PACKAGE = Path(config_module.__file__).resolve().parent

LAUNCH_ONLY: dict = {
    # "section.key": "who reads it, outside spark_megatron/, and why it belongs in the run config",
}


def config_keys(cls=config_module.RunConfig, prefix: str = "") -> list:
    """Dotted names of every leaf field of the config tree."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


class _Reads(ast.NodeVisitor):
    """Attribute names each function loads, and the names each function references."""

    def __init__(self, module: str):
        self.module = module
        self.stack: list = []
        self.reads: dict = {}  # function id -> set of attribute names read
        self.refs: dict = {}  # name -> set of function ids that reference it (None = module level)
        self.defs: dict = {}  # function id -> (name, always-live?)

    def _func(self, node, is_method: bool) -> None:
        fid = f"{self.module}:{'.'.join(self.stack + [node.name])}:{node.lineno}"
        dunder = node.name.startswith("__") and node.name.endswith("__")
        registered = any(isinstance(d, ast.Call) for d in node.decorator_list)  # @REGISTRY.register("name")
        # a class/static method is called through its class: `Verifier.from_config` does not make
        # `PerceptionWeights.from_config` live
        on_class = is_method and any(isinstance(d, ast.Name) and d.id in ("classmethod", "staticmethod")
                                     for d in node.decorator_list)
        name = f"{self.stack[-1]}.{node.name}" if on_class else node.name
        self.defs[fid] = (name, dunder or registered or node.name == "main")
        self.stack.append(node.name)
        self._current = getattr(self, "_current", [])
        self._current.append(fid)
        self.generic_visit(node)
        self._current.pop()
        self.stack.pop()

    def visit_FunctionDef(self, node):
        self._func(node, bool(self.stack))

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    def _where(self):
        current = getattr(self, "_current", [])
        return current[-1] if current else None

    def visit_Attribute(self, node):
        where = self._where()
        self.refs.setdefault(node.attr, set()).add(where)
        if isinstance(node.value, ast.Name):
            self.refs.setdefault(f"{node.value.id}.{node.attr}", set()).add(where)
        if isinstance(node.ctx, ast.Load):
            self.reads.setdefault(where, set()).add(node.attr)
        self.generic_visit(node)

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load):
            self.refs.setdefault(node.id, set()).add(self._where())

    def visit_Call(self, node):
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("getattr", "hasattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            self.reads.setdefault(self._where(), set()).add(node.args[1].value)
        self.generic_visit(node)


def package_reads() -> set:
    """Attribute names loaded by live code of the package (see the module docstring)."""
    reads, refs, defs = {}, {}, {}
    for path in sorted(PACKAGE.rglob("*.py")):
        visitor = _Reads(str(path.relative_to(PACKAGE)))
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        for k, v in visitor.reads.items():
            reads.setdefault(k, set()).update(v)
        for k, v in visitor.refs.items():
            refs.setdefault(k, set()).update(v)
        defs.update(visitor.defs)

    def live(fid) -> bool:
        if fid is None:  # module level code runs at import
            return True
        name, always = defs[fid]
        return always or any(where != fid for where in refs.get(name, ()))

    return {attr for fid, attrs in reads.items() if live(fid) for attr in attrs}


def test_every_config_key_is_read():
    reads = package_reads()
    unread = [k for k in config_keys() if k.split(".")[-1] not in reads and k not in LAUNCH_ONLY]
    assert not unread, f"config keys nothing in spark_megatron/ reads: {unread}"


def test_launch_only_allowlist_is_current():
    keys = set(config_keys())
    assert not set(LAUNCH_ONLY) - keys, "LAUNCH_ONLY names keys that no longer exist"
    reads = package_reads()
    assert not [k for k in LAUNCH_ONLY if k.split(".")[-1] in reads], "a LAUNCH_ONLY key is read by the package now"


def test_the_scan_sees_dead_readers():
    """A reader nobody calls does not count; a key read only there is reported."""
    src = "def unused(cfg):\n    return cfg.only_here\n\ndef used(cfg):\n    return cfg.seen\n\nused(None)\n"
    visitor = _Reads("probe.py")
    visitor.visit(ast.parse(src))
    live = {visitor.defs[f][0] for f in visitor.defs if any(w != f for w in visitor.refs.get(visitor.defs[f][0], ()))}
    assert live == {"used"}

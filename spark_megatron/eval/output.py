"""The output directory of one evaluation, and whether a re-run may continue it.

    OUT/manifest.json   what is being evaluated: the suite (as resolved), its data and model fingerprints
    OUT/items.jsonl     one row per scored item, appended batch by batch (fsync'ed): a killed run loses at most
                        the batch in flight, and a re-run scores only the items not in the file
    OUT/summary.json    recomputed from items.jsonl at the end of every run
    OUT/table.md        the summary laid out like the SPARK paper's Table 1

A re-run whose suite, data or model fingerprint differs from the manifest's is refused unless forced (then the
old results are removed): mixing rows of two models or two suites in one table would be silently wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

ITEMS = "items.jsonl"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
TABLE = "table.md"
_SAMPLE_BYTES = 1 << 20


class EvalStateError(RuntimeError):
    """OUT holds another evaluation (changed suite/model) or cannot be used."""


def file_fingerprint(path: Path, h) -> None:
    """Name, size, and the first and last MiB: cheap on multi-GB checkpoints, and two different checkpoints (or a
    changed data file) differ there."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(_SAMPLE_BYTES))
        if size > 2 * _SAMPLE_BYTES:
            f.seek(size - _SAMPLE_BYTES)
            h.update(f.read(_SAMPLE_BYTES))


def path_fingerprint(path, skip: tuple = ()) -> str:
    """Fingerprint of a file, or of every file under a directory (relative names included)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        file_fingerprint(p, h)
    elif p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file() and not any(s in x.parts for s in skip)):
            h.update(str(f.relative_to(p)).encode())
            file_fingerprint(f, h)
    else:
        h.update(str(path).encode())  # synthetic:... specs are their own content
    return h.hexdigest()[:16]


class OutputDir:
    def __init__(self, out):
        self.root = Path(out)
        self.items_path = self.root / ITEMS

    # ------------------------------------------------------------------------------------------ identity
    def claim(self, manifest: dict, force: bool) -> bool:
        """Start or continue an evaluation here. Returns True when earlier rows are kept (a resume)."""
        self.root.mkdir(parents=True, exist_ok=True)
        old = self.read_manifest()
        if old is not None:
            diff = [k for k in ("suite_fingerprint", "model_fingerprint") if old.get(k) != manifest.get(k)]
            if not diff:
                return self.items_path.is_file()
            if not force:
                what = " and ".join(k.split("_")[0] for k in diff)
                raise EvalStateError(f"{self.root} holds an evaluation of another {what} "
                                     f"({old.get('model')}); use another --output or pass --force to replace it")
        elif self.items_path.is_file() and not force:
            raise EvalStateError(f"{self.root}: {ITEMS} without {MANIFEST} (not from spark-megatron eval?); "
                                 f"pass --force to replace it")
        for name in (ITEMS, SUMMARY, TABLE):
            (self.root / name).unlink(missing_ok=True)
        self._write_json(MANIFEST, manifest)
        return False

    def read_manifest(self) -> Optional[dict]:
        path = self.root / MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise EvalStateError(f"{path}: not valid JSON ({e.msg}); pass --force to start over") from None

    # ------------------------------------------------------------------------------------------ rows
    def rows(self) -> list:
        """Every complete row; a last line cut short by a kill is dropped from the file."""
        if not self.items_path.is_file():
            return []
        data = self.items_path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.items_path, "r+b") as f:
                f.truncate(end)
        rows = []
        for n, line in enumerate(data[:end].splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise EvalStateError(f"{self.items_path}: line {n} is not JSON; pass --force to start over") \
                        from None
        return rows

    def append(self, rows: list) -> None:
        if not rows:
            return
        with open(self.items_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------------------------------------ reports
    def write_summary(self, summary: dict, table: str) -> None:
        self._write_json(SUMMARY, summary)
        self._write_text(TABLE, table)

    def _write_json(self, name: str, data: dict) -> None:
        self._write_text(name, json.dumps(data, indent=1, sort_keys=False) + "\n")

    def _write_text(self, name: str, text: str) -> None:
        tmp = self.root / f".{name}.tmp{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, self.root / name)

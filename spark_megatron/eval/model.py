"""What `--model` points at: an HF directory, a Megatron checkpoint of this project, or a training run (its
newest complete checkpoint). Megatron checkpoints are exported to HF on the fly, into a temporary directory,
through the project's converter (checkpoint/hf_export.py)."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from spark_megatron.eval.output import path_fingerprint

EXPORT_PREFIX = "spark_eval_hf_"
"""Name prefix of the temporary HF export of a Megatron checkpoint."""


class ModelError(ValueError):
    """--model is not something the evaluation can load."""


@dataclass(frozen=True)
class ModelSource:
    kind: str
    """hf | megatron"""
    path: str
    """The HF directory or the Megatron checkpoint directory itself (a run's newest complete checkpoint)."""

    def fingerprint(self) -> str:
        # the dist-checkpoint's files or the HF weights and config; never the exported temp copy
        return f"{self.kind}:{path_fingerprint(self.path)}"


def resolve_model(path: str) -> ModelSource:
    p = Path(path)
    if (p / "config.json").is_file():
        return ModelSource("hf", str(p.absolute()))
    if (p / "spark_meta.json").is_file():
        return ModelSource("megatron", str(p.absolute()))
    for latest in (p / "checkpoints" / "latest", p / "latest"):  # a run directory, or its checkpoints/
        if latest.is_file():
            ckpt = latest.parent / latest.read_text().strip()
            if (ckpt / "spark_meta.json").is_file():
                return ModelSource("megatron", str(ckpt.absolute()))
            raise ModelError(f"{latest} names {ckpt}, which is not a complete Megatron checkpoint")
    if not p.exists():
        raise ModelError(f"--model {path}: no such directory")
    raise ModelError(f"--model {path}: neither an HF checkpoint (config.json), a Megatron checkpoint "
                     f"(spark_meta.json) nor a training run (checkpoints/latest)")


@contextlib.contextmanager
def hf_directory(source: ModelSource, workers: int = 1, workdir: Optional[str] = None,
                 progress: bool = True) -> Iterator[str]:
    """The HF directory to serve: the source itself, or a temporary export of the Megatron checkpoint (removed
    afterwards; a re-run after a kill exports again)."""
    if source.kind == "hf":
        yield source.path
        return
    from spark_megatron.checkpoint.hf_export import export_megatron_to_hf

    if not any(Path(source.path).glob("tokenizer*")):
        raise ModelError(f"{source.path}: the Megatron checkpoint has no tokenizer files (tokenizer*.json, "
                         f"chat_template*); copy them from the HF model it was trained from")
    tmp = Path(tempfile.mkdtemp(prefix=EXPORT_PREFIX, dir=workdir))
    try:
        out = tmp / "hf"
        export_megatron_to_hf(source.path, out, workers=workers, progress=progress)
        yield str(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

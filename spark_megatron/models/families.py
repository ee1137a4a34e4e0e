"""Model families by HF architecture name: the one seam that conversion, the actor, weight sync and the planner
use to build a Megatron stage and its HF mappings without knowing which model it is. The table is explicit
(`families()`): adding a model means adding its entry there."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from spark_megatron.models.mapping import HFNaming
from spark_megatron.models.qwen2 import ModelSpecError


@dataclass(frozen=True)
class ModelFamily:
    name: str
    architectures: tuple
    """HF `architectures[0]` values this family handles."""
    shape_from_hf_dict: Callable
    """(config dict, source str) -> shape object (has num_layers, vocab_size, tie_word_embeddings, ...)."""
    check_layout: Callable
    """(shape, tp, pp, divisible_by=128) -> None; raises ModelSpecError naming what TP/PP does not divide."""
    build_stage: Callable
    """(shape, params_dtype: str, **kw) -> this rank's pipeline stage (inside initialised parallel state);
    `divisible_by=` pads the vocab to a multiple of it (parallel.make_vocab_size_divisible_by, default 128)."""
    mappings: Callable
    """(shape, divisible_by=128) -> MappingRegistry of every parameter (the vocab padded as the stage pads it)."""
    hf_model_class: str
    """transformers class name of the oracle model (e.g. 'Qwen2ForCausalLM')."""
    hf_naming: Optional[HFNaming] = None
    """The tensor-name schemes the family's HF checkpoints come in (None: only the mappings' own names)."""

    def hf_namings(self) -> tuple:
        """Names of the schemes conversion reads and writes (the first is the default on export)."""
        return self.hf_naming.schemes if self.hf_naming is not None else ("hub",)

    def open_hf(self, hf_dir, shape):
        """An HFCheckpointReader of `hf_dir` serving the mappings' names whatever scheme the files use."""
        from spark_megatron.models.weights import HFCheckpointReader

        if self.hf_naming is None:
            return HFCheckpointReader(hf_dir)
        return HFCheckpointReader(hf_dir, self.hf_naming, self.mappings(shape).hf_names())


def families() -> tuple:
    """Every supported model family, listed here and nowhere else. Built on first use (the family modules pull in
    megatron-core); an error importing one is an error, not a missing family."""
    if not _TABLE:
        from spark_megatron.models import qwen2, qwen2_5_vl
        from spark_megatron.models.qwen2_5_vl_mapping import NAMING, qwen2_5_vl_mappings
        from spark_megatron.models.qwen2_mapping import qwen2_mappings

        _TABLE.extend([
            ModelFamily(name="qwen2", architectures=qwen2.SUPPORTED_ARCHITECTURES,
                        shape_from_hf_dict=qwen2.TextModelShape.from_hf_dict,
                        check_layout=qwen2.check_parallel_layout, build_stage=qwen2.build_stage,
                        mappings=qwen2_mappings, hf_model_class="Qwen2ForCausalLM"),
            ModelFamily(name="qwen2_5_vl", architectures=qwen2_5_vl.ARCHITECTURES,
                        shape_from_hf_dict=qwen2_5_vl.VLModelShape.from_hf_dict,
                        check_layout=qwen2_5_vl.check_vl_layout, build_stage=qwen2_5_vl.build_stage,
                        mappings=qwen2_5_vl_mappings, hf_model_class="Qwen2_5_VLForConditionalGeneration",
                        hf_naming=NAMING),
        ])
    return tuple(_TABLE)


_TABLE: list = []


def read_hf_config(hf_dir) -> dict:
    from spark_megatron.models.qwen2 import read_config_json

    return read_config_json(Path(hf_dir) / "config.json" if Path(hf_dir).is_dir() else hf_dir)[0]


def family_for_config(cfg: dict, source: str = "config.json") -> ModelFamily:
    """The family of an HF config (by `architectures[0]`); ModelSpecError naming the supported ones otherwise."""
    by_arch = {arch: fam for fam in families() for arch in fam.architectures}
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    if archs[0] not in by_arch:
        raise ModelSpecError(f"{source}: unsupported architecture '{archs[0]}' "
                             f"(supported: {', '.join(sorted(by_arch))})")
    return by_arch[archs[0]]


def load_family(hf_dir) -> tuple:
    """HF directory -> (family, shape)."""
    cfg = read_hf_config(hf_dir)
    source = str(Path(hf_dir) / "config.json")
    fam = family_for_config(cfg, source)
    return fam, fam.shape_from_hf_dict(cfg, source)

"""Checkpoints: the Megatron dist-checkpoint format (save/load at any TP/PP), HF import/export, atomic writes.

Trainer code saves/resumes with `save_sharded_checkpoint` / `save_megatron_checkpoint` /
`load_megatron_checkpoint`; conversion CLIs call `convert_hf_to_megatron` and `export_megatron_to_hf`.
"""
from spark_megatron.checkpoint.atomic import OutputExistsError, atomic_output_dir
from spark_megatron.checkpoint.hf_export import export_megatron_to_hf
from spark_megatron.checkpoint.hf_import import convert_hf_to_megatron
from spark_megatron.checkpoint.megatron_format import (CheckpointMeta, load_megatron_checkpoint, read_meta,
                                                       save_megatron_checkpoint, save_sharded_checkpoint)
from spark_megatron.models.weights import CheckpointError

__all__ = ["CheckpointError", "CheckpointMeta", "OutputExistsError", "atomic_output_dir", "convert_hf_to_megatron",
           "export_megatron_to_hf", "load_megatron_checkpoint", "read_meta", "save_megatron_checkpoint",
           "save_sharded_checkpoint"]

"""Prompt data: Spark-Data readers (JSONL, JSON, HF datasets), the synthetic arithmetic task, batching."""
from spark_megatron.data.loading import LoadedPrompts, LoadReport, SourceReport, load_from_config, load_prompts
from spark_megatron.data.records import BadReason, DataError, RecordProblem, parse_record
from spark_megatron.data.serialization import prompt_from_dict, prompt_to_dict
from spark_megatron.data.stream import PromptBatch, PromptStream
from spark_megatron.data.synthetic import arith_prompts

__all__ = [
    "BadReason", "DataError", "LoadReport", "LoadedPrompts", "PromptBatch", "PromptStream", "RecordProblem",
    "SourceReport", "arith_prompts", "load_from_config", "load_prompts", "parse_record", "prompt_from_dict",
    "prompt_to_dict",
]

"""`spark-megatron eval`: benchmark readers, the evaluation loop, paper-style tables.

suite.py (what to evaluate) -> reading.py + formats*.py (records -> items) -> runner.py (generate, score with
scoring.py, append to items.jsonl) -> report.py (summary.json, table.md). evaluate.py ties them to a checkpoint
(model.py) and an engine (generation.py); output.py owns the resumable output directory.
"""
from spark_megatron.eval.suite import DatasetSpec, Suite, load_suite

__all__ = ["DatasetSpec", "Suite", "load_suite"]

"""Launching SPARK: the `spark-megatron` CLI, NeMo-Run executors (local torchrun, Slurm) and the memory planner.

Nothing here imports nemo_run at import time; only `launch` code paths do (executors.nemo_run()).
"""

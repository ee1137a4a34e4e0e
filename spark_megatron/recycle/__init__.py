"""Recycling of policy rollouts into judgment and reflection tasks; the queue; scheduling; self-reflection."""
from spark_megatron.recycle.builder import RecycleBuilder, RecycleResult, RecycleStats
from spark_megatron.recycle.queue import RecycleQueue
from spark_megatron.recycle.scheduler import Phase, RecycleScheduler, ScheduledBatch
from spark_megatron.recycle.self_reflection import SelfReflectionResult, TraceStep, self_reflect

__all__ = [
    "Phase", "RecycleBuilder", "RecycleQueue", "RecycleResult", "RecycleScheduler", "RecycleStats",
    "ScheduledBatch", "SelfReflectionResult", "TraceStep", "self_reflect",
]

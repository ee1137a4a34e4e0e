"""Weight sync: Megatron TP/PP shards -> HF-named tensors -> validated buckets -> rollout engines.

Engines take part through the `WeightLoader` protocol (sync/push.py); `sync.remote.RemoteEngine` runs an engine
in its own process and feeds it over a `sync.channel.SyncChannel`."""
from spark_megatron.sync.actor import actor_plan, push_actor_weights
from spark_megatron.sync.bucket import POOL, Bucket, BucketBuffer, LiveBytes, release_buffers
from spark_megatron.sync.manifest import SyncPlan, TensorSpec, module_key, plan_buckets
from spark_megatron.sync.push import (CheckpointSource, EngineSink, NullSink, PairsSource, PushStats, WeightLoader,
                                      WeightSink, WeightSyncError, expected_weights, push_into, push_source)
from spark_megatron.sync.validation import ExpectedWeights, WeightValidationError

__all__ = ["POOL", "Bucket", "BucketBuffer", "LiveBytes", "release_buffers", "SyncPlan", "TensorSpec", "module_key",
           "plan_buckets", "CheckpointSource", "EngineSink", "NullSink", "PairsSource", "PushStats", "WeightLoader",
           "WeightSink", "WeightSyncError", "actor_plan", "expected_weights", "push_actor_weights", "push_into",
           "push_source", "ExpectedWeights", "WeightValidationError"]

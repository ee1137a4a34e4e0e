"""Weight sync: Megatron TP/PP shards -> HF-named tensors -> validated buckets -> rollout engines."""
from spark_megatron.sync.bucket import POOL, Bucket, BucketBuffer, LiveBytes, release_buffers
from spark_megatron.sync.manifest import SyncPlan, TensorSpec, module_key, plan_buckets
from spark_megatron.sync.push import (CheckpointSource, EngineSink, NullSink, PairsSource, PushStats, WeightSink,
                                      WeightSyncError, push_actor_weights, push_source)
from spark_megatron.sync.validation import ExpectedWeights, WeightValidationError

__all__ = ["POOL", "Bucket", "BucketBuffer", "LiveBytes", "release_buffers", "SyncPlan", "TensorSpec", "module_key",
           "plan_buckets", "CheckpointSource", "EngineSink", "NullSink", "PairsSource", "PushStats", "WeightSink",
           "WeightSyncError", "push_actor_weights", "push_source", "ExpectedWeights", "WeightValidationError"]

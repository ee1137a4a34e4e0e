"""Rollout engines: the RolloutEngine protocol, the vLLM engine (only module importing vllm), the HF reference, the
layout of a job's colocated engines and this rank's view of them (EngineFleet), the engine watch.

Weights reach an engine through `spark_megatron.sync` (which this package does not import; see rollout/engine.py)."""
from spark_megatron.rollout.engine import (ChatRenderer, EngineStateError, RolloutEngine, SamplingSpec,
                                           TokenizedRequest, build_engine, token_request)

__all__ = ["ChatRenderer", "EngineStateError", "RolloutEngine", "SamplingSpec", "TokenizedRequest", "build_engine",
           "token_request"]

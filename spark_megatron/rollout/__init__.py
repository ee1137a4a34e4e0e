"""Rollout engines: the RolloutEngine protocol, the vLLM engine (only module importing vllm), the HF reference."""
from spark_megatron.rollout.engine import (ChatRenderer, EngineStateError, RolloutEngine, SamplingSpec,
                                           TokenizedRequest, build_engine, token_request)

__all__ = ["ChatRenderer", "EngineStateError", "RolloutEngine", "SamplingSpec", "TokenizedRequest", "build_engine",
           "token_request"]

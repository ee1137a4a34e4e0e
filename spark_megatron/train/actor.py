"""The Megatron policy: forward-only logprobs and optimizer steps over micro-batched sequences (SPMD).

Every rank of the job constructs the Actor inside an initialised parallel state and calls its methods with the
SAME list of sequences (the controller runs SPMD). Each data-parallel rank takes its share of the sequences
(longest first, dealt snake-wise), its TP/PP group runs them through megatron's schedules, and results come
back on every rank.

Gradient scaling. `loss_fn` returns a loss already normalised by the GLOBAL response-token count of the
optimizer step (`mb_extras["global_token_count"]`), so the step's gradient must be the plain SUM of the
micro-batch gradients over all micro-batches and data-parallel ranks. megatron would instead divide each
micro-batch loss by the number of micro-batches (legacy 2-tuple loss) and average gradients over DP. The actor
sets `calculate_per_token_loss` on the model config (DDP then sums over DP instead of averaging, and 3-tuple
losses are not divided) and installs a finalize function that skips megatron's division by the token count it
counted itself. Nothing is pre-scaled, so the result does not depend on how the batch is split (tested).

Bad updates. An update whose inputs (advantages, old/reference/rollout logprobs), loss or gradient norm is not
finite is skipped (the weights stay as they were); an update whose gradient is exactly zero is applied but moves
nothing the loss asked for. Both are counted (`nonfinite`, `zero_grad` in the step metrics) and `bad_streak`
says how many came in a row, so the trainer can stop a run that has diverged or collapsed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Optional, Protocol, Sequence

import torch
import torch.distributed as dist

from spark_megatron.parallel.cpu_compat import compute_device
from spark_megatron.train import batching, vl_inputs
from spark_megatron.train.batching import SequenceSample
from spark_megatron.train.logprobs import vocab_parallel_logprobs
from spark_megatron.parallel.schedule import run_schedule
from spark_megatron.train.vl_inputs import image_scoped

class StartCheckpoint(Protocol):
    """Weights a stage starts from instead of an HF directory (a Megatron checkpoint, `model.megatron_path`):
    the roles pass one in, so the trainer does not depend on checkpoint formats."""

    hf_config: dict
    """The HF config the weights were written from (picks the model family and shape)."""
    source: str
    """Names the checkpoint in errors."""

    def load_into(self, stage) -> None:
        """Load this rank's part of the weights into the stage (any TP/PP)."""


LossFn = Callable[[torch.Tensor, Optional[torch.Tensor], dict], tuple]
"""(logprobs [b, s], entropy [b, s] or None, mb_extras {name: tensor}) -> (loss 0-d, {metric: 0-d tensor})."""


def _ps():
    from megatron.core import parallel_state as ps

    return ps


class LogprobRunner:
    """Builds this rank's pipeline stage from an HF (or Megatron) checkpoint and scores sequences with it.

    Shared by Actor (trainable, DDP-wrapped) and ReferenceModel (frozen). The family (text Qwen2 or
    Qwen2.5-VL) comes from the checkpoint's config; for VL models `vl_inputs` adds images and mRoPE ids to
    the micro-batches and `cache_images` encodes each distinct image once per pass (see vl_inputs).
    """

    def __init__(self, model_cfg, parallel_cfg, hf_dir: Optional[str] = None, micro_batch_size: int = 1,
                 logit_temperature: float = 1.0, cache_images: bool = True,
                 start: Optional[StartCheckpoint] = None):
        """`start`: the checkpoint to load instead of `hf_dir`'s weights (required with model.megatron_path)."""
        from spark_megatron.models.families import family_for_config, load_family, read_hf_config

        ps = _ps()
        if not ps.model_parallel_is_initialized():
            raise RuntimeError("initialise the parallel state first (spark_megatron.parallel.groups."
                               "init_distributed)")
        self._check_layout(parallel_cfg)
        self.model_cfg, self.parallel_cfg = model_cfg, parallel_cfg
        self.micro_batch_size = int(micro_batch_size)
        self.logit_temperature = float(logit_temperature)
        self.hf_dir = hf_dir or model_cfg.hf_path or None
        if getattr(model_cfg, "megatron_path", None) and start is None:
            raise ValueError("model.megatron_path is set: pass the checkpoint as `start` (see roles.megatron_start)")
        if start is not None:
            self.hf_config = start.hf_config
            self.family = family_for_config(self.hf_config, start.source)
            self.shape = self.family.shape_from_hf_dict(self.hf_config, start.source)
        else:
            if not self.hf_dir:
                raise ValueError("model.hf_path (or model.megatron_path) is required to build the model")
            self.family, self.shape = load_family(self.hf_dir)
            self.hf_config = read_hf_config(self.hf_dir)
        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        self.family.check_layout(self.shape, tp, pp, self.vocab_divisible_by)
        self._stage = self.family.build_stage(self.shape, model_cfg.params_dtype, **self._build_kwargs())
        self._load_weights(start)
        self.vocab_size = self.shape.vocab_size
        self.max_len = getattr(getattr(self.shape, "text", self.shape), "max_position_embeddings", None)
        self.vision_frozen = vl_inputs.freeze_vision(self._stage, getattr(model_cfg, "freeze_vision", False))
        self.vl = vl_inputs.VLInputs.for_stage(self._stage, self.shape)
        """None for text models."""
        from spark_megatron.vision.cache import ImageEmbeddingCache

        self.image_cache = ImageEmbeddingCache() if self.vl is not None and cache_images else None
        self._image_scope = vl_inputs.ImageCacheScope(self.image_cache)

    # ------------------------------------------------------------------------------------------ building
    @staticmethod
    def _check_layout(parallel_cfg) -> None:
        ps = _ps()
        want = (parallel_cfg.tensor_model_parallel_size, parallel_cfg.pipeline_model_parallel_size)
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if want != have:
            raise ValueError(f"parallel config asks for TP{want[0]} x PP{want[1]} but the parallel state is "
                             f"TP{have[0]} x PP{have[1]}")
        if (parallel_cfg.virtual_pipeline_model_parallel_size or 1) > 1:
            raise ValueError("parallel.virtual_pipeline_model_parallel_size: the actor does not support "
                             "interleaved pipelining yet (set it to null)")
        if parallel_cfg.sequence_parallel:
            raise ValueError("parallel.sequence_parallel: not supported by the actor's model provider yet")

    def _build_kwargs(self) -> dict:
        kw = {}
        if self.model_cfg.fp8:
            kw["fp8"] = self.model_cfg.fp8
        if self.model_cfg.recompute_activations:
            kw["recompute"] = True
        if self.vocab_divisible_by != 128:
            kw["divisible_by"] = self.vocab_divisible_by
        return kw

    @property
    def vocab_divisible_by(self) -> int:
        """The vocab is padded to a multiple of this (parallel.make_vocab_size_divisible_by)."""
        return self.parallel_cfg.make_vocab_size_divisible_by

    def mappings(self):
        """The HF <-> Megatron mappings of this stage (the vocab padded as the stage pads it)."""
        return self.family.mappings(self.shape, self.vocab_divisible_by)

    def _load_weights(self, start: Optional[StartCheckpoint]) -> None:
        if start is not None:
            start.load_into(self._stage)
            return
        from spark_megatron.models.weights import load_hf_weights

        # family.open_hf reads either Qwen2.5-VL naming scheme (hub, or transformers-4.52 fine-tunes)
        load_hf_weights(self._stage, self.family.open_hf(self.hf_dir, self.shape), self.mappings(),
                        tied=self.shape.tie_word_embeddings)

    @property
    def model_chunks(self) -> list:
        """This rank's unwrapped model chunks (megatron GPTModel per pipeline stage chunk)."""
        return [self._stage]

    def _run_chunks(self) -> list:
        """The modules the schedules run (wrapped for training in the Actor)."""
        return [self._stage]

    def _validate(self, seqs: Sequence[SequenceSample]) -> None:
        batching.validate(seqs, self.max_len)
        if self.vl is None:
            vl_inputs.check_text_only(seqs)
        else:
            self.vl.check(seqs)

    # ------------------------------------------------------------------------------------------ scoring
    def compute_logprobs(self, seqs: Sequence[SequenceSample]) -> list:
        """Logprob of every response token under the current weights: one fp32 CPU tensor of length
        `response_len` per sequence, on every rank."""
        return self._score(seqs, with_entropy=False)[0]

    def compute_logprobs_and_entropy(self, seqs: Sequence[SequenceSample]) -> tuple:
        """(logprobs, entropies): two lists of per-sequence fp32 CPU tensors (entropy of the full next-token
        distribution at each response position), on every rank."""
        return self._score(seqs, with_entropy=True)

    def _plan_buckets(self, seqs, mine, micro_batch_size: int, fields=(), single_call: bool = False,
                      min_microbatches: int = 0) -> list:
        """This rank's sequences as lists of micro-batches, one schedule call each, longest first.

        No PP: one call, every micro-batch padded to its own longest row. PP: p2p needs one [b, s] per call, so
        the length-sorted micro-batches go in calls of 4 x PP micro-batches (enough to keep the pipeline
        filled), each padded to its own longest row; `single_call` puts everything in one call instead.
        """
        pp = _ps().get_pipeline_model_parallel_world_size()
        ordered = batching.length_sorted(mine, seqs)

        def plan(rows, uniform):
            return batching.plan_microbatches(seqs, rows, micro_batch_size, uniform_shape=uniform, fields=fields,
                                              max_len=self.max_len, device=compute_device(),
                                              min_microbatches=min_microbatches)

        if pp == 1 or single_call:
            mbs = plan(ordered, uniform=pp > 1)
            buckets = [mbs] if mbs else []
        else:
            per_call = 4 * pp * micro_batch_size
            buckets = [plan(ordered[i:i + per_call], uniform=True) for i in range(0, len(ordered), per_call)]
            buckets = buckets or ([plan([], uniform=True)] if min_microbatches else [])
        if self.vl is not None:
            for bucket in buckets:
                self.vl.attach(bucket, seqs, self.image_cache)
        return buckets

    @image_scoped
    @torch.no_grad()
    def _score(self, seqs: Sequence[SequenceSample], with_entropy: bool) -> tuple:
        ps = _ps()
        self._validate(seqs)
        mine = batching.shard_for_rank(range(len(seqs)), seqs, ps.get_data_parallel_rank(),
                                       ps.get_data_parallel_world_size())
        vocab, temp = self.vocab_size, self.logit_temperature

        def collect(output, mb):
            lp, ent = vocab_parallel_logprobs(output, mb.extras["labels"], vocab, with_entropy, temp)
            return lp, ent

        chunks = self._run_chunks()
        for c in chunks:
            c.eval()
        results = []
        for bucket in self._plan_buckets(seqs, mine, self.micro_batch_size):
            outs = run_schedule(chunks, bucket, collect, forward_only=True, collect=True)
            results.extend(zip(bucket, outs))
        return share_per_token(seqs, results, with_entropy)


def share_per_token(seqs: Sequence[SequenceSample], results: list, with_entropy: bool) -> tuple:
    """Scatter per-row [b, s] outputs of this rank into one flat buffer laid out by sequence, and sum it over
    the job: exactly one rank (last PP stage, TP rank 0) contributes each sequence, so every rank ends up
    with every sequence's values, bit-exact (x + 0)."""
    ps = _ps()
    lens = [s.response_len for s in seqs]
    offsets = [0]
    for n in lens:
        offsets.append(offsets[-1] + n)
    width = 2 if with_entropy else 1
    buf = torch.zeros(width, offsets[-1], dtype=torch.float32, device=compute_device())
    contributes = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    if contributes:
        for mb, (lp, ent) in results:
            for r, idx in enumerate(mb.rows):
                if idx < 0:
                    continue
                p, n = seqs[idx].prompt_len, len(seqs[idx].tokens)
                buf[0, offsets[idx]:offsets[idx + 1]] = lp[r, p - 1:n - 1].float()
                if with_entropy:
                    buf[1, offsets[idx]:offsets[idx + 1]] = ent[r, p - 1:n - 1].float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(buf)
    buf = buf.cpu()
    logprobs = [buf[0, offsets[i]:offsets[i + 1]].clone() for i in range(len(seqs))]
    entropy = [buf[1, offsets[i]:offsets[i + 1]].clone() for i in range(len(seqs))] if with_entropy else None
    return logprobs, entropy


class Actor(LogprobRunner):
    """The trainable policy: DDP-wrapped stage, megatron Adam (distributed optimizer), cosine LR schedule.

    Build on every rank after `init_distributed(tp, pp)`:
        Actor(model_cfg, parallel_cfg, optim_cfg, hf_dir, total_steps)
    `total_steps` = optimizer steps of the whole run (sets warmup = round(warmup_ratio x total) and the cosine
    end). Layout: TP x PP from the parallel state, DP = world / (TP x PP). VL checkpoints: `model.freeze_vision`
    keeps the vision tower out of DDP and the optimizer (bit-identical across steps).
    """

    def __init__(self, model_cfg, parallel_cfg, optim_cfg, hf_dir: Optional[str] = None, total_steps: int = 1,
                 logprob_micro_batch_size: Optional[int] = None, logit_temperature: float = 1.0,
                 overlap_grad_reduce: bool = False, cache_images: bool = True, seed: int = 0,
                 start: Optional[StartCheckpoint] = None):
        super().__init__(model_cfg, parallel_cfg, hf_dir, logprob_micro_batch_size or optim_cfg.micro_batch_size,
                         logit_temperature, cache_images, start)
        from spark_megatron.train.optimizer import build_optimizer, build_scheduler, lr_schedule

        self.optim_cfg = optim_cfg
        self.seed = int(seed)
        self.total_steps = int(total_steps)
        vl_inputs.check_overlap(self.vl, getattr(model_cfg, "freeze_vision", False), overlap_grad_reduce)
        self._overlap = bool(overlap_grad_reduce)
        self._defer_finalize = False
        self.schedule = lr_schedule(optim_cfg, self.total_steps)
        self._ddp = [self._wrap_ddp(self._stage, parallel_cfg.use_distributed_optimizer, overlap_grad_reduce)]
        self.optimizer = build_optimizer(self._ddp, optim_cfg, model_cfg.params_dtype,
                                         parallel_cfg.use_distributed_optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.schedule)
        self._install_schedule_hooks(overlap_grad_reduce)
        self.steps_done = 0
        """Optimizer steps attempted (skipped ones included)."""
        self.bad_streak = 0
        """Consecutive bad updates (non-finite, or zero gradient) up to the last one; 0 after a good update."""
        self.bad_updates = {"nonfinite": 0, "zero_grad": 0}
        """Bad updates of this actor's life, by kind; `streak_kinds` counts those of the current streak."""
        self.streak_kinds = {"nonfinite": 0, "zero_grad": 0}

    def _wrap_ddp(self, stage, use_distributed_optimizer: bool, overlap: bool):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer.module import Float16Module

        config = stage.config
        config.calculate_per_token_loss = True  # DDP sums over DP; 3-tuple losses are not divided (see top)
        module = Float16Module(config, stage) if (config.bf16 or config.fp16) else stage
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                                   use_distributed_optimizer=use_distributed_optimizer)
        return DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)

    def _install_schedule_hooks(self, overlap: bool) -> None:
        from megatron.core.distributed import finalize_model_grads

        config = self._stage.config

        def finalize(model, num_tokens=None, **kw):
            if self._defer_finalize:  # not the last schedule call of this optimizer step
                return None
            # the loss is already normalised by the global token count: no extra division
            return finalize_model_grads(model, None, **kw)

        config.finalize_model_grads_func = finalize
        config.grad_scale_func = self.optimizer.scale_loss
        if overlap:
            config.no_sync_func = self._ddp[0].no_sync
            config.grad_sync_func = self._ddp[0].start_grad_sync

    def _run_chunks(self) -> list:
        return self._ddp

    # ------------------------------------------------------------------------------------------ training
    @image_scoped
    def train_step(self, seqs: Sequence[SequenceSample], loss_fn: LossFn, with_entropy: bool = False) -> dict:
        """One RL update over `seqs`: mini-batches of optim.train_batch_size sequences (cut in `minibatch_order`),
        one optimizer step each.

        Missing old_logprobs are computed for all sequences before the first update when there is more than
        one mini-batch (with a single mini-batch they stay absent: on-policy, ratio 1). Returns the mean of the
        per-step metrics (loss, grad_norm over updated steps, loss_fn metrics), `lr` of the last step,
        `skipped` (count) and `optimizer_steps`. The caller's SequenceSample objects are not modified.
        """
        seqs = list(seqs)
        self._validate(seqs)
        order = self.minibatch_order(len(seqs))
        cuts = batching.split_minibatches(len(seqs), self.optim_cfg.train_batch_size)
        minis = [[order[i] for i in m] for m in cuts]
        if len(minis) > 1 and any(s.old_logprobs is None for s in seqs):
            missing = [i for i, s in enumerate(seqs) if s.old_logprobs is None]
            for i, lp in zip(missing, self.compute_logprobs([seqs[i] for i in missing])):
                seqs[i] = dataclasses.replace(seqs[i], old_logprobs=lp)
        per_step = [self.optimizer_step([seqs[i] for i in m], loss_fn, with_entropy) for m in minis]
        return merge_step_metrics(per_step)

    def minibatch_order(self, n: int) -> list:
        """The order in which `train_step` cuts n sequences into mini-batches: a permutation seeded by the run seed
        and the optimizer steps done so far (the same on every rank, and again after a resume, which restores
        steps_done), or 0..n-1 with optim.shuffle_minibatches off."""
        if not self.optim_cfg.shuffle_minibatches or n < 2:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.steps_done)
        return torch.randperm(n, generator=g).tolist()

    @image_scoped
    def optimizer_step(self, seqs: Sequence[SequenceSample], loss_fn: LossFn, with_entropy: bool = False) -> dict:
        """Forward/backward over all micro-batches of one mini-batch, then one (possibly skipped) Adam step.

        mb_extras given to `loss_fn` (all [b, s] on the compute device, response positions aligned so that
        position t holds the values of token t+1): response_mask (float 0/1), advantages, old_logprobs,
        ref_logprobs, rollout_logprobs (only those set on every sequence), global_token_count and
        global_seq_count (0-d float tensors: response tokens / sequences of the whole mini-batch over all
        micro-batches and DP ranks). The loss must be sum(per-token loss * mask) / global_token_count for a
        token mean; the actor sums micro-batch gradients over micro-batches and DP ranks unchanged.
        """
        from spark_megatron.train.optimizer import current_lr, step_optimizer

        ps = _ps()
        seqs = list(seqs)
        self._validate(seqs)
        fields = batching.present_fields(seqs)
        tokens = batching.response_token_count(seqs, range(len(seqs)))
        if not _finite_inputs(seqs, fields):  # e.g. logprobs of weights that already diverged: nothing to learn
            return self._skipped(seqs, tokens, current_lr(self.optimizer))
        mine = batching.shard_for_rank(range(len(seqs)), seqs, ps.get_data_parallel_rank(),
                                       ps.get_data_parallel_world_size())
        buckets = self._plan_buckets(seqs, mine, self.optim_cfg.micro_batch_size, fields,
                                     single_call=self._overlap, min_microbatches=1)
        for mb in (mb for bucket in buckets for mb in bucket):
            mb.extras["global_token_count"] = torch.tensor(float(tokens), device=compute_device())
            mb.extras["global_seq_count"] = torch.tensor(float(len(seqs)), device=compute_device())
        for c in self._ddp:
            c.zero_grad_buffer()
            c.train()
        self.optimizer.zero_grad()
        outs = []
        for i, bucket in enumerate(buckets):
            # gradients accumulate in the DDP buffers across calls; reduce them once, after the last call
            self._defer_finalize = i < len(buckets) - 1
            outs += run_schedule(self._ddp, bucket, self._train_loss(loss_fn, with_entropy), forward_only=False)
        self._defer_finalize = False
        lr = current_lr(self.optimizer)
        metrics = reduce_loss_metrics(outs)  # the same loss on every rank: the skip decision is collective
        if not math.isfinite(metrics["loss"]):
            return self._skipped(seqs, tokens, lr, metrics)
        result = step_optimizer(self.optimizer, self.optim_cfg.clip_grad)
        if result.updated:
            self.scheduler.step(1)
            if not self.vision_frozen:
                self._image_scope.weights_changed()  # features stored under the old tower weights are stale
        self.steps_done += 1
        zero = result.updated and result.grad_norm == 0.0
        self._record_update(None if result.updated and not zero else "zero_grad" if zero else "nonfinite")
        metrics.update(grad_norm=result.grad_norm, lr=lr, skipped=0.0 if result.updated else 1.0,
                       nonfinite=0.0 if result.updated else 1.0, zero_grad=float(zero))
        return self._step_metrics(metrics, seqs, tokens)

    def _skipped(self, seqs, tokens: int, lr: float, metrics: Optional[dict] = None) -> dict:
        """An update left out for non-finite inputs or loss: no optimizer step, no scheduler step."""
        self.steps_done += 1
        self._record_update("nonfinite")
        metrics = dict(metrics or {"loss": float("nan")})
        metrics.update(grad_norm=float("nan"), lr=lr, skipped=1.0, nonfinite=1.0, zero_grad=0.0)
        return self._step_metrics(metrics, seqs, tokens)

    def _record_update(self, bad_kind: Optional[str]) -> None:
        if bad_kind is None:
            self.bad_streak = 0
            self.streak_kinds = dict.fromkeys(self.streak_kinds, 0)
            return
        self.bad_streak += 1
        self.bad_updates[bad_kind] += 1
        self.streak_kinds[bad_kind] += 1

    @staticmethod
    def _step_metrics(metrics: dict, seqs, tokens: int) -> dict:
        metrics.update(global_tokens=float(tokens), sequences=float(len(seqs)))
        for kind, (n, t) in batching.kind_counts(seqs, range(len(seqs))).items():
            metrics[f"kind/{kind}/sequences"] = float(n)
            metrics[f"kind/{kind}/tokens"] = float(t)
        return metrics

    def _train_loss(self, loss_fn: LossFn, with_entropy: bool):
        vocab, temp = self.vocab_size, self.logit_temperature

        def loss(output, mb):
            lp, ent = vocab_parallel_logprobs(output, mb.extras["labels"], vocab, with_entropy, temp)
            extras = {k: v for k, v in mb.extras.items() if k != "labels"}
            value, stats = loss_fn(lp, ent, extras)
            if value.dim() != 0:
                raise ValueError(f"loss_fn must return a 0-d loss, got shape {tuple(value.shape)}")
            n_tok = mb.extras["response_mask"].sum().to(torch.int)
            real = torch.tensor(float(any(r >= 0 for r in mb.rows)), device=value.device)
            return value, n_tok, {"loss": value.detach(), "_real": real,
                                  **{k: torch.as_tensor(v).detach().float() for k, v in stats.items()}}

        return loss

    # ------------------------------------------------------------------------------------------ export
    def export_hf_stream(self, dtype: Optional[torch.dtype] = None) -> Iterator[tuple]:
        """(hf_name, full tensor) for this PP stage, TP shards gathered; every TP rank of the stage must
        iterate it together (all-gathers inside). Fused groups (q/k/v, gate/up) come out consecutively."""
        from spark_megatron.models.weights import export_hf_weights

        return export_hf_weights(self._stage, self.mappings(),
                                 tied=self.shape.tie_word_embeddings, dtype=dtype)


def _finite_inputs(seqs: Sequence[SequenceSample], fields: list) -> bool:
    """Every per-token input of the update (advantages, old / reference / rollout logprobs) is finite."""
    for s in seqs:
        for name in fields:
            value = getattr(s, name)
            if isinstance(value, (int, float)):
                if not math.isfinite(value):
                    return False
            elif not torch.isfinite(torch.as_tensor(value, dtype=torch.float32)).all():
                return False
    return True


def _combine(key: str, values: list) -> float:
    """How a loss_fn metric adds up over micro-batches, DP ranks and optimizer steps: keys ending in `_sum` are
    summed, in `_max` maxed; the rest are averaged by the caller."""
    return float(max(values)) if key.endswith("_max") else float(sum(values))


def reduce_loss_metrics(outs: list) -> dict:
    """Sum the micro-batch losses (= the mini-batch objective) and average loss_fn metrics over real
    micro-batches, over DP (`_sum` / `_max` metrics: summed / maxed); the last PP stage's result is then sent
    to every stage."""
    ps = _ps()
    local = None
    if ps.is_pipeline_last_stage():
        sums: dict = {}
        n_real, loss_sum = 0, 0.0
        for out in outs:
            loss_sum += float(out["loss"])
            if float(out["_real"]) == 0.0:
                continue
            n_real += 1
            for k, v in out.items():
                if k not in ("loss", "_real"):
                    sums[k] = _combine(k, [sums[k], float(v)]) if k in sums else float(v)
        local = (loss_sum, n_real, sums)
        gathered = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(gathered, local, group=ps.get_data_parallel_group())
        total_loss = sum(g[0] for g in gathered)
        total_real = sum(g[1] for g in gathered)
        keys = sorted({k for g in gathered for k in g[2]})
        local = {"loss": total_loss}
        for k in keys:
            vals = [g[2][k] for g in gathered if k in g[2]]
            local[k] = _combine(k, vals) if k.endswith(("_sum", "_max")) else sum(vals) / max(total_real, 1)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        box = [local]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
        local = box[0]
    return dict(local)


def merge_step_metrics(per_step: list) -> dict:
    """Mean over optimizer steps (grad_norm over updated steps only); lr of the last step; counts summed."""
    if not per_step:
        return {"optimizer_steps": 0.0}
    out: dict = {}
    summed = {"skipped", "nonfinite", "zero_grad", "global_tokens", "sequences"}
    keys = sorted({k for m in per_step for k in m})
    for k in keys:
        vals = [m[k] for m in per_step if k in m]
        if k in summed or k.startswith("kind/") or k.endswith(("_sum", "_max")):
            out[k] = _combine(k, vals)
        elif k == "lr":
            out[k] = float(vals[-1])
        elif k == "grad_norm":
            ok = [v for m, v in zip(per_step, vals) if m.get("skipped", 0.0) == 0.0 and math.isfinite(v)]
            out[k] = float(sum(ok) / len(ok)) if ok else float("nan")
        else:
            out[k] = float(sum(vals) / len(vals))
    out["optimizer_steps"] = float(len(per_step))
    return out


__all__ = ["Actor", "LossFn", "SequenceSample", "share_per_token"]

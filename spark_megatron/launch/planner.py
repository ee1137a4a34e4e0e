"""Per-GPU memory plan of a recipe: what each pipeline stage holds, phase by phase, against the device memory.

Byte accounting follows Megatron's mixed precision with the distributed optimizer: parameters in params_dtype
(bf16: 2 B), main gradients in fp32 (4 B, `grad_reduce_in_fp32` as the actor configures DDP), and per element of
this DP rank's optimizer shard an fp32 master copy (4 B, only for non-fp32 parameters) plus Adam's two fp32
moments (8 B). Parameter and gradient buffers include Megatron's alignment/bucket padding (grad_buffers.py), so
on the local layer spec they equal what megatron-core allocates (tests/distributed/test_planner_counts.py).

Activations (bytes stored per micro-batch for backward) generalise Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", eq. 2) to GQA + SwiGLU without dropout, with flash attention (TE):
    per layer = T * [ (4h * e) / (t if SP else 1) + ((a + 2g) d e + a d e + 3 f e) / t + 4 a / t ]
for T = s x b tokens, hidden h, a query heads, g KV heads, head dim d, FFN width f, TP t, activation bytes e:
the norm inputs and GEMM inputs of QKV and fc1 (4h), Q/K/V after RoPE, the attention output, the gate/up outputs
and the SwiGLU output (3f), and flash attention's fp32 log-sum-exp. Without flash attention (the local spec)
the s^2 score matrix adds (4 + e) x b x a/t x s^2. With full recomputation only each layer's input (T h e) is
kept plus one layer's working set. FP8 (TE) stores the QKV/fc1/fc2 GEMM inputs in 1 byte and adds an FP8 copy
of the projection input. A 1F1B stage p keeps min(PP - p, micro-batches) micro-batches in flight.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from spark_megatron.launch.architecture import ModelArchitecture, rank_params, stage_layers, total_params
from spark_megatron.launch.grad_buffers import bucket_elements, buffer_layout, owned_elements
from spark_megatron.launch.validation import DeviceLayout, RecipeError, validate_recipe
from spark_megatron.models.qwen2 import padded_vocab_size
from spark_megatron.models.vision import vision_ffn_size

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class PlanOptions:
    """Planner knobs that are not part of a recipe."""

    gpu_memory_gib: Optional[float] = None
    """Device memory; None = the recipe's launch.gpu_memory_gib."""
    overhead_gib: float = 4.0
    """Per-GPU memory outside the accounted tensors: CUDA context, NCCL buffers, allocator fragmentation."""
    layer_spec: str = "auto"
    """te | local | auto (te when the target is a GPU with TE). local: no flash attention (s^2 scores kept)."""
    grad_reduce_in_fp32: bool = True
    """fp32 main gradients (what spark_megatron.train.actor configures)."""
    overlap_grad_reduce: bool = False
    """DDP bucketing for overlapped gradient reduction (changes only padding)."""
    bucket_size: Optional[int] = None
    """DDP bucket size in elements when overlapping (None = megatron's max(40M, 1M x DP))."""
    logits_bytes_per_element: int = 10
    """Last stage, per logit element of one micro-batch: bf16 logits + fp32 copy + fp32 softmax in the
    vocab-parallel log-softmax."""


@dataclass
class StageMemory:
    """Bytes one rank holds (pipeline stage `pp_rank`, the DP rank whose optimizer shard is largest)."""

    pp_rank: int
    dp_rank: int
    layers: int
    params: int
    """Parameter elements on the rank (unpadded; TP shard)."""
    trainable_params: int
    param_bytes: int
    grad_bytes: int
    master_param_bytes: int
    adam_bytes: int
    optimizer_elements: int
    """Elements of this rank's optimizer shard."""
    fp8_weight_bytes: int
    activation_bytes: int
    logits_bytes: int
    reference_bytes: int
    inflight_microbatches: int

    @property
    def optimizer_bytes(self) -> int:
        return self.master_param_bytes + self.adam_bytes

    @property
    def resident_bytes(self) -> int:
        """Held for the whole run: actor parameters, gradients, optimizer state and the reference model."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.reference_bytes


@dataclass
class RolloutMemory:
    """vLLM on one rollout GPU."""

    share_bytes: int
    """gpu_memory_utilization x device memory (or weights + kv_cache_memory_bytes when that is set)."""
    weight_bytes: int
    kv_cache_bytes: int
    kv_bytes_per_token: int
    kv_tokens: int
    """Tokens the KV cache of one engine holds."""
    sequences_at_max_len: int


@dataclass
class SyncTraffic:
    """One actor -> vLLM weight push into every engine (rollout/layout.py: what travels how)."""

    model_bytes: int
    """The full model in the rollout dtype (every HF tensor once)."""
    max_received_bytes: int
    """Most bytes one rank receives per push (`rollout.layout.push_volume` of the trainer's layout)."""
    block_bytes: int
    """Bytes of the tensors that reach the engines as per-rank blocks (held in place within their stage)."""
    bucket_bytes: int
    """The push's bucket buffer: rollout.sync_bucket_mb, or the largest reload unit when that is larger."""
    staging_bytes: int
    """Bound on the staging next to the bucket (the largest HF tensor)."""


@dataclass
class PhasePeak:
    phase: str
    pp_rank: int
    bytes: int
    """Accounted bytes (without the fixed overhead)."""


@dataclass
class PlanReport:
    """The typed result of `plan`; `format_report` renders it."""

    model_source: str
    architecture: str
    total_params: int
    layout: DeviceLayout
    layer_spec: str
    params_dtype: str
    fp8: Optional[str]
    seq_len: int
    micro_batch_size: int
    gpu_memory_bytes: int
    overhead_bytes: int
    stages: list
    rollout: RolloutMemory
    sync: SyncTraffic
    phases: list
    notes: list = field(default_factory=list)

    @property
    def peak(self) -> PhasePeak:
        return max(self.phases, key=lambda p: p.bytes)

    @property
    def peak_bytes(self) -> int:
        return self.peak.bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu_memory_bytes and self.rollout.kv_cache_bytes > 0


# ---------------------------------------------------------------------------------------------- state bytes

def _resolve_spec(cfg, opts: PlanOptions) -> str:
    if opts.layer_spec in ("te", "local"):
        return opts.layer_spec
    if opts.layer_spec != "auto":
        raise RecipeError(f"layer_spec must be te | local | auto, got '{opts.layer_spec}'")
    return "te" if cfg.launch.container_has_te and cfg.launch.gpu_arch != "cpu" else "local"


def state_bytes(entries: list, params_dtype: str, dp: int, dp_rank: int, pp_rank: int,
                distributed_optimizer: bool, opts: PlanOptions) -> dict:
    """Parameter / gradient / master / Adam bytes of one rank from its parameter list (DDP layout emulated)."""
    groups: dict = {}
    out = dict(param_bytes=0, grad_bytes=0, master_param_bytes=0, adam_bytes=0, optimizer_elements=0)
    for e in entries:
        pdt = params_dtype  # Float16Module casts every parameter, norms included, to bf16/fp16
        if e.frozen:
            out["param_bytes"] += e.numel * DTYPE_BYTES[pdt]
            continue
        gdt = "float32" if opts.grad_reduce_in_fp32 else pdt
        groups.setdefault((pdt, gdt), []).append(e)
    bucket = bucket_elements(dp, opts.overlap_grad_reduce, pp_rank, opts.bucket_size)
    for (pdt, gdt), group in groups.items():
        lay = buffer_layout([e.numel for e in group], [e.shared_embedding for e in group], dp,
                            distributed_optimizer, bucket)
        out["param_bytes"] += (lay.numel if distributed_optimizer else sum(e.numel for e in group)) * \
            DTYPE_BYTES[pdt]
        out["grad_bytes"] += lay.numel * DTYPE_BYTES[gdt]
        owned = sum(owned_elements(lay, dp, dp_rank)) if distributed_optimizer else sum(e.numel for e in group)
        out["optimizer_elements"] += owned
        out["master_param_bytes"] += owned * 4 if pdt != "float32" else 0
        out["adam_bytes"] += owned * 8
    return out


# ---------------------------------------------------------------------------------------------- activations

def layer_activation_bytes(tokens: int, seq: int, batch: int, h: int, heads: int, kv_heads: int, head_dim: int,
                           ffn: int, tp: int, e: int, sp: bool, fp8: bool, flash: bool) -> int:
    """Bytes one transformer layer stores for backward for one micro-batch (formula in the module doc)."""
    gemm_in = 1 if fp8 else e
    replicated = (2 * h * e + 2 * h * gemm_in) // (tp if sp else 1)
    sharded = ((heads + 2 * kv_heads) * head_dim * e + heads * head_dim * e + 2 * ffn * e + ffn * gemm_in
               + (heads * head_dim if fp8 else 0)) // tp + 4 * heads // tp
    total = tokens * (replicated + sharded)
    if not flash:
        total += (4 + e) * batch * (heads // tp) * seq * seq
    return total


def _inflight(lay: DeviceLayout, pp_rank: int) -> int:
    if lay.vpp:
        return min((lay.pp - pp_rank - 1) * 2 + (lay.vpp - 1) * lay.pp + 1, lay.microbatches * lay.vpp)
    return min(lay.pp - pp_rank, lay.microbatches)


def activation_bytes(cfg, arch: ModelArchitecture, lay: DeviceLayout, pp_rank: int, spec: str) -> tuple:
    """(stored activation bytes of the rank, in-flight micro-batches) for the first/middle/last stage."""
    t, m, s = arch.text, cfg.model, cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
    b, e = cfg.optim.micro_batch_size, DTYPE_BYTES[m.params_dtype]
    sp, fp8, flash = cfg.parallel.sequence_parallel, m.fp8 is not None, spec == "te"
    per_layer = layer_activation_bytes(s * b, s, b, t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim,
                                       t.intermediate_size, lay.tp, e, sp, fp8, flash)
    layers = len(stage_layers(t.num_layers, lay.pp, pp_rank))
    chunk_layers = layers // (lay.vpp or 1)
    inflight = _inflight(lay, pp_rank)
    if m.recompute_activations:
        kept = s * b * t.hidden_size * e // (lay.tp if sp else 1)
        total = kept * chunk_layers * inflight + per_layer
    else:
        total = per_layer * chunk_layers * inflight
    v = arch.vision
    if v is not None and pp_rank == 0 and not m.freeze_vision:
        # worst case: the prompt is all image tokens, each merging spatial_merge^2 patches
        patches = b * min(cfg.data.image_max_pixels // v.patch_size ** 2,
                          v.spatial_merge_size ** 2 * cfg.rollout.max_prompt_tokens)
        ffn = vision_ffn_size(v.intermediate_size, lay.tp)  # padded units hold (zero) activations too
        block = layer_activation_bytes(patches, patches, 1, v.hidden_size, v.num_heads, v.num_heads,
                                       v.hidden_size // v.num_heads, ffn, lay.tp, e, False, fp8, flash)
        # the tower is not recomputed; it runs in the first model chunk only
        total += block * v.depth * min(lay.pp - pp_rank, lay.microbatches)
    return total, inflight


def rank_memory(cfg, arch: ModelArchitecture, lay: DeviceLayout, pp_rank: int, dp_rank: int,
                opts: Optional[PlanOptions] = None) -> StageMemory:
    """Everything one rank (pp_rank, dp_rank; every TP rank alike) holds."""
    opts = opts or PlanOptions()
    spec = _resolve_spec(cfg, opts)
    m, par = cfg.model, cfg.parallel
    entries = rank_params(arch, lay.tp, lay.pp, pp_rank, par.make_vocab_size_divisible_by, m.freeze_vision)
    st = state_bytes(entries, m.params_dtype, lay.dp, dp_rank, pp_rank, par.use_distributed_optimizer, opts)
    act, inflight = activation_bytes(cfg, arch, lay, pp_rank, spec)
    logits = 0
    if pp_rank == lay.pp - 1:
        s = cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens
        vocab = padded_vocab_size(arch.text.vocab_size, par.make_vocab_size_divisible_by, lay.tp)
        logits = s * cfg.optim.micro_batch_size * (vocab // lay.tp) * opts.logits_bytes_per_element
    n = sum(e.numel for e in entries)
    ref = n * DTYPE_BYTES[m.params_dtype] if cfg.algorithm.kl_coef > 0 else 0
    fp8w = 2 * sum(e.numel for e in entries if e.linear) if m.fp8 else 0  # FP8 weight + its transpose
    return StageMemory(pp_rank=pp_rank, dp_rank=dp_rank, layers=len(stage_layers(arch.text.num_layers, lay.pp,
                                                                                  pp_rank)),
                       params=n, trainable_params=sum(e.numel for e in entries if not e.frozen),
                       fp8_weight_bytes=fp8w, activation_bytes=act, logits_bytes=logits, reference_bytes=ref,
                       inflight_microbatches=inflight, **st)


# ---------------------------------------------------------------------------------------------- rollout, sync

def rollout_memory(cfg, arch: ModelArchitecture, lay: DeviceLayout, device_bytes: int) -> RolloutMemory:
    ro, t = cfg.rollout, arch.text
    wbytes = 4 if cfg.model.params_dtype == "float32" else 2
    weights = total_params(arch) * wbytes // lay.rollout_tp
    kv_per_token = 2 * t.num_layers * max(1, t.num_kv_heads // lay.rollout_tp) * t.head_dim * wbytes
    if ro.kv_cache_memory_bytes:
        share, kv = weights + ro.kv_cache_memory_bytes, ro.kv_cache_memory_bytes
    else:
        share = int(ro.gpu_memory_utilization * device_bytes)
        kv = share - weights
    tokens = max(0, kv) // kv_per_token
    seq = ro.max_prompt_tokens + ro.max_response_tokens
    return RolloutMemory(share_bytes=share, weight_bytes=weights, kv_cache_bytes=kv,
                         kv_bytes_per_token=kv_per_token, kv_tokens=tokens, sequences_at_max_len=tokens // seq)


def push_tensors(cfg, arch: ModelArchitecture, lay: DeviceLayout) -> list:
    """The HF tensors of a push as `rollout.layout.PushTensor`s, one per Megatron parameter (a fused QKV / fc1
    is one reload unit and splits like its parts), with the trainer's block rule: at actor TP == rollout TP the
    decoder's linear weights and norms travel as blocks, the vocab tensors too when neither Megatron nor vLLM pads
    the vocabulary; the vision tower is assembled and broadcast."""
    from spark_megatron.rollout.layout import PushTensor

    wbytes = 4 if cfg.model.params_dtype == "float32" else 2
    shape, equal = arch.text, lay.tp == lay.rollout_tp
    vocab_block = equal and shape.vocab_size % 64 == 0
    out = []
    for p in range(lay.pp):
        for e in rank_params(arch, lay.tp, lay.pp, p, cfg.parallel.make_vocab_size_divisible_by):
            if shape.tie_word_embeddings and e.name.endswith("output_layer.weight"):
                continue  # HF ties lm_head to the embedding: not pushed
            vocab = e.name.endswith(("word_embeddings.weight", "output_layer.weight"))
            block = equal and not e.name.startswith("vision_model.") and \
                ((vocab_block and e.padding == 0) if vocab else (e.norm or ".decoder.layers." in f".{e.name}"))
            out.append(PushTensor((e.full_numel - e.padding) * wbytes, p, block, split=e.numel != e.full_numel))
    return out


def sync_traffic(cfg, arch: ModelArchitecture, lay: DeviceLayout) -> SyncTraffic:
    from spark_megatron.rollout.layout import push_volume

    tensors = push_tensors(cfg, arch, lay)
    volume = push_volume(lay.rollout, tensors)
    largest = max(t.nbytes for t in tensors)
    return SyncTraffic(model_bytes=volume.model_bytes, max_received_bytes=volume.max_received_bytes,
                       block_bytes=sum(t.nbytes for t in tensors if t.block),
                       bucket_bytes=max(cfg.rollout.sync_bucket_mb << 20, largest), staging_bytes=largest)


def _phases(stages: list, rollout: RolloutMemory, sync: SyncTraffic) -> list:
    """Colocated (the trainer's only layout): vLLM sleeps while the actor trains, wakes its weights for the push
    (one bucket + staging next to them), then its KV cache for the rollout."""
    out = []
    for st in stages:
        train = st.resident_bytes + st.activation_bytes + st.logits_bytes + st.fp8_weight_bytes
        out.append(PhasePeak("train", st.pp_rank, train))
        out.append(PhasePeak("rollout", st.pp_rank, st.resident_bytes + rollout.share_bytes))
        out.append(PhasePeak("sync", st.pp_rank, st.resident_bytes + rollout.weight_bytes + sync.bucket_bytes
                             + sync.staging_bytes))
    return out


def plan(cfg, arch: ModelArchitecture, opts: Optional[PlanOptions] = None, launching: bool = False) -> PlanReport:
    """Validate the recipe (RecipeError; `launching` adds the executor's checks) and compute its per-GPU memory
    plan. Does not check that it fits: see `PlanReport.fits` / `check_fits`."""
    opts = opts or PlanOptions()
    lay = validate_recipe(cfg, arch, launching)
    device = int((opts.gpu_memory_gib or cfg.launch.gpu_memory_gib) * GIB)
    stages = []
    for p in range(lay.pp):
        candidates = [rank_memory(cfg, arch, lay, p, r, opts) for r in range(lay.dp)]
        stages.append(max(candidates, key=lambda s: s.optimizer_bytes))
    rollout = rollout_memory(cfg, arch, lay, device)
    sync = sync_traffic(cfg, arch, lay)
    spec = _resolve_spec(cfg, opts)
    notes = []
    if cfg.launch.executor == "slurm" and not cfg.output_dir.startswith("/"):
        notes.append(f"output_dir '{cfg.output_dir}' is relative: on Slurm it lands in the job's code directory; "
                     "pass an absolute path on the shared filesystem")
    return PlanReport(model_source=arch.source, architecture=arch.architecture, total_params=total_params(arch),
                      layout=lay, layer_spec=spec, params_dtype=cfg.model.params_dtype, fp8=cfg.model.fp8,
                      seq_len=cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens,
                      micro_batch_size=cfg.optim.micro_batch_size, gpu_memory_bytes=device,
                      overhead_bytes=int(opts.overhead_gib * GIB), stages=stages, rollout=rollout, sync=sync,
                      phases=_phases(stages, rollout, sync), notes=notes)


def check_fits(report: PlanReport) -> None:
    """Raise RecipeError naming the phase and stage that exceed the device memory."""
    r = report
    if r.rollout.kv_cache_bytes <= 0:
        raise RecipeError(f"vLLM gets {r.rollout.share_bytes / GIB:.1f} GiB per GPU but its weights alone take "
                          f"{r.rollout.weight_bytes / GIB:.1f} GiB: raise rollout.gpu_memory_utilization or "
                          "rollout.tensor_parallel_size")
    if not r.fits:
        pk = r.peak
        where = "" if pk.pp_rank < 0 else f" on pipeline stage {pk.pp_rank}"
        raise RecipeError(f"does not fit: the {pk.phase} phase{where} needs {r.peak_bytes / GIB:.1f} GiB "
                          f"(incl. {r.overhead_bytes / GIB:.1f} GiB overhead) of {r.gpu_memory_bytes / GIB:.1f} GiB "
                          "per GPU; see `spark-megatron plan` for the breakdown")

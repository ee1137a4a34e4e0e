"""Benchmark: one Megatron actor training step against a plain HF transformers + torch AdamW step of the same
model, on the same tokens and the same device, in one run.

The model is a full-width Qwen2.5 with random weights (no download): `qwen2.5-1.5b`, `qwen2.5-7b` (use
`--layers` to cut its depth), or `--tiny` (a few-layer model for CPU, so CI runs this code path). Its weights
are rounded to bf16 and written once as an HF checkpoint; both sides start from exactly those values.

- Megatron: the project's Actor (spark_megatron/train/actor.py) built from that checkpoint in bf16 through the
  Qwen2 provider (models/qwen2.py): Float16Module + DDP (fp32 main gradients) + megatron's distributed
  optimizer (fp32 master weights, Adam), one `optimizer_step` = forward/backward over the micro-batches through
  megatron's schedule, grad clipping, Adam. Layer spec: Transformer Engine when it imports, else megatron's
  local spec (unfused attention that materialises the s x s scores; the accelerator machine has no TE).
- HF: `AutoModelForCausalLM` from the same config (attention: transformers' default, SDPA), fp32 master
  weights with bf16 autocast (the usual HF mixed precision), torch.optim.AdamW with torch's default
  implementation (the same class megatron falls back to without TE/apex), the same gradient accumulation,
  clipping and hyperparameters; gradients are kept allocated between steps like megatron's buffers.

Per side: step time (median of the timed steps after warm-up), tokens/s, achieved TFLOP/s, MFU against the
device's dense bf16 peak and against a bf16 GEMM measured in this run, first-step loss and grad norm (the two
sides should agree: same weights, same tokens), and memory: parameters, gradients, optimizer state (master
weights + Adam moments) counted from the tensors, activations = peak allocated during forward/backward minus
what was allocated before it, peak allocated over a step. FLOPs per token = 3 x forward, forward = 2 x
(matmul parameters incl. the LM head) + 4 x layers x seq x (heads x head_dim) (QK^T and AV over the full s x s,
the Megatron-LM / PaLM convention; causal kernels skip about half of that attention work).

    python bench/actor_step.py --model qwen2.5-1.5b --out OUT.json            # CUDA GPU
    python bench/actor_step.py --model qwen2.5-7b --layers 8 --out OUT.json
    python bench/actor_step.py --tiny --out OUT.json                          # CPU: code path only
The JSON layout is documented in docs/gpu_check.md (schema `spark_megatron.actor_step/1`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = "spark_megatron.actor_step/1"
_QWEN = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6,
             rope_theta=1000000.0, max_position_embeddings=32768, attention_dropout=0.0, use_sliding_window=False,
             bos_token_id=151643, eos_token_id=151645, initializer_range=0.02)
MODELS = {
    "qwen2.5-1.5b": dict(_QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(_QWEN, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=1024,
                 bos_token_id=0, eos_token_id=1),
}
"""HF config.json contents (Qwen2.5 architecture facts as published; random weights). `tiny` ties its embeddings
like the 1.5B, so the CPU dry run covers the tied path the first GPU model takes."""
BF16_DENSE_PEAK_TFLOPS = (("H200 NVL", 835.5), ("H100 NVL", 835.5), ("H100 PCIe", 756.5), ("H200", 989.4),
                          ("H100", 989.4), ("A100", 312.0))
"""Dense (no 2:4 sparsity) bf16 tensor-core peak from NVIDIA's data sheets, by device-name substring, first match:
H100/H200 SXM 989.4 TFLOP/s (1979 with sparsity), NVL 835.5, H100 PCIe 756.5, A100 312."""
OPTIM = dict(lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, clip_grad=1.0)


# ---------------------------------------------------------------------------------------------- accounting

def matmul_params(cfg: dict) -> int:
    """Parameters that take part in matrix products per token (attention/MLP projections + LM head)."""
    h, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    a, g = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // a
    per_layer = h * a * d + 2 * h * g * d + a * d * h + 3 * h * f
    return L * per_layer + h * cfg["vocab_size"]


def train_flops_per_token(cfg: dict, seq: int) -> int:
    """3 x forward; forward = 2 x matmul params + 4 x L x s x (heads x head_dim) (full s x s attention)."""
    a = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // a
    return 3 * (2 * matmul_params(cfg) + 4 * cfg["num_hidden_layers"] * seq * a * d)


def total_params(cfg: dict) -> int:
    h, f, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    a, g = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // a
    layer = h * a * d + 2 * h * g * d + a * d * h + (a + 2 * g) * d + 3 * h * f + 2 * h
    return L * layer + V * h * (1 if cfg["tie_word_embeddings"] else 2) + h


def device_peak_tflops(name: str):
    """(dense bf16 peak in TFLOP/s or None, where it comes from)."""
    for key, peak in BF16_DENSE_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak, f"data sheet, dense bf16, matched '{key}'"
    return None, "unknown device: no data-sheet peak"


def tensor_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if t is not None))


class Probe:
    """Wall-clock and allocator readings on the benchmark device (memory readings are None on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def allocated(self):
        return torch.cuda.memory_allocated() if self.cuda else None

    def peak(self):
        return torch.cuda.max_memory_allocated() if self.cuda else None

    def reserved_peak(self):
        return torch.cuda.max_memory_reserved() if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def release(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def gemm_tflops(device: torch.device, probe: Probe) -> float:
    """Achieved bf16 TFLOP/s of one large square matrix product (8192 on GPU, 512 on CPU): the physical
    ceiling of this device measured in this run."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    reps = 10
    t0 = probe.sync()
    for _ in range(reps):
        a @ b
    seconds = probe.sync() - t0
    return 2 * n ** 3 * reps / seconds / 1e12


# ---------------------------------------------------------------------------------------------- model and data

def model_config(args) -> dict:
    cfg = dict(MODELS["tiny" if args.tiny else args.model])
    cfg["full_depth_layers"] = cfg["num_hidden_layers"]
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    return cfg


def hf_config_dict(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "full_depth_layers"} | {"torch_dtype": "bfloat16"}


def make_checkpoint(cfg: dict, root: Path, device: torch.device, seed: int):
    """Random HF model in fp32 on `device` with bf16-representable weights, and the same weights written as a
    bf16 HF checkpoint at root/hf -> (model, path)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    hf_cfg = hf_config_dict(cfg)
    path = root / "hf"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=1))
    config = AutoConfig.from_pretrained(str(path))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(p.bfloat16().float())
            state[name] = p.detach().bfloat16().cpu().contiguous()
    if cfg["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    del state
    return model, path


def random_batch(vocab: int, sequences: int, seq_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (sequences, seq_len), generator=g)


# ---------------------------------------------------------------------------------------------- HF side

def hf_step(model, opt, batch: torch.Tensor, args, probe: Probe, marks: dict) -> tuple:
    """One optimizer step over micro-batches (token-mean CE over every predicted position) -> (loss, norm)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    tokens = (batch.shape[1] - 1) * batch.shape[0]
    opt.zero_grad(set_to_none=False)
    start_alloc = probe.allocated()
    probe.reset_peak()
    loss_sum = 0.0
    for mb in batch.split(args.micro_batch_size):
        mb = mb.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=mb).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), mb[:, 1:].reshape(-1),
                               reduction="sum") / tokens
        loss.backward()
        loss_sum += float(loss.detach())
        del logits, loss
    marks["fwd_bwd_end"], marks["fwd_bwd_peak"], marks["start_alloc"] = probe.sync(), probe.peak(), start_alloc
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["clip_grad"]))
    opt.step()
    return loss_sum, norm


def run_hf(model, batch: torch.Tensor, args, probe: Probe, base=None) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIM["lr"], betas=OPTIM["betas"],
                            weight_decay=OPTIM["weight_decay"])
    params = list(model.parameters())
    runs = []
    for _ in range(args.warmup + args.steps):
        marks: dict = {}
        t0 = probe.sync()
        loss, norm = hf_step(model, opt, batch, args, probe, marks)
        t1 = probe.sync()
        runs.append(dict(step_s=t1 - t0, fwd_bwd_s=marks["fwd_bwd_end"] - t0, optimizer_s=t1 - marks["fwd_bwd_end"],
                         loss=loss, grad_norm=norm, peak=probe.peak(), fwd_bwd_peak=marks["fwd_bwd_peak"],
                         start_alloc=marks["start_alloc"]))
    adam = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    memory = dict(params=tensor_bytes(params), grads=tensor_bytes(p.grad for p in params), master_params=0,
                  adam_states=tensor_bytes(adam))
    out = summarise(runs, args, memory, base=base)
    out.update(attn_implementation=getattr(model.config, "_attn_implementation", None),
               optimizer="torch.optim.AdamW (torch default implementation), fp32 master weights, bf16 autocast")
    del opt
    return out


# ---------------------------------------------------------------------------------------------- Megatron side

def _optimizer_bytes(optimizer) -> tuple:
    """(fp32 master-parameter bytes, Adam moment bytes) of megatron's (chained) optimizer."""
    from spark_megatron.train.optimizer import sub_optimizers

    master = adam = 0
    for opt in sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        master += tensor_bytes(p for g in inner.param_groups for p in g["params"] if p.dtype == torch.float32)
        adam += tensor_bytes(t for s in inner.state.values() for t in s.values()
                             if torch.is_tensor(t) and t.numel() > 1)
    return master, adam


def _buffer_bytes(optimizer, stage) -> tuple:
    """(parameter bytes, gradient bytes) of megatron's contiguous DDP buffers (padding included); the module's
    own tensors when the optimizer holds no buffers."""
    from spark_megatron.train.optimizer import sub_optimizers

    bufs = [b for opt in sub_optimizers(optimizer) for b in getattr(opt, "buffers", [])]
    if bufs:
        return tensor_bytes(b.param_data for b in bufs), tensor_bytes(b.grad_data for b in bufs)
    params = list(stage.parameters())
    return tensor_bytes(params), tensor_bytes(getattr(p, "main_grad", None) for p in params)


def build_actor(hf_dir: Path, args):
    from spark_megatron.config import ModelConfig, OptimConfig, ParallelConfig
    from spark_megatron.train.actor import Actor

    class BenchActor(Actor):
        """The project's Actor; construction only skips megatron's random init (single-threaded on CPU,
        seconds per billion parameters): every parameter is loaded from the checkpoint right after."""

        def _build_kwargs(self) -> dict:
            return {**super()._build_kwargs(), "init_weights": False}

    sequences = args.micro_batch_size * args.micro_batches
    optim = OptimConfig(lr=OPTIM["lr"], min_lr_ratio=1.0, warmup_ratio=0.0, adam_beta1=OPTIM["betas"][0],
                        adam_beta2=OPTIM["betas"][1], weight_decay=OPTIM["weight_decay"],
                        clip_grad=OPTIM["clip_grad"], micro_batch_size=args.micro_batch_size,
                        train_batch_size=sequences)
    return BenchActor(ModelConfig(hf_path=str(hf_dir), params_dtype="bfloat16"),
                      ParallelConfig(use_distributed_optimizer=True), optim, str(hf_dir),
                      total_steps=args.warmup + args.steps + 1)


def _token_mean_loss(logprobs, entropy, extras):
    mask = extras["response_mask"]
    return -(logprobs * mask).sum() / extras["global_token_count"], {}


def run_megatron(hf_dir: Path, batch: torch.Tensor, args, probe: Probe) -> dict:
    import spark_megatron.train.optimizer as optimizer_module
    from spark_megatron.models.qwen2 import have_transformer_engine
    from spark_megatron.train.batching import SequenceSample

    base = probe.allocated()
    t0 = time.perf_counter()
    actor = build_actor(hf_dir, args)
    build_s = time.perf_counter() - t0
    built = probe.allocated()
    seqs = [SequenceSample(tokens=row.tolist(), prompt_len=1) for row in batch]
    marks: dict = {}
    real_step = optimizer_module.step_optimizer

    def timed_step(optimizer, clip_grad):  # the actor calls this between backward and Adam
        marks["fwd_bwd_end"], marks["fwd_bwd_peak"] = probe.sync(), probe.peak()
        return real_step(optimizer, clip_grad)

    optimizer_module.step_optimizer = timed_step
    runs = []
    try:
        for _ in range(args.warmup + args.steps):
            start_alloc = probe.allocated()
            probe.reset_peak()
            s0 = probe.sync()
            metrics = actor.optimizer_step(seqs, _token_mean_loss)
            s1 = probe.sync()
            runs.append(dict(step_s=s1 - s0, fwd_bwd_s=marks["fwd_bwd_end"] - s0, optimizer_s=s1 - marks["fwd_bwd_end"],
                             loss=metrics["loss"], grad_norm=metrics["grad_norm"], peak=probe.peak(),
                             fwd_bwd_peak=marks["fwd_bwd_peak"], start_alloc=start_alloc, skipped=metrics["skipped"]))
    finally:
        optimizer_module.step_optimizer = real_step
    params, grads = _buffer_bytes(actor.optimizer, actor.model_chunks[0])
    master, adam = _optimizer_bytes(actor.optimizer)
    memory = dict(params=params, grads=grads, master_params=master, adam_states=adam)
    out = summarise(runs, args, memory, base=base)
    out.update(layer_spec="te" if have_transformer_engine() else "local", build_s=build_s,
               built_allocated_delta=None if base is None else built - base,
               skipped_steps=sum(r["skipped"] for r in runs))
    del actor
    return out


# ---------------------------------------------------------------------------------------------- summary

def summarise(runs: list, args, memory: dict, base=None) -> dict:
    """Timings of the timed steps (after warm-up), first-step loss/grad norm, memory in bytes."""
    timed = runs[args.warmup:]
    last = timed[-1]
    memory = dict(memory, optimizer=memory["master_params"] + memory["adam_states"])
    resident = memory["params"] + memory["grads"] + memory["optimizer"]
    if last["peak"] is not None:
        memory.update(activations=last["fwd_bwd_peak"] - last["start_alloc"],
                      peak_allocated=last["peak"] - (base or 0), step_start_allocated=last["start_alloc"] - (base or 0),
                      unaccounted=last["start_alloc"] - (base or 0) - resident)
    else:
        memory.update(activations=None, peak_allocated=None, step_start_allocated=None, unaccounted=None)
    return dict(step_s=[r["step_s"] for r in timed], step_s_median=statistics.median(r["step_s"] for r in timed),
                fwd_bwd_s_median=statistics.median(r["fwd_bwd_s"] for r in timed),
                optimizer_s_median=statistics.median(r["optimizer_s"] for r in timed),
                loss_first=runs[0]["loss"], grad_norm_first=runs[0]["grad_norm"],
                loss_last=last["loss"], memory=memory,
                peak_reserved=torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None)


def rates(side: dict, flops_per_step: float, tokens: int, peak, gemm: float) -> None:
    s = side["step_s_median"]
    side["tokens_per_s"] = tokens / s
    side["tflops"] = flops_per_step / s / 1e12
    side["mfu"] = side["tflops"] / peak if peak else None
    side["mfu_vs_gemm"] = side["tflops"] / gemm


def _rel(a, b):
    return abs(a - b) / abs(b) if b else None


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=[m for m in MODELS if m != "tiny"], default="qwen2.5-1.5b")
    ap.add_argument("--tiny", action="store_true", help="tiny model and batch (CPU code-path check)")
    ap.add_argument("--layers", type=int, default=None, help="cut the model to this many layers (full width)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="sequences per micro-batch (default 2)")
    ap.add_argument("--micro-batches", type=int, default=4, help="micro-batches per optimizer step")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocate Adam state, autotune)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="write the result JSON here")
    args = ap.parse_args(argv)
    args.seq_len = args.seq_len or (64 if args.tiny else 2048)
    args.micro_batch_size = args.micro_batch_size or 2
    if min(args.seq_len, args.micro_batch_size, args.micro_batches, args.steps) < 1 or args.warmup < 0:
        ap.error("--seq-len, --micro-batch-size, --micro-batches and --steps must be >= 1, --warmup >= 0")
    if args.layers is not None and args.layers < 1:
        ap.error("--layers must be >= 1")
    return args


def _scratch_root(nbytes: int):
    """/dev/shm when it has room for the checkpoint three times over (no disk I/O in the setup), else the
    default temporary directory."""
    import shutil

    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 3 * nbytes:
        return str(shm)
    return None


def _init_single_rank() -> None:
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.parallel.spawn import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    init_distributed(1, 1)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda if torch.cuda.is_available() else None}
    for name in ("transformers", "megatron-core", "transformer-engine"):
        try:
            out[name.replace("-", "_")] = version(name)
        except PackageNotFoundError:
            out[name.replace("-", "_")] = None
    return out


def _guarded(fn, *a):
    """Run one side; a failure becomes {"error": ...} so the other side's numbers are still reported."""
    import traceback

    try:
        return fn(*a)
    except Exception as e:  # noqa: BLE001 - reported in the JSON, the exit code says it failed
        return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("error: no CUDA GPU here; full-size models are for the accelerator (use --tiny on CPU)")
    _init_single_rank()
    probe = Probe(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    peak, peak_source = device_peak_tflops(name) if device.type == "cuda" else (None, "CPU: no peak")
    gemm = gemm_tflops(device, probe)
    cfg = model_config(args)
    sequences = args.micro_batch_size * args.micro_batches
    batch = random_batch(cfg["vocab_size"], sequences, args.seq_len, args.seed)
    probe.release()
    with tempfile.TemporaryDirectory(prefix="actor_step_", dir=_scratch_root(2 * total_params(cfg))) as tmp:
        base = probe.allocated()
        t0 = time.perf_counter()
        model, hf_dir = make_checkpoint(cfg, Path(tmp), device, args.seed)
        setup_s = time.perf_counter() - t0
        hf = _guarded(lambda: run_hf(model, batch, args, probe, base))
        del model
        probe.release()
        meg = _guarded(run_megatron, hf_dir, batch, args, probe)
    tokens = sequences * args.seq_len
    flops = train_flops_per_token(cfg, args.seq_len) * tokens
    for side in (hf, meg):
        if "error" not in side:
            rates(side, flops, tokens, peak, gemm)
    ratio = {}
    if "error" not in hf and "error" not in meg:
        ratio = dict(megatron_over_hf_tokens_per_s=meg["tokens_per_s"] / hf["tokens_per_s"],
                     loss_rel_diff=_rel(meg["loss_first"], hf["loss_first"]),
                     grad_norm_rel_diff=_rel(meg["grad_norm_first"], hf["grad_norm_first"]))
    return dict(
        schema=SCHEMA, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        model=dict(name="tiny" if args.tiny else args.model, params=total_params(cfg),
                   matmul_params=matmul_params(cfg), **{k: cfg[k] for k in (
                       "hidden_size", "intermediate_size", "num_hidden_layers", "full_depth_layers",
                       "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")}),
        hf_config=hf_config_dict(cfg),
        workload=dict(seq_len=args.seq_len, prompt_len=1, micro_batch_size=args.micro_batch_size,
                      micro_batches=args.micro_batches, sequences=sequences, tokens_per_step=tokens,
                      dtype="bfloat16", warmup_steps=args.warmup, timed_steps=args.steps, setup_s=setup_s),
        device=dict(type=device.type, name=name, bf16_peak_tflops=peak, peak_source=peak_source,
                    gemm_tflops=gemm, memory_bytes=torch.cuda.get_device_properties(0).total_memory
                    if device.type == "cuda" else None),
        flops=dict(per_step=flops, per_token=flops / tokens,
                   convention="3 x forward; forward = 2 x matmul params (incl. LM head) + 4 x layers x seq x "
                              "heads x head_dim (full s x s attention)"),
        megatron=meg, hf=hf, ratio=ratio, versions=_versions())


def summary_lines(r: dict) -> list:
    out = [f"{r['model']['name']} ({r['model']['params'] / 1e9:.2f} B params, {r['model']['num_hidden_layers']}/"
           f"{r['model']['full_depth_layers']} layers), {r['workload']['tokens_per_step']} tokens/step, "
           f"{r['device']['name']} (GEMM {r['device']['gemm_tflops']:.3g} TFLOP/s)"]
    for side in ("megatron", "hf"):
        s = r[side]
        if "error" in s:
            out.append(f"  {side:8s} FAILED: {s['error'].splitlines()[0]}")
            continue
        mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a"
        mem = s["memory"]
        peak = f", peak {mem['peak_allocated'] / 2**30:.1f} GiB" if mem["peak_allocated"] is not None else ""
        out.append(f"  {side:8s} {s['step_s_median'] * 1e3:9.1f} ms/step  {s['tokens_per_s']:10.0f} tok/s  "
                   f"{s['tflops']:7.3g} TFLOP/s  MFU {mfu}  loss {s['loss_first']:.4f}{peak}")
    if r["ratio"]:
        out.append(f"  Megatron/HF tokens/s {r['ratio']['megatron_over_hf_tokens_per_s']:.2f}x; first-step loss "
                   f"differs by {100 * r['ratio']['loss_rel_diff']:.2f}%, grad norm by "
                   f"{100 * r['ratio']['grad_norm_rel_diff']:.2f}%")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("\n".join(summary_lines(result)))
    return 1 if "error" in result["megatron"] or "error" in result["hf"] else 0


if __name__ == "__main__":
    sys.exit(main())

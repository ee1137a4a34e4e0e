"""Random-weight HF checkpoints at a published config's full width, depth reduced: what the conversion tests and
benchmarks run on (nothing is downloaded).

Tensor names and shapes come from the transformers model class built on the meta device, so they are an oracle
independent of this project's mappings (Qwen2.5-VL module names are turned into the hub checkpoint names, or kept,
by the family's naming). Values are pseudo-random bf16/f16/f32 bit patterns: a block of a prime number of random
values, rotated by a per-tensor offset, so that any element moved by a layout bug lands on a different value
(a move would have to be a multiple of the prime to go unseen); magnitudes are ~0.004-0.06 for weights and
0.5-2 for norm weights, so a forward pass stays finite. Files are written tensor by tensor (never the whole
model in memory), sharded like `save_pretrained` output with an index.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

BLOCK = 4_194_301
"""A prime: the period of the value pattern (elements)."""
PUBLISHED_PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056}
"""Qwen2.5-VL's published image-processor bounds."""


def reduced_config(config_path, layers: int, vision_depth: int = 2) -> dict:
    """A published config.json with `layers` decoder layers (and, for VL, `vision_depth` vision blocks whose last
    one uses full attention, the others windowed)."""
    cfg = json.loads(Path(config_path).read_text())
    cfg["num_hidden_layers"] = layers
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"]["num_hidden_layers"] = layers
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = min(cfg["max_window_layers"], layers)
    if isinstance(cfg.get("vision_config"), dict):
        cfg["vision_config"]["depth"] = vision_depth
        cfg["vision_config"]["fullatt_block_indexes"] = [vision_depth - 1]
    return cfg


def _block(seed: int, dtype: torch.dtype, norm: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bfloat16:  # sign | exponent | 7 mantissa bits, built in int32 (random_ on int16 has no sign)
        r = torch.empty(BLOCK, dtype=torch.int32).random_(0, 1 << 16, generator=gen)
        sign = 0 if norm else (r >> 15) & 1
        exp = (126 + ((r >> 7) & 1)) if norm else (119 + ((r >> 7) & 3))  # [0.5, 2) for norms, else [2^-8, 2^-4)
        bits = (sign << 15) | (exp << 7) | (r & 0x7F)
        return torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16).view(torch.bfloat16)
    vals = torch.rand(BLOCK, generator=gen) * (1.5 if norm else 0.06) + (0.5 if norm else 0.004)
    if not norm:
        vals *= torch.randint(0, 2, (BLOCK,), generator=gen) * 2 - 1
    return vals.to(dtype)


def random_tensor(name: str, shape: tuple, dtype: torch.dtype, blocks: dict) -> torch.Tensor:
    norm = "norm" in name or "ln_q" in name
    if (dtype, norm) not in blocks:
        blocks[(dtype, norm)] = _block(len(blocks) + 1, dtype, norm)
    base = blocks[(dtype, norm)]
    n = 1
    for d in shape:
        n *= d
    off = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % BLOCK
    reps = -(-(n + off) // BLOCK)
    return base.repeat(reps)[off:off + n].view(shape)


def hf_tensor_specs(hf_dir, scheme: str = "hub") -> list:
    """[(checkpoint name, canonical name, shape)] of the model whose config.json is in `hf_dir`, in the
    transformers model's order (the canonical name seeds the values, so both schemes hold the same model)."""
    import transformers

    from spark_megatron.models.families import family_for_config, read_hf_config

    cfg = read_hf_config(hf_dir)
    family = family_for_config(cfg)
    config = transformers.AutoConfig.from_pretrained(str(hf_dir))
    with torch.device("meta"):
        model = getattr(transformers, family.hf_model_class)(config)
    tied = bool(cfg.get("tie_word_embeddings", False))
    specs = []
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # save_pretrained drops the tied head
        canonical = name
        if family.hf_naming is not None:  # module names are the transformers scheme
            canonical = family.hf_naming.to_canonical(name, "transformers") or name
            name = family.hf_naming.to_scheme(canonical, scheme)
        specs.append((name, canonical, tuple(t.shape)))
    return specs


def write_random_checkpoint(cfg: dict, out_dir, scheme: str = "hub", max_shard_bytes: int = 2 * 10**9) -> Path:
    """Write config.json, the safetensors shards (+ index) and, for VL, preprocessor_config.json."""
    from spark_megatron.models.hf_files import safetensors_header, tensor_bytes, write_all

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    specs = hf_tensor_specs(out, scheme)
    files, size = [[]], 0
    for name, canonical, shape in specs:
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append((name, canonical, shape))
        size += nbytes
    names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    blocks: dict = {}
    for fname, entries in zip(names, files):
        fd = os.open(out / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, memoryview(safetensors_header([(n, s) for n, _, s in entries], dtype)))
            for _, canonical, shape in entries:
                write_all(fd, tensor_bytes(random_tensor(canonical, shape, dtype, blocks)))
        finally:
            os.close(fd)
    if len(files) > 1:
        weight_map = {n: f for f, entries in zip(names, files) for n, _, _ in entries}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if "vision_config" in cfg:
        from spark_megatron.models.tiny_vl_checkpoint import write_preprocessor_config

        write_preprocessor_config(out, **PUBLISHED_PREPROCESSOR)
    return out

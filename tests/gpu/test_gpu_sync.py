"""GPU: gather + rename + bucket of a few-GB random Qwen2 actor on CUDA, timed against a device memcpy of the same
bytes, with the peak extra device memory of the push. Skipped without CUDA; NOT RUN on the CPU development
machine (unverified there). Uses TP2 over NCCL when two GPUs are visible, TP1 otherwise."""
from __future__ import annotations

import pytest
import torch

from spark_megatron.parallel.spawn import run_on_ranks

pytestmark = pytest.mark.gpu

BUCKET_BYTES = 512 << 20
MIN_RATIO = 0.5
"""Required push throughput as a fraction of a device-to-device memcpy of the same bytes."""


def _shape():
    from spark_megatron.models.qwen2 import TextModelShape

    # ~0.5 B parameters: ~2 GB in fp32
    return TextModelShape(architecture="Qwen2ForCausalLM", vocab_size=32000, hidden_size=2048,
                          intermediate_size=5632, num_layers=8, num_heads=16, num_kv_heads=4, head_dim=128,
                          rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=4096,
                          tie_word_embeddings=False)


def _cuda_timed(fn) -> float:
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _job(rank, world):
    from spark_megatron.models.qwen2_mapping import qwen2_mappings
    from spark_megatron.models.qwen2 import build_stage
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.sync import LiveBytes, NullSink, push_actor_weights

    init_distributed(world, 1)
    shape = _shape()
    registry = qwen2_mappings(shape)
    model = build_stage(shape, "float32")
    sink = NullSink() if rank == 0 else None

    def push(tracker=None):
        return push_actor_weights([model], registry, 1, BUCKET_BYTES, sink=sink, dtype=torch.float32,
                                  tracker=tracker)

    push()  # warm-up: NCCL communicators, allocator pools
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tracker = LiveBytes()
    runs = []
    seconds = min(_cuda_timed(lambda: runs.append(push(tracker))) for _ in range(3))
    peak_extra = torch.cuda.max_memory_allocated() - base
    nbytes = runs[0].bytes
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    memcpy_s = min(_cuda_timed(lambda: dst.copy_(src)) for _ in range(5))
    largest_param = max(p.numel() * p.element_size() * world for p in model.parameters())
    return dict(bytes=nbytes, push_s=seconds, memcpy_s=memcpy_s, peak_extra=peak_extra,
                capacity=runs[0].bucket_capacity, largest_param=largest_param, counter_peak=tracker.peak)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_reshard_bucket_throughput_vs_device_memcpy():
    world = 2 if torch.cuda.device_count() >= 2 else 1
    r = run_on_ranks(_job, world, timeout_s=900)[0]
    push_bps, memcpy_bps = r["bytes"] / r["push_s"], r["bytes"] / r["memcpy_s"]
    ratio = push_bps / memcpy_bps
    print(f"TP{world}: {r['bytes'] / 2**30:.2f} GiB pushed at {push_bps / 1e9:.1f} GB/s, device memcpy "
          f"{memcpy_bps / 1e9:.1f} GB/s, ratio {ratio:.2f}; peak extra device memory "
          f"{r['peak_extra'] / 2**20:.0f} MiB (bucket {r['capacity'] / 2**20:.0f} MiB, largest full parameter "
          f"{r['largest_param'] / 2**20:.0f} MiB)")
    # gathered parameter + its HF pieces + the TP all-gather's receive list live next to the bucket at most
    assert r["peak_extra"] <= r["capacity"] + 3 * r["largest_param"]
    assert r["counter_peak"] <= r["capacity"] + r["largest_param"]
    assert ratio >= MIN_RATIO, f"push at {ratio:.2f}x device memcpy (goal {MIN_RATIO})"

"""Initialise torch.distributed + Megatron model-parallel groups for one process (GPU/NCCL or CPU/gloo)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from spark_megatron.parallel import cpu_compat


def init_distributed(tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 1234,
                     timeout_s: int = 600) -> None:
    """Create the default process group from torchrun-style env vars, then Megatron's TP/PP/DP groups.

    Uses NCCL when CUDA is present and gloo (with the CPU shims) otherwise. Idempotent per process.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cpu_compat.enable()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if cpu_compat.cuda_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cpu_compat.cuda_available() else "gloo", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by TP {tp} x PP {pp}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    import sys

    # megatron's groups exist only where megatron was imported: a rank that never used it (an evaluation rank)
    # does not pay its import (seconds) at exit
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

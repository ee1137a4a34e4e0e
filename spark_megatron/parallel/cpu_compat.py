"""Run megatron-core 0.16+ on CPU over gloo, without forking it.

megatron-core assumes CUDA in three ways; each gets the smallest possible shim, and all of them are no-ops when
CUDA is available:

1. device placement: literal ``device="cuda"``, ``torch.cuda.current_device()``, ``.cuda()`` and
   ``torch.cuda.synchronize()`` in schedules, buffers, optimizers and dist_checkpointing. A TorchFunctionMode
   rewrites CUDA devices to CPU at call time (measured overhead ~15% on a tiny fwd+bwd, zero on GPU).
2. RNG: ``CudaRNGStatesTracker`` snapshots/restores the CUDA generator; on CPU it tracks the CPU generator, so
   tensor-parallel dropout forks still give per-rank streams.
3. type checks: the optimizer and grad clipping assert ``param.type() == 'torch.cuda.FloatTensor'``; under the
   mode, ``Tensor.type()`` reports the CUDA spelling of CPU tensor types.

The mode is thread-local: call :func:`enable` in each worker process/thread that runs Megatron code.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE = None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # bare ints mean "cuda:<i>" in torch factory functions
    return isinstance(dev, int) and not isinstance(dev, bool)


_CPU = torch.device("cpu")


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and neutralises .cuda()/pin_memory on tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory or func is torch.Tensor.record_stream:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones,
                    torch.Tensor.new_full, torch.Tensor.new_tensor):
            args = tuple(_CPU if _is_cuda_device(a) and not isinstance(a, int) else a for a in args)
            if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], int) and not isinstance(
                    args[1], bool):
                args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


def _noop(*_a, **_k):
    return None


def _fresh_noop():
    # torch._dynamo's rule map rejects one function object bound to several torch names
    return lambda *_a, **_k: None


class _NullStream:
    """Stands in for torch.cuda.Stream: everything is synchronous on CPU."""

    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _NullEvent:
    def __init__(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = _fresh_noop()
    cuda.set_device = _fresh_noop()
    cuda.empty_cache = _fresh_noop()
    # the CPU generator stands in for the CUDA one (torch.manual_seed itself calls cuda.manual_seed_all)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = _fresh_noop()
    cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.device_count = lambda: 1
    if hasattr(cuda, "nvtx"):
        cuda.nvtx.range_push = _fresh_noop()
        cuda.nvtx.range_pop = _fresh_noop()


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def enable() -> None:
    """Install the CPU shims in this process and enter the device mode on this thread (idempotent)."""
    global _ENABLED, _MODE
    if cuda_available():
        return
    if not _ENABLED:
        # megatron's jit_fuser wraps small ops in torch.compile; on CPU compiling costs seconds and gains nothing
        import torch._dynamo

        torch._dynamo.config.disable = True
        _patch_torch_cuda()
        _patch_megatron_rng()
        _ENABLED = True
    if _MODE is None:
        _MODE = CudaToCpuMode()
        _MODE.__enter__()


def disable() -> None:
    """Leave the device mode on this thread (the torch.cuda patches stay: they are harmless without CUDA)."""
    global _MODE
    if _MODE is not None:
        _MODE.__exit__(None, None, None)
        _MODE = None


def compute_device() -> torch.device:
    """The device Megatron modules live on in this process."""
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else _CPU

"""The frozen reference policy (the initial model) for the KL term: same family and TP/PP layout as the actor,
no gradients, no optimizer; optionally parked in host memory between uses on GPU."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from spark_megatron.train.actor import LogprobRunner
from spark_megatron.train.batching import SequenceSample


class ReferenceModel(LogprobRunner):
    """Build on every rank after `init_distributed(tp, pp)`:
        ReferenceModel(model_cfg, parallel_cfg, hf_dir, micro_batch_size=..., offload=False)
    `offload=True` keeps the weights on the CPU between `compute_logprobs` calls (moved to the GPU for the call
    and back after it); a no-op without CUDA.
    """

    def __init__(self, model_cfg, parallel_cfg, hf_dir: Optional[str] = None, micro_batch_size: int = 1,
                 offload: bool = False, logit_temperature: float = 1.0, cache_images: bool = True, start=None):
        super().__init__(model_cfg, parallel_cfg, hf_dir, micro_batch_size, logit_temperature, cache_images, start)
        self._stage.eval()
        for p in self._stage.parameters():
            p.requires_grad_(False)
        self.offload = bool(offload) and torch.cuda.is_available()
        if self.offload:
            self._move("cpu")

    def _move(self, device) -> None:
        # parameters and buffers both: rotary inv_freq etc. live in buffers
        self._stage.to(device)
        if device == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def compute_logprobs(self, seqs: Sequence[SequenceSample]) -> list:
        return self._with_weights_on_device(super().compute_logprobs, seqs)

    def compute_logprobs_and_entropy(self, seqs: Sequence[SequenceSample]) -> tuple:
        return self._with_weights_on_device(super().compute_logprobs_and_entropy, seqs)

    def _with_weights_on_device(self, fn, seqs):
        if not self.offload:
            return fn(seqs)
        from spark_megatron.parallel.cpu_compat import compute_device

        self._move(compute_device())
        try:
            return fn(seqs)
        finally:
            self._move("cpu")

"""Actor / ReferenceModel on one CUDA GPU (NCCL): HF agreement in fp32, reference offload between calls, a bf16
optimizer step. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from spark_megatron.parallel.spawn import run_on_ranks
from tests.distributed import actor_oracle as oracle

pytestmark = [pytest.mark.gpu, pytest.mark.distributed,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _gpu_worker(rank, world, hf_dir):
    from spark_megatron.config import ModelConfig
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.train.actor import Actor
    from spark_megatron.train.reference import ReferenceModel

    init_distributed(tp=1, pp=1, seed=1)
    seqs = oracle.make_seqs(vocab=400, n=6)
    model_cfg, par, optim = oracle.configs(1, 1, mbs=2)
    ref = ReferenceModel(model_cfg, par, hf_dir, micro_batch_size=2, offload=True)
    idle_device = next(ref.model_chunks[0].parameters()).device.type
    ref_lp = ref.compute_logprobs(seqs)
    after_device = next(ref.model_chunks[0].parameters()).device.type
    actor = Actor(model_cfg, par, optim, hf_dir, total_steps=4)
    lp, ent = actor.compute_logprobs_and_entropy(seqs)
    step = actor.optimizer_step(seqs, oracle.token_mean_loss)
    bf16 = Actor(ModelConfig(params_dtype="bfloat16"), par, optim, hf_dir, total_steps=4)
    bf16_steps = [bf16.optimizer_step(seqs, oracle.token_mean_loss) for _ in range(2)]
    return oracle.portable({"idle": idle_device, "after": after_device, "ref_lp": ref_lp, "lp": lp, "ent": ent,
                            "step": step, "bf16": bf16_steps})


def test_actor_on_gpu(tmp_path):
    from spark_megatron.models.tiny_checkpoint import TinyQwen2Spec, write_tiny_qwen2

    hf_dir = str(write_tiny_qwen2(tmp_path / "m", TinyQwen2Spec(num_hidden_layers=2)))
    out = oracle.restore(run_on_ranks(_gpu_worker, 1, hf_dir, timeout_s=600)[0])
    seqs = oracle.make_seqs(vocab=400, n=6)
    with torch.no_grad():
        lps, ents = oracle.hf_logprobs_entropy(oracle.hf_model(hf_dir), seqs)
    assert out["idle"] == "cpu" and out["after"] == "cpu"  # offloaded between calls
    for i in range(len(seqs)):
        assert torch.allclose(out["lp"][i], lps[i], atol=1e-4)
        assert torch.allclose(out["ent"][i], ents[i], atol=1e-4)
        assert torch.allclose(out["ref_lp"][i], out["lp"][i], atol=1e-5)
    loss, _, norm, _ = oracle.hf_step(hf_dir, seqs)
    assert abs(out["step"]["loss"] - loss) < 1e-4 and abs(out["step"]["grad_norm"] - norm) / norm < 1e-4
    for m in out["bf16"]:
        assert m["skipped"] == 0.0 and m["loss"] == m["loss"]

"""The planner's per-rank parameter, gradient and optimizer bytes equal what megatron-core really allocates.

Four gloo ranks build real stages of tiny Qwen2 (tied and untied) and Qwen2.5-VL models through the production
Actor (DDP + DistributedOptimizer, bf16 with fp32 main grads) or, for the bucketed case, megatron DDP with a
small bucket size; one zero-gradient optimizer step creates Adam's state. Each rank reports its parameter names
and sizes, the DDP param/grad buffer bytes, the fp32 master shards and the Adam moments; the parent compares
them with `planner.rank_memory` for the same (PP rank, DP rank). All layouts run in one spawn (imports dominate).
"""
from __future__ import annotations

import pytest

from spark_megatron.config import load_config
from spark_megatron.launch.architecture import ModelArchitecture, rank_params
from spark_megatron.launch.planner import PlanOptions, rank_memory
from spark_megatron.launch.validation import device_layout
from spark_megatron.parallel.spawn import run_on_ranks

pytestmark = pytest.mark.distributed

BUCKET = 30_000
SCENARIOS = [  # (model, tp, pp, params dtype, builder)
    ("untied", 2, 2, "bfloat16", "actor"),
    ("tied", 2, 2, "bfloat16", "actor"),
    ("untied", 1, 2, "float32", "actor"),  # DP 2: optimizer state sharded across data-parallel ranks
    ("tied", 2, 1, "bfloat16", "bucketed"),  # DP 2, overlap_grad_reduce with many small buckets
    ("vl", 2, 2, "bfloat16", "actor"),  # vision tower on the first stage, its odd MLP width zero-padded
]


def _measure(stage, ddp, optimizer) -> dict:
    from megatron.core import parallel_state as ps

    from spark_megatron.train.optimizer import sub_optimizers, step_optimizer

    step_optimizer(optimizer, clip_grad=1.0)  # zero grads: creates Adam's moments, moves nothing
    master = adam = 0
    for opt in sub_optimizers(optimizer):
        for group in getattr(opt, "shard_fp32_from_float16_groups", []):
            master += sum(p.nbytes for p in group)
        for state in opt.optimizer.state.values():
            adam += state["exp_avg"].nbytes + state["exp_avg_sq"].nbytes
    frozen = sum(p.nbytes for p in stage.parameters() if not p.requires_grad)
    return dict(pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
                named=[(n, p.numel()) for n, p in stage.named_parameters()],
                param_bytes=sum(b.param_data.nbytes for b in ddp.buffers) + frozen,
                grad_bytes=sum(b.grad_data.nbytes for b in ddp.buffers), master_param_bytes=master, adam_bytes=adam)


def _bucketed(hf_dir, dtype):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from spark_megatron.config import OptimConfig
    from spark_megatron.models.families import load_family
    from spark_megatron.train.optimizer import megatron_optimizer_config

    fam, shape = load_family(hf_dir)
    stage = fam.build_stage(shape, dtype)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True,
                                            use_distributed_optimizer=True, bucket_size=BUCKET)
    ddp = DistributedDataParallel(config=stage.config, ddp_config=ddp_cfg,
                                  module=Float16Module(stage.config, stage))
    opt = get_megatron_optimizer(megatron_optimizer_config(OptimConfig(), dtype, True), [ddp])
    return stage, ddp, opt


def _worker(rank, world, dirs, scenarios):
    from spark_megatron.config import ModelConfig, OptimConfig, ParallelConfig
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.train.actor import Actor

    out = []
    for model, tp, pp, dtype, builder in scenarios:
        init_distributed(tp, pp)
        if builder == "bucketed":
            stage, ddp, opt = _bucketed(dirs[model], dtype)
        else:
            actor = Actor(ModelConfig(hf_path=dirs[model], params_dtype=dtype),
                          ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                          OptimConfig(lr=1e-3), dirs[model], total_steps=1)
            stage, ddp, opt = actor._stage, actor._ddp[0], actor.optimizer
        out.append(_measure(stage, ddp, opt))
    return out


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from spark_megatron.models.tiny_checkpoint import TinyQwen2Spec, write_tiny_qwen2
    from spark_megatron.models.tiny_vl_checkpoint import TinyQwen25VLSpec, write_tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("planner_models")
    return {"untied": str(write_tiny_qwen2(root / "untied", TinyQwen2Spec())),
            "tied": str(write_tiny_qwen2(root / "tied", TinyQwen2Spec(tie_word_embeddings=True))),
            # vision MLP width 97: TP 2 pads it to 128, which the planner must count as megatron allocates it
            "vl": str(write_tiny_qwen2_5_vl(root / "vl", TinyQwen25VLSpec(vision_intermediate_size=97)))}


def _planned(hf_dir, tp, pp, dtype, builder, pp_rank, dp_rank):
    cfg = load_config(None, [f"model.params_dtype={dtype}", f"parallel.tensor_model_parallel_size={tp}",
                             f"parallel.pipeline_model_parallel_size={pp}",
                             f"parallel.data_parallel_size={4 // (tp * pp)}", "launch.gpus_per_node=4",
                             "launch.gpu_arch=cpu", "launch.container_has_te=false"])
    arch = ModelArchitecture.from_path(hf_dir)
    opts = PlanOptions(layer_spec="local", overlap_grad_reduce=builder == "bucketed", bucket_size=BUCKET)
    lay = device_layout(cfg)
    names = [(e.name, e.numel) for e in rank_params(arch, tp, pp, pp_rank)]
    return names, rank_memory(cfg, arch, lay, pp_rank, dp_rank, opts)


def test_planner_bytes_equal_megatron_buffers(tiny_dirs):
    results = run_on_ranks(_worker, 4, tiny_dirs, SCENARIOS, timeout_s=400)
    for i, (model, tp, pp, dtype, builder) in enumerate(SCENARIOS):
        dp_ranks_seen = set()
        for rank, per_rank in enumerate(results):
            real = per_rank[i]
            where = f"{model} TP{tp} PP{pp} {dtype} {builder}, rank {rank} (pp {real['pp_rank']}, dp {real['dp_rank']})"
            names, plan = _planned(tiny_dirs[model], tp, pp, dtype, builder, real["pp_rank"], real["dp_rank"])
            assert names == real["named"], where
            assert plan.params == sum(n for _, n in real["named"]), where
            for key in ("param_bytes", "grad_bytes", "master_param_bytes", "adam_bytes"):
                assert getattr(plan, key) == real[key], f"{where}: {key} planned {getattr(plan, key)} != {real[key]}"
            dp_ranks_seen.add((real["pp_rank"], real["dp_rank"]))
        # every (PP rank, DP rank) was compared: with DP 2 the two DP ranks own different optimizer slices
        assert len(dp_ranks_seen) == pp * (4 // (tp * pp)), where

"""Megatron Qwen2 == HF transformers Qwen2 (the oracle), fp32, at TP1, TP2, PP2 and TP2xPP2, tied and untied.

One spawned run of 4 gloo ranks walks every (variant, layout) pair: building 8 stages costs far less than
spawning 8 times. Weights come from the HF safetensors through the declarative mappings (load_hf_weights).
"""
from __future__ import annotations

import pytest

from tests.helpers import random_tokens, tiny_hf_checkpoint

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
TOL = 1e-4


def _embedding_sync(stage) -> dict:
    """Collective over the embedding group (first + last stage): is the last stage's output-layer copy of a
    tied embedding equal to the first stage's embedding right after construction (megatron's init sync)?"""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not ps.is_rank_in_embedding_group():
        return {}
    group = ps.get_embedding_group()
    local = stage.embedding.word_embeddings.weight if ps.is_pipeline_first_stage() else stage.output_layer.weight
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return {"equal": all(torch.equal(parts[0], p) for p in parts[1:]),
            "nonzero": bool(local.abs().sum() > 0), "members": len(parts)}


def _parity_rank(rank: int, world: int, hf_dirs: dict) -> list:
    from spark_megatron.models.families import load_family
    from spark_megatron.models.parity import compare_stage
    from spark_megatron.models.weights import HFCheckpointReader, load_hf_weights
    from spark_megatron.parallel.groups import init_distributed
    from tests.helpers import hf_model

    out = []
    for kind, hf_dir in hf_dirs.items():
        family, shape = load_family(hf_dir)
        oracle = hf_model(hf_dir)
        reader, registry = HFCheckpointReader(hf_dir), family.mappings(shape)
        tokens = random_tokens(shape.vocab_size, batch=2, seq_len=24, seed=0)
        for tp, pp in LAYOUTS:
            init_distributed(tp, pp)
            stage = family.build_stage(shape, "float32")
            sync = _embedding_sync(stage) if shape.tie_word_embeddings and pp > 1 else {}
            load_hf_weights(stage, reader, registry, tied=shape.tie_word_embeddings)
            report = compare_stage(stage, oracle, tokens, shape.vocab_size)
            out.append({"kind": kind, "tp": tp, "pp": pp, "logits": report.logits_max_abs_diff,
                        "hidden": dict(report.hidden_max_abs_diff), "sync": sync,
                        "num_layers": shape.num_layers})
    return out


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_megatron_logits_match_hf_at_every_layout_tied_and_untied():
    from spark_megatron.parallel.spawn import run_on_ranks

    hf_dirs = {"untied": str(tiny_hf_checkpoint("untied")), "tied": str(tiny_hf_checkpoint("tied"))}
    per_rank = run_on_ranks(_parity_rank, 4, hf_dirs, timeout_s=360)
    rows = per_rank[0]
    assert [(r["kind"], r["tp"], r["pp"]) for r in rows] == [(k, tp, pp) for k in hf_dirs for tp, pp in LAYOUTS]
    for r in rows:
        where = f"{r['kind']} TP{r['tp']} PP{r['pp']}"
        print(f"{where}: logits {r['logits']:.2e}, worst hidden {max(r['hidden'].values()):.2e}")
        assert r["logits"] <= TOL, f"{where}: logits differ by {r['logits']:.3e}"
        # HF exposes layer L-1 only after the final norm, hence 'final_norm' instead of its raw output
        assert set(r["hidden"]) == set(range(r["num_layers"] - 1)) | {"final_norm"}, where
        worst = max(r["hidden"].values())
        assert worst <= TOL, f"{where}: a layer's hidden state differs by {worst:.3e}"
    # tied + PP>1: the last stage holds its own copy of the embedding as output layer; megatron syncs it over
    # the embedding group at construction (zeros + all-reduce), which must work over gloo
    for rank_rows in per_rank:
        for r in rank_rows:
            if r["kind"] == "tied" and r["pp"] > 1 and r["sync"]:
                assert r["sync"]["members"] == 2 and r["sync"]["equal"] and r["sync"]["nonzero"], r
    synced = [r for rank_rows in per_rank for r in rank_rows if r["sync"]]
    assert len(synced) == 8  # 4 ranks x the two tied PP2 layouts: every rank sits in an embedding group

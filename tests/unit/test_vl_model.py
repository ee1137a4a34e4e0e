"""Qwen2.5-VL pieces that need no process group: mRoPE positions vs HF, family/mappings, image cache semantics."""
from __future__ import annotations

import pytest
import torch

from spark_megatron.models.qwen2_5_vl import VLInputError, mrope_position_ids
from spark_megatron.vision import ImageEmbeddingCache, PreparedImage

pytestmark = pytest.mark.unit
IMG = 9  # image-pad id used in the synthetic sequences


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    from spark_megatron.models.tiny_vl_checkpoint import write_tiny_qwen2_5_vl

    return write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("vl"))


def _seq(parts):
    """parts: ints (text length) or (t, h, w) grids -> token list with image runs."""
    out = []
    for p in parts:
        out += [IMG] * (p[0] * p[1] * p[2] // 4) if isinstance(p, tuple) else list(range(20, 20 + p))
    return out


@pytest.mark.parametrize("parts", [[5], [3, (1, 4, 6), 4], [2, (1, 6, 4), 1, (1, 2, 2), 3], [(1, 4, 4), 2]])
def test_mrope_positions_match_hf_get_rope_index(vl_dir, parts):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(vl_dir)
    hf.config.image_token_id = IMG
    ids = torch.tensor([_seq(parts)])
    grids = [p for p in parts if isinstance(p, tuple)]
    grid_t = torch.tensor(grids) if grids else None
    ours = mrope_position_ids(ids, grid_t, IMG, 2)
    if grids:
        ref, _ = hf.model.get_rope_index(ids, mm_token_type_ids=(ids == IMG).int(), image_grid_thw=grid_t)
    else:
        ref = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    assert torch.equal(ours, ref)


def test_mrope_positions_reject_placeholder_mismatch():
    ids = torch.tensor([_seq([2, (1, 4, 4), 2])])
    with pytest.raises(VLInputError, match="2 images given but the prompts hold placeholders for 1"):
        mrope_position_ids(ids, torch.tensor([[1, 4, 4], [1, 4, 4]]), IMG, 2)
    with pytest.raises(VLInputError, match="needs 16 consecutive"):
        mrope_position_ids(ids, torch.tensor([[1, 8, 8]]), IMG, 2)
    with pytest.raises(VLInputError, match="more <\\|image_pad\\|> runs than images"):
        mrope_position_ids(ids, None, IMG, 2)


def test_family_table_and_mappings_cover_checkpoint(vl_dir):
    from spark_megatron.models.families import families, load_family
    from spark_megatron.models.weights import HFCheckpointReader

    fam, shape = load_family(vl_dir)
    assert fam.name == "qwen2_5_vl" and shape.num_layers == 4 and shape.vision.depth == 4
    assert sorted(fam.mappings(shape).hf_names()) == sorted(HFCheckpointReader(vl_dir).keys())
    fam2, _ = load_family(vl_dir)
    assert [f.name for f in families()] == ["qwen2", "qwen2_5_vl"] and fam2 is fam


def test_vision_qkv_mapping_roundtrip_and_shards():
    from spark_megatron.models.qwen2_5_vl_mapping import VisionQKVMapping

    m = VisionQKVMapping("q", ("hf",), num_heads=4, num_kv_heads=4, head_dim=16)
    w = torch.randn(192, 64)
    full = m.hf_to_full([w])
    assert torch.equal(m.full_to_hf(m.gather_shards([m.shard(full, r, 2) for r in range(2)]))[0], w)
    # megatron layout: head 0's q, k, v rows first
    assert torch.equal(full[:16], w[:16]) and torch.equal(full[16:32], w[64:80]) and torch.equal(full[32:48], w[128:144])


def _vl_config(size: str = "7b", **vision_changes) -> dict:
    import json
    from pathlib import Path

    cfg = json.loads((Path(__file__).resolve().parents[2] / f"configs/models/qwen2_5_vl_{size}_instruct.json")
                     .read_text())
    cfg["vision_config"].update(vision_changes)
    return cfg


def test_layout_check_accepts_the_3420_vision_mlp_at_tp4_but_still_needs_vision_heads_to_divide():
    from spark_megatron.models.qwen2 import ModelSpecError
    from spark_megatron.models.qwen2_5_vl import VLModelShape, check_vl_layout

    shape = VLModelShape.from_hf_dict(_vl_config("7b"))
    assert shape.vision.intermediate_size == 3420
    check_vl_layout(shape, 4, 2)  # 3420 / 4 = 855, not a multiple of 16: padded, not rejected
    assert [shape.vision.ffn_size(tp) for tp in (1, 2, 4, 8)] == [3456] * 4
    with pytest.raises(ModelSpecError, match="TP 8 does not divide vision num_heads 12"):
        check_vl_layout(VLModelShape.from_hf_dict(_vl_config("32b", num_heads=12)), 8, 2)
    big = VLModelShape.from_hf_dict(_vl_config("32b"))  # the 32B's tower is 3456 wide: TP 8 needs no padding
    assert big.vision.intermediate_size == 3456 and [big.vision.ffn_size(tp) for tp in (1, 2, 4, 8)] == [3456] * 4


def test_vision_mlp_mappings_pad_to_the_model_width_and_export_hf_shapes():
    from spark_megatron.models.qwen2_5_vl import VLModelShape
    from spark_megatron.models.qwen2_5_vl_mapping import qwen2_5_vl_mappings

    shape = VLModelShape.from_hf_dict(_vl_config("7b", depth=1))
    reg = qwen2_5_vl_mappings(shape)
    fc1, _ = reg.for_megatron("vision_model.decoder.layers.0.mlp.linear_fc1.weight")
    fc2, _ = reg.for_megatron("vision_model.decoder.layers.0.mlp.linear_fc2.weight")
    gate, up, down = torch.randn(3420, 8), torch.randn(3420, 8), torch.randn(8, 3420)
    shard = fc1.hf_to_shard([gate, up], 7, 8)  # the last TP-8 rank: 432 units, the last 36 of them padding
    assert shard.shape == (2 * 432, 8) and not shard[:396].eq(0).all() and shard[396:432].eq(0).all()
    assert fc2.hf_to_shard([down], 7, 8).shape == (8, 432) and fc2.hf_to_shard([down], 7, 8)[:, 396:].eq(0).all()
    full = fc1.gather_shards([fc1.hf_to_shard([gate, up], r, 8) for r in range(8)])  # as the sync manifest sees it
    assert [tuple(t.shape) for t in fc1.full_to_hf(full.to("meta"))] == [(3420, 8), (3420, 8)]
    assert all(torch.equal(a, b) for a, b in zip(fc1.full_to_hf(full), [gate, up]))


class _Tower(torch.nn.Module):
    """Stand-in encoder (linear per patch, 4 patches -> 1 token) that counts its inputs."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.calls = 0

    def forward(self, pixels, grids):
        self.calls += 1
        return self.lin(pixels).view(-1, 4, 2).sum(1)


def _img(key, seed):
    return PreparedImage(key=key, source=key, pixel_values=torch.randn(8, 3, generator=torch.Generator().manual_seed(seed)),
                         grid_thw=(1, 2, 4))


def test_cache_encodes_each_image_once_per_step_without_grad():
    tower, cache = _Tower(), ImageEmbeddingCache()
    a, b = _img("a", 0), _img("b", 1)
    with torch.no_grad():
        outs = [cache.embeds(tower, [a]) for _ in range(4)] + [cache.embeds(tower, [b, a])]
        assert cache.images_encoded == 2 and tower.calls == 2
        assert all(torch.equal(o, tower(a.pixel_values, None)) for o in outs[:4])
        cache.new_step()
        cache.embeds(tower, [a])
    assert cache.images_encoded == 3


def test_cache_trainable_tower_gives_per_sample_gradients():
    tower, cache = _Tower(), ImageEmbeddingCache()
    a, b = _img("a", 0), _img("b", 1)
    batch = [a, a, b, a]
    cache.embeds(tower, batch).pow(2).sum().backward()
    cached_grad = tower.lin.weight.grad.clone()
    assert cache.images_encoded == 2  # duplicates inside one call: encoded once
    tower.zero_grad()
    torch.cat([tower(i.pixel_values, None) for i in batch]).pow(2).sum().backward()
    assert torch.allclose(cached_grad, tower.lin.weight.grad, atol=1e-6)
    cache.embeds(tower, [a]).sum().backward()  # next micro-batch re-encodes: its backward needs its own graph
    assert cache.images_encoded == 3
    tower.requires_grad_(False)  # frozen tower: reuse across calls
    cache.embeds(tower, [a]), cache.embeds(tower, [a])
    assert cache.images_encoded == 4

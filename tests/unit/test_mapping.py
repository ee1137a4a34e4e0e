"""Each HF <-> Megatron mapping class: round trips (hf_to_full / full_to_hf, shard / gather_shards at TP 1, 2, 4)
and the fused layouts (GQA-interleaved QKV, [gate; up] per TP shard) against layouts built by hand, row by row."""
from __future__ import annotations

import pytest
import torch

from spark_megatron.models.mapping import (ColumnParallelMapping, GatedMLPMapping, MappingError, MappingRegistry,
                                           PaddedGatedMLPMapping, PaddedRowParallelMapping, QKVMapping,
                                           ReplicatedMapping, RowParallelMapping, VocabParallelMapping, padded_size)

pytestmark = pytest.mark.unit

HIDDEN = 6


def _rows(ids) -> torch.Tensor:
    """A [len(ids), HIDDEN] weight whose row r is recognisable: ids[r] * 100 + column."""
    ids = torch.as_tensor(ids, dtype=torch.float64)
    return ids[:, None] * 100 + torch.arange(HIDDEN, dtype=torch.float64)[None, :]


def _assert_round_trip(mapping, hf: list, tp: int) -> None:
    full = mapping.hf_to_full(hf)
    back = mapping.full_to_hf(full)
    assert len(back) == len(hf) and all(torch.equal(a, b) for a, b in zip(hf, back))
    shards = [mapping.shard(full, r, tp) for r in range(tp)]
    for r in range(tp):
        assert torch.equal(mapping.hf_to_shard(hf, r, tp), shards[r])
    assert torch.equal(mapping.gather_shards(shards), full)


# ------------------------------------------------------------------------------------------- simple mappings

@pytest.mark.parametrize("tp", [1, 2, 4])
def test_replicated_is_the_same_tensor_on_every_rank(tp):
    m = ReplicatedMapping("decoder.final_layernorm.weight", ("model.norm.weight",))
    w = torch.randn(8)
    assert all(torch.equal(m.shard(w, r, tp), w) for r in range(tp))
    _assert_round_trip(m, [w], tp)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_parallel_splits_output_rows(tp):
    m = ColumnParallelMapping("x.weight", ("y.weight",))
    w = _rows(range(8))
    per = 8 // tp
    for r in range(tp):
        assert torch.equal(m.shard(w, r, tp), _rows(range(r * per, (r + 1) * per)))
    _assert_round_trip(m, [w], tp)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_parallel_splits_input_columns(tp):
    m = RowParallelMapping("decoder.layers.*.self_attention.linear_proj.weight", ("model.layers.*.o_proj.weight",))
    w = torch.arange(3 * 8, dtype=torch.float32).reshape(3, 8)
    per = 8 // tp
    for r in range(tp):
        assert torch.equal(m.shard(w, r, tp), w[:, r * per:(r + 1) * per])
    _assert_round_trip(m, [w], tp)


def test_indivisible_split_names_the_parameter():
    m = ColumnParallelMapping("decoder.layers.*.mlp.linear_fc2.weight", ("h",))
    with pytest.raises(MappingError, match="linear_fc2.weight: dim 0 of size 6 is not divisible by TP 4"):
        m.shard(torch.zeros(6, 2), 0, 4)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_rows_are_padded_with_zeros_then_split(tp):
    m = VocabParallelMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                             vocab_size=10, padded_vocab_size=16)
    w = _rows(range(1, 11))
    full = m.hf_to_full([w])
    assert full.shape == (16, HIDDEN)
    assert torch.equal(full[:10], w) and torch.equal(full[10:], torch.zeros(6, HIDDEN, dtype=w.dtype))
    per = 16 // tp
    for r in range(tp):
        assert torch.equal(m.shard(full, r, tp), full[r * per:(r + 1) * per])
    _assert_round_trip(m, [w], tp)


def test_vocab_row_count_mismatch_names_the_tensor():
    m = VocabParallelMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                             vocab_size=10, padded_vocab_size=16)
    with pytest.raises(MappingError, match="model.embed_tokens.weight: expected 10 rows, got 9"):
        m.hf_to_full([torch.zeros(9, 4)])


# ----------------------------------------------------------------------------------------------------- QKV

def _qkv_hand_layout(num_heads: int, groups, qpg: int, head_dim: int) -> list:
    """Row ids of Megatron's fused linear_qkv for the given query groups: per group, its q heads, then its
    k head, then its v head (ids: q head h row i = 1000 + 10h + i, k = 2000 + .., v = 3000 + ..)."""
    ids = []
    for g in groups:
        for h in range(g * qpg, (g + 1) * qpg):
            ids += [1000 + 10 * h + i for i in range(head_dim)]
        ids += [2000 + 10 * g + i for i in range(head_dim)]
        ids += [3000 + 10 * g + i for i in range(head_dim)]
    return ids


def _hf_qkv(num_heads: int, num_kv: int, head_dim: int, bias: bool) -> list:
    q = [1000 + 10 * h + i for h in range(num_heads) for i in range(head_dim)]
    k = [2000 + 10 * g + i for g in range(num_kv) for i in range(head_dim)]
    v = [3000 + 10 * g + i for g in range(num_kv) for i in range(head_dim)]
    if bias:
        return [torch.tensor(x, dtype=torch.float64) for x in (q, k, v)]
    return [_rows(x) for x in (q, k, v)]


QKV_CASES = [(8, 2, 1), (8, 2, 2), (8, 4, 1), (8, 4, 2), (8, 4, 4), (4, 4, 4), (8, 1, 1)]
"""(num_heads, num_kv_heads, tp): GQA 4:1 and 2:1, MHA, MQA."""


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_heads, num_kv, tp", QKV_CASES)
def test_qkv_is_interleaved_per_query_group_and_split_by_whole_groups(num_heads, num_kv, tp, bias):
    head_dim = 3
    m = QKVMapping("decoder.layers.*.self_attention.linear_qkv." + ("bias" if bias else "weight"),
                   tuple(f"model.layers.*.self_attn.{p}_proj.weight" for p in "qkv"),
                   num_heads=num_heads, num_kv_heads=num_kv, head_dim=head_dim)
    hf = _hf_qkv(num_heads, num_kv, head_dim, bias)
    qpg = num_heads // num_kv
    expected_full = _qkv_hand_layout(num_heads, range(num_kv), qpg, head_dim)
    full = m.hf_to_full(hf)
    want = torch.tensor(expected_full, dtype=torch.float64) if bias else _rows(expected_full)
    assert torch.equal(full, want)
    per = num_kv // tp
    for r in range(tp):
        ids = _qkv_hand_layout(num_heads, range(r * per, (r + 1) * per), qpg, head_dim)
        want = torch.tensor(ids, dtype=torch.float64) if bias else _rows(ids)
        assert torch.equal(m.hf_to_shard(hf, r, tp), want), f"TP rank {r} of {tp}"
    _assert_round_trip(m, hf, tp)


def test_qkv_row_mismatch_names_the_tensors():
    m = QKVMapping("decoder.layers.*.self_attention.linear_qkv.weight", ("q", "k", "v"),
                   num_heads=4, num_kv_heads=2, head_dim=8)
    q, k, v = torch.zeros(32, 4), torch.zeros(16, 4), torch.zeros(8, 4)
    with pytest.raises(MappingError, match=r"q/k/v rows 32/16/8, expected 32/16/16"):
        m.hf_to_full([q, k, v])


# ------------------------------------------------------------------------------------------------ gated MLP

@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gated_mlp_shards_hold_their_gate_part_then_their_up_part(tp):
    m = GatedMLPMapping("decoder.layers.*.mlp.linear_fc1.weight",
                        ("model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight"))
    inter = 8
    gate, up = _rows(range(100, 100 + inter)), _rows(range(200, 200 + inter))
    assert torch.equal(m.hf_to_full([gate, up]), _rows(list(range(100, 108)) + list(range(200, 208))))
    per = inter // tp
    for r in range(tp):
        ids = list(range(100 + r * per, 100 + (r + 1) * per)) + list(range(200 + r * per, 200 + (r + 1) * per))
        assert torch.equal(m.hf_to_shard([gate, up], r, tp), _rows(ids)), f"TP rank {r} of {tp}"
    _assert_round_trip(m, [gate, up], tp)
    if tp > 1:  # a plain concatenation of the shards would interleave gate and up parts: the override matters
        shards = [m.hf_to_shard([gate, up], r, tp) for r in range(tp)]
        assert not torch.equal(torch.cat(shards), m.hf_to_full([gate, up]))


def test_gated_mlp_shape_mismatch_names_the_tensors():
    m = GatedMLPMapping("decoder.layers.*.mlp.linear_fc1.weight", ("g", "u"))
    with pytest.raises(MappingError, match=r"gate \(8, 4\) and up \(6, 4\) differ"):
        m.hf_to_full([torch.zeros(8, 4), torch.zeros(6, 4)])


# ------------------------------------------------------------------------------------- zero-padded widths

def test_padded_size_gives_aligned_shards_and_one_width_across_usual_tp():
    assert [padded_size(3420, tp, 16, 128) for tp in (1, 2, 4, 8)] == [3456] * 4  # 3420 -> 27 x 128
    assert padded_size(3420, 16, 16, 128) == 3584 and padded_size(3420, 3, 16, 128) == 3456  # lcm 256 / 384
    assert padded_size(3456, 8, 16, 128) == 3456 and padded_size(7, 2) == 8 and padded_size(8, 2) == 8
    for tp in (1, 2, 3, 4, 8, 16):
        assert padded_size(3420, tp, 16, 128) // tp % 16 == 0


PAD = dict(size=5, shard_multiple=2, multiple=4)
"""HF width 5 -> 8 at TP 1, 2, 4 (shards of 8, 4, 2 units)."""


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_padded_gated_mlp_pads_gate_and_up_with_zeros_and_strips_on_export(tp, bias):
    m = PaddedGatedMLPMapping("v.mlp.linear_fc1.weight", ("g", "u"), **PAD)
    gate, up = _rows(range(100, 105)), _rows(range(200, 205))
    if bias:
        gate, up = gate[:, 0], up[:, 0]
    zeros = torch.zeros((3,) + tuple(gate.shape[1:]), dtype=gate.dtype)
    full = m.hf_to_full([gate, up])
    assert torch.equal(full, torch.cat([gate, zeros, up, zeros]))  # each half padded at its end
    per = 8 // tp
    for r in range(tp):  # shard r = [gate units r*per.. ; up units r*per..] of the padded halves
        want = torch.cat([full[r * per:(r + 1) * per], full[8 + r * per:8 + (r + 1) * per]])
        assert torch.equal(m.hf_to_shard([gate, up], r, tp), want)
    _assert_round_trip(m, [gate, up], tp)
    exported = m.full_to_hf(m.gather_shards([m.hf_to_shard([gate, up], r, tp) for r in range(tp)]))
    assert all(torch.equal(a, b) for a, b in zip(exported, [gate, up]))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_padded_row_parallel_pads_input_columns_with_zeros_and_strips_on_export(tp):
    m = PaddedRowParallelMapping("v.mlp.linear_fc2.weight", ("d",), **PAD)
    w = torch.arange(3 * 5, dtype=torch.float32).reshape(3, 5) + 1
    full = m.hf_to_full([w])
    assert torch.equal(full, torch.cat([w, torch.zeros(3, 3)], dim=1))
    per = 8 // tp
    for r in range(tp):
        assert torch.equal(m.hf_to_shard([w], r, tp), full[:, r * per:(r + 1) * per])
    _assert_round_trip(m, [w], tp)
    # a gathered tensor from a TP whose padding differs is re-fitted, not mis-split (here: 16 units at TP 8)
    wide = torch.cat([w, torch.zeros(3, 11)], dim=1)
    assert torch.equal(m.shard(wide, 0, 2), full[:, :4]) and torch.equal(m.full_to_hf(wide)[0], w)


def test_padded_mappings_reject_a_width_that_is_not_the_hf_width():
    with pytest.raises(MappingError, match="g: expected 5 rows, got 6"):
        PaddedGatedMLPMapping("x", ("g", "u"), **PAD).hf_to_full([torch.zeros(6, 2), torch.zeros(6, 2)])
    with pytest.raises(MappingError, match="d: expected 5 columns, got 8"):
        PaddedRowParallelMapping("x", ("d",), **PAD).hf_to_full([torch.zeros(3, 8)])


# ---------------------------------------------------------------------------------------------- registry

def _shape(tied: bool, layers: int = 3):
    from spark_megatron.models.qwen2 import TextModelShape

    return TextModelShape(architecture="Qwen2ForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=96,
                          num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6,
                          rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=tied)


@pytest.mark.parametrize("tied", [False, True])
def test_registry_covers_exactly_the_tensors_transformers_saves(tied):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from spark_megatron.models.qwen2_mapping import qwen2_mappings

    s = _shape(tied)
    cfg = Qwen2Config(vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                      num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                      num_key_value_heads=s.num_kv_heads, head_dim=s.head_dim, tie_word_embeddings=tied)
    hf_keys = set(Qwen2ForCausalLM(cfg).state_dict())
    if tied:  # save_pretrained drops the tied head; it is the embedding
        hf_keys.discard("lm_head.weight")
    names = qwen2_mappings(s).hf_names()
    assert len(names) == len(set(names)) and set(names) == hf_keys


def test_registry_lookups_resolve_global_layer_indices():
    from spark_megatron.models.qwen2_mapping import qwen2_mappings

    reg = qwen2_mappings(_shape(False, layers=4))
    m, layer = reg.for_megatron("decoder.layers.3.self_attention.linear_qkv.weight")
    assert isinstance(m, QKVMapping) and layer == 3
    assert m.resolve(layer) == ("decoder.layers.3.self_attention.linear_qkv.weight",
                                tuple(f"model.layers.3.self_attn.{p}_proj.weight" for p in "qkv"))
    m, layer = reg.for_hf("model.layers.2.mlp.up_proj.weight")
    assert isinstance(m, GatedMLPMapping) and layer == 2
    m, layer = reg.for_hf("lm_head.weight")
    assert m.megatron == "output_layer.weight" and layer is None
    for hf_name in reg.hf_names():  # every HF name maps to a mapping that resolves back to it
        m, layer = reg.for_hf(hf_name)
        assert hf_name in m.resolve(layer)[1]


def test_registry_rejects_unknown_names_and_layers_out_of_range():
    from spark_megatron.models.qwen2_mapping import qwen2_mappings

    reg = qwen2_mappings(_shape(True, layers=4))
    with pytest.raises(MappingError, match="layer 4 out of range"):
        reg.for_hf("model.layers.4.mlp.up_proj.weight")
    with pytest.raises(MappingError, match="unknown HF tensor 'lm_head.weight'"):
        reg.for_hf("lm_head.weight")  # tied: no separate head
    with pytest.raises(MappingError, match="no mapping for Megatron parameter 'decoder.layers.0.mlp.router.w'"):
        reg.for_megatron("decoder.layers.0.mlp.router.w")


def test_registry_uses_the_padded_vocab_for_both_vocab_tables():
    from spark_megatron.models.qwen2 import padded_vocab_size
    from spark_megatron.models.qwen2_mapping import qwen2_mappings

    reg = qwen2_mappings(_shape(False))
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        m, _ = reg.for_megatron(name)
        assert (m.vocab_size, m.padded_vocab_size) == (100, padded_vocab_size(100)) == (100, 128)


# ------------------------------------------------------------------------------------- Qwen2.5-VL name schemes

def _vl_shape(tied: bool):
    import json
    from pathlib import Path

    from spark_megatron.models.random_checkpoint import reduced_config
    from spark_megatron.models.qwen2_5_vl import VLModelShape

    cfg = reduced_config(Path(__file__).resolve().parents[2] / "configs/models/qwen2_5_vl_3b_instruct.json", 2, 2)
    cfg["tie_word_embeddings"] = tied
    return cfg, VLModelShape.from_hf_dict(json.loads(json.dumps(cfg)))


@pytest.mark.parametrize("tied", [True, False])
def test_vl_transformers_naming_is_the_transformers_module_names_and_hub_the_registry(tied):
    """Oracle: Qwen2_5_VLForConditionalGeneration's own state-dict keys (what transformers 4.52-4.5x saved); the
    hub names are the registry's (what transformers 5 saves, via its conversion_mapping's reverse renames)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from spark_megatron.models.qwen2_5_vl_mapping import NAMING, qwen2_5_vl_mappings

    cfg, shape = _vl_shape(tied)
    with torch.device("meta"):
        module_keys = set(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg)).state_dict())
    if tied:
        module_keys.discard("lm_head.weight")
    hub = qwen2_5_vl_mappings(shape).hf_names()
    assert {NAMING.to_scheme(n, "transformers") for n in hub} == module_keys
    assert all(NAMING.to_canonical(NAMING.to_scheme(n, s), s) == n for n in hub for s in NAMING.schemes)
    assert NAMING.detect(sorted(module_keys), set(hub), "x") == "transformers"
    assert NAMING.detect(hub, set(hub), "x") == "hub"
    mixed = [NAMING.to_scheme(n, "transformers") if n.startswith("visual.") else n for n in hub]
    with pytest.raises(MappingError, match="mixes hub tensor names .* with transformers names"):
        NAMING.detect(mixed, set(hub), "ckpt")

"""HF <-> Megatron conversion: bit-exact round trips through the CLIs and the library API, resharded loads,
the compare tool, and bad input (one-line errors, exit code 2, never an output or temp directory left behind).

Spawned runs are expensive (~10 s of imports per rank on 2 cores), so the converted checkpoints are built once
per module and every check that needs ranks is batched into as few runs as possible.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import copy_checkpoint, edit_config, leftovers, random_tokens, tiny_hf_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _cli_module(name: str):
    spec = importlib.util.spec_from_file_location(f"cli_{name}", REPO / "conversion" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_cli(name: str, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "conversion" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _tensors(hf_dir) -> dict:
    from spark_megatron.models.weights import HFCheckpointReader

    reader = HFCheckpointReader(hf_dir)
    return {k: reader.get(k) for k in reader.keys()}


def _assert_bit_exact(original, exported) -> None:
    a, b = _tensors(original), _tensors(exported)
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"tensor {k} changed in the round trip"


# ----------------------------------------------------------------------------------------- shared conversions

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("conversion")


@pytest.fixture(scope="module")
def untied_tp2pp2(work) -> Path:
    """The untied tiny model converted by the CLI at TP2 x PP2 (4 spawned ranks)."""
    out = work / "untied_tp2pp2"
    res = _run_cli("hf_to_megatron", "--hf", tiny_hf_checkpoint("untied"), "--out", out, "--tp", 2, "--pp", 2,
                   "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _load_mismatch(rank: int, world: int, untied_ckpt: str, tied_plan) -> str:
    """Convert the tied model at PP2, then load it into the untied model at PP2: only the last stage misses
    a tensor (output_layer), yet every rank must raise the same error instead of waiting in the load."""
    from spark_megatron.checkpoint.hf_import import _import_rank
    from spark_megatron.checkpoint.megatron_format import load_megatron_checkpoint, read_meta
    from spark_megatron.models.families import family_for_config
    from spark_megatron.models.weights import CheckpointError

    assert isinstance(_import_rank(rank, world, tied_plan), dict)
    meta = read_meta(untied_ckpt)
    family = family_for_config(meta.hf_config)
    untied_stage = family.build_stage(family.shape_from_hf_dict(meta.hf_config), "float32")
    try:
        load_megatron_checkpoint(untied_stage, tied_plan.out)
    except CheckpointError as e:
        return str(e)
    return "loaded"


def _reload_rank(rank: int, world: int, ckpt: str, extra_ckpt: str, tokens, tied_plan):
    """Logits of the TP2xPP2 checkpoint loaded at TP1 and at PP2; then re-save it at TP2 with an extra
    'optimizer' entry and load model-only from that at TP1 again; then a mismatching load."""
    from spark_megatron.checkpoint.megatron_format import (CheckpointMeta, load_megatron_checkpoint, read_meta,
                                                           save_sharded_checkpoint)
    from spark_megatron.models.families import family_for_config
    from spark_megatron.parallel.groups import init_distributed
    from tests.helpers import megatron_logits_at

    out = {"tp1": megatron_logits_at(ckpt, 1, 1, tokens), "pp2": megatron_logits_at(ckpt, 1, 2, tokens)}
    init_distributed(2, 1)
    meta = read_meta(ckpt)
    family = family_for_config(meta.hf_config)
    shape = family.shape_from_hf_dict(meta.hf_config)
    stage = family.build_stage(shape, meta.dtype)
    load_megatron_checkpoint(stage, ckpt)
    trainer_like = {"model": stage.sharded_state_dict(), "optimizer": stage.sharded_state_dict(prefix="optim.")}
    save_sharded_checkpoint(trainer_like, extra_ckpt, CheckpointMeta(**{**meta.__dict__, "step": 7}),
                            aux_from=ckpt)
    out["with_optimizer_tp1"] = megatron_logits_at(extra_ckpt, 1, 1, tokens)
    out["step"] = read_meta(extra_ckpt).step
    out["mismatch"] = _load_mismatch(rank, world, ckpt, tied_plan)
    return out


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_cli_round_trip_is_bit_exact_and_loadable_by_transformers(untied_tp2pp2, work):
    from tests.helpers import hf_model

    src = tiny_hf_checkpoint("untied")
    meta = json.loads((untied_tp2pp2 / "spark_meta.json").read_text())
    assert (meta["tp"], meta["pp"], meta["family"], meta["dtype"]) == (2, 2, "qwen2", "float32")
    assert meta["hf_config"] == json.loads((src / "config.json").read_text())
    out = work / "untied_back"
    res = _run_cli("megatron_to_hf", "--megatron", untied_tp2pp2, "--out", out, "--max-shard-size", "400KB",
                   "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_bit_exact(src, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shard_files) > 2 and sorted(set(index["weight_map"].values())) == shard_files
    assert all(p.stat().st_size <= 400_000 + 16_384 for p in out.glob("model-*.safetensors"))  # + JSON header
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    tokens = random_tokens(441, seed=3)
    with torch.no_grad():
        assert torch.equal(hf_model(out)(input_ids=tokens).logits, hf_model(src)(input_ids=tokens).logits)
    assert leftovers(out) == [out]


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_checkpoint_saved_at_tp2pp2_loads_at_tp1_and_pp2_with_identical_logits(untied_tp2pp2, work):
    from spark_megatron.checkpoint.hf_import import plan_hf_to_megatron
    from spark_megatron.parallel.spawn import run_on_ranks
    from tests.helpers import hf_model

    tokens = random_tokens(441, seed=5)
    tied_plan = plan_hf_to_megatron(tiny_hf_checkpoint("tied"), work / "tied_pp2", tp=1, pp=2, progress=False)
    per_rank = run_on_ranks(_reload_rank, 2, str(untied_tp2pp2), str(work / "with_optimizer"), tokens,
                            tied_plan, timeout_s=500)
    with torch.no_grad():
        ref = hf_model(tiny_hf_checkpoint("untied"))(input_ids=tokens).logits
    tp1, pp2 = per_rank[0]["tp1"], per_rank[1]["pp2"]  # PP2: logits live on the last stage (rank 1)
    assert tp1 is not None and pp2 is not None
    assert torch.equal(tp1, pp2), f"TP1 vs PP2 logits differ by {(tp1 - pp2).abs().max():.3e}"
    assert (tp1 - ref).abs().max() <= 1e-4
    assert torch.equal(per_rank[0]["with_optimizer_tp1"], tp1)
    assert per_rank[0]["step"] == 7
    for r in per_rank:
        assert "tensor 'output_layer.weight' is not in the checkpoint" in r["mismatch"], r["mismatch"]


def _round_trips_rank(rank: int, world: int, plans: list):
    """Import then export each model in one spawned run (the public wrappers would spawn twice per model)."""
    from spark_megatron.checkpoint.hf_export import _export_rank
    from spark_megatron.checkpoint.hf_import import _import_rank

    return [(_import_rank(rank, world, imp), _export_rank(rank, world, exp)) for imp, exp in plans]


def _round_trip_plans(src: Path, work: Path, name: str):
    from spark_megatron.checkpoint.hf_export import ExportPlan
    from spark_megatron.checkpoint.hf_import import plan_hf_to_megatron

    mg, back = work / f"{name}_mg", work / f"{name}_back"
    return (plan_hf_to_megatron(src, mg, tp=2, pp=2, progress=False),
            ExportPlan(ckpt_dir=str(mg), out=str(back), workers=4, dtype="float32", max_shard_bytes=300_000,
                       hf_naming="hub", force=False, progress=False))


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_tied_and_vl_round_trips_tp2pp2_exported_by_four_workers_are_bit_exact(work):
    """Tied embeddings, and the Qwen2.5-VL family through the same code (its vision MLP width odd, so the
    Megatron checkpoint holds it zero-padded and the export strips it), saved at TP2 x PP2 and exported by four
    workers, each writing its share of the HF files straight from the dist-checkpoint chunks."""
    from spark_megatron.parallel.spawn import run_on_ranks

    kinds = ["tied", "vl_odd_mlp"]
    plans = [_round_trip_plans(tiny_hf_checkpoint(k), work, k) for k in kinds]
    per_rank = run_on_ranks(_round_trips_rank, 4, plans, timeout_s=500)
    for i, kind in enumerate(kinds):
        src, back = tiny_hf_checkpoint(kind), Path(plans[i][1].out)
        results = [rank_results[i] for rank_results in per_rank]
        assert all(isinstance(r, dict) for pair in results for r in pair), results
        _assert_bit_exact(src, back)
        files = sorted(back.glob("model-*.safetensors"))
        assert len(files) >= 4 and all(exp["files"] >= 1 for _, exp in results), kind  # every worker wrote
        assert sum(exp["bytes_written"] for _, exp in results) == sum(f.stat().st_size for f in files)
    assert "lm_head.weight" not in _tensors(Path(plans[0][1].out))
    assert json.loads((Path(plans[0][1].out) / "config.json").read_text())["tie_word_embeddings"] is True
    assert (Path(plans[1][1].out) / "preprocessor_config.json").read_bytes() == \
        (tiny_hf_checkpoint("vl_odd_mlp") / "preprocessor_config.json").read_bytes()


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_compare_cli_passes_on_the_right_model_and_fails_on_another(untied_tp2pp2, capsys):
    res = _run_cli("compare", "--hf", tiny_hf_checkpoint("untied"), "--megatron", untied_tp2pp2,
                   "--tp", 1, "--pp", 1, "--seq-len", 16)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert any(line.startswith("logits max abs diff") for line in lines)
    assert sum("hidden max abs diff" in line for line in lines) == 4  # layers 0-2 + final_norm
    assert lines[-1].startswith("PASS")
    other = tiny_hf_checkpoint("untied_other_seed")
    capsys.readouterr()
    rc = _cli_module("compare").main(["--hf", str(other), "--megatron", str(untied_tp2pp2), "--seq-len", "16"])
    assert rc == 1 and capsys.readouterr().out.splitlines()[-1].startswith("FAIL")


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_compare_cli_checks_the_vl_image_path(work, capsys):
    """Qwen2.5-VL through compare (TP2): passes on its own checkpoint, and fails once only one vision-tower
    tensor of the HF side differs, so the random images really run through both towers."""
    src = tiny_hf_checkpoint("vl_odd_mlp")
    meg = work / "vl_compare_mg"
    conv = _run_cli("hf_to_megatron", "--hf", src, "--out", meg, "--tp", 2, "--no-progress")
    assert conv.returncode == 0, conv.stderr[-3000:]
    res = _run_cli("compare", "--hf", src, "--megatron", meg, "--tp", 2, "--seq-len", 12)
    assert res.returncode == 0 and res.stdout.splitlines()[-1].startswith("PASS"), res.stdout + res.stderr[-3000:]
    other = work / "vl_other_tower"
    copy_checkpoint(src, other)
    _rewrite_tensors(other, lambda t: {**t, "visual.merger.mlp.2.bias": t["visual.merger.mlp.2.bias"] + 0.5})
    res = _run_cli("compare", "--hf", other, "--megatron", meg, "--tp", 2, "--seq-len", 12)
    assert res.returncode == 1 and res.stdout.splitlines()[-1].startswith("FAIL"), res.stdout + res.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ bad input

def _split_into_two_shards(src: Path, dst: Path) -> list:
    from safetensors.torch import load_file, save_file

    copy_checkpoint(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    for f, part in zip(files, halves):
        save_file({n: tensors[n] for n in part}, str(dst / f), metadata={"format": "pt"})
    weight_map = {n: f for f, part in zip(files, halves) for n in part}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def _rewrite_tensors(hf_dir: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    tensors = fn(load_file(str(hf_dir / "model.safetensors")))
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


def _expect_cli_error(capsys, out, argv, *needles) -> str:
    capsys.readouterr()  # drop output of fixture setup (tiny checkpoint writer progress)
    rc = _cli_module("hf_to_megatron").main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert leftovers(out) == []
    return err


@pytest.mark.unit
def test_missing_and_corrupt_shards_are_named(tmp_path, capsys):
    src = tiny_hf_checkpoint("untied")
    sharded = tmp_path / "sharded"
    files = _split_into_two_shards(src, sharded)
    (sharded / files[1]).unlink()
    out = tmp_path / "out"
    _expect_cli_error(capsys, out, ["--hf", str(sharded), "--out", str(out)], files[1], "missing")
    corrupt = copy_checkpoint(src, tmp_path / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_cli_error(capsys, out, ["--hf", str(corrupt), "--out", str(out)], "model.safetensors", "corrupt")


@pytest.mark.unit
def test_unsupported_architecture_and_indivisible_layouts(tmp_path, capsys):
    src = tiny_hf_checkpoint("untied")
    llama = copy_checkpoint(src, tmp_path / "llama")
    edit_config(llama, architectures=["LlamaForCausalLM"], model_type="llama")
    out = tmp_path / "out"
    _expect_cli_error(capsys, out, ["--hf", str(llama), "--out", str(out)], "unsupported architecture",
                      "LlamaForCausalLM")
    _expect_cli_error(capsys, out, ["--hf", str(src), "--out", str(out), "--tp", "3"],
                      "TP 3 does not divide num_attention_heads 4")
    _expect_cli_error(capsys, out, ["--hf", str(src), "--out", str(out), "--pp", "3"],
                      "PP 3 does not divide num_hidden_layers 4")
    _expect_cli_error(capsys, out, ["--hf", str(tmp_path / "nowhere"), "--out", str(out)], "no config.json")


@pytest.mark.unit
def test_missing_and_unmapped_tensors_are_named(tmp_path, capsys):
    src = tiny_hf_checkpoint("untied")
    out = tmp_path / "out"
    missing = copy_checkpoint(src, tmp_path / "missing")
    _rewrite_tensors(missing, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    _expect_cli_error(capsys, out, ["--hf", str(missing), "--out", str(out)],
                      "'model.layers.1.mlp.up_proj.weight' is missing")
    extra = copy_checkpoint(src, tmp_path / "extra")
    _rewrite_tensors(extra, lambda t: {**t, "model.layers.0.mlp.extra.weight": torch.zeros(2)})
    _expect_cli_error(capsys, out, ["--hf", str(extra), "--out", str(out)], "model.layers.0.mlp.extra.weight")


@pytest.mark.unit
def test_existing_output_is_not_touched_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    src = tiny_hf_checkpoint("untied")
    capsys.readouterr()
    rc = _cli_module("hf_to_megatron").main(["--hf", str(src), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


@pytest.mark.unit
def test_export_and_compare_reject_bad_input_before_spawning(tmp_path, capsys):
    out = tmp_path / "out"
    not_ckpt = tmp_path / "not_a_checkpoint"
    not_ckpt.mkdir()
    rc = _cli_module("megatron_to_hf").main(["--megatron", str(not_ckpt), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "spark_meta.json" in err and "\n" not in err and leftovers(out) == []
    rc = _cli_module("megatron_to_hf").main(["--megatron", str(tmp_path / "absent"), "--out", str(out)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = _cli_module("megatron_to_hf").main(["--megatron", str(not_ckpt), "--out", str(out),
                                             "--max-shard-size", "lots"])
    assert rc == 2 and "invalid size 'lots'" in capsys.readouterr().err


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_export_naming_and_model_mismatch_are_rejected(untied_tp2pp2, tmp_path, capsys):
    out = tmp_path / "out"
    tied = tiny_hf_checkpoint("tied")
    rc = _cli_module("megatron_to_hf").main(["--megatron", str(untied_tp2pp2), "--out", str(out),
                                             "--hf-naming", "transformers"])
    assert rc == 2 and "qwen2 checkpoints are named hub" in capsys.readouterr().err
    rc = _cli_module("megatron_to_hf").main(["--megatron", str(untied_tp2pp2), "--out", str(out), "--workers", "0"])
    assert rc == 2 and "workers must be >= 1" in capsys.readouterr().err
    rc = _cli_module("compare").main(["--hf", str(tied), "--megatron", str(untied_tp2pp2)])
    assert rc == 2 and "describe different models" in capsys.readouterr().err
    assert leftovers(out) == []


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_tensor_shape_mismatch_found_by_a_rank_is_one_line_and_leaves_nothing(tmp_path):
    """Names and shapes pass the pre-spawn checks; the rank loading the tensor finds the mismatch."""
    bad = copy_checkpoint(tiny_hf_checkpoint("untied"), tmp_path / "bad")
    _rewrite_tensors(bad, lambda t: {**t, "model.layers.2.mlp.down_proj.weight": torch.zeros(128, 200)})
    out = tmp_path / "out"
    res = _run_cli("hf_to_megatron", "--hf", bad, "--out", out, "--no-progress")
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-3000:]
    assert err[-1].startswith("error: ") and "model.layers.2.mlp.down_proj.weight" in err[-1], err[-1]
    assert "Traceback" not in res.stderr
    assert leftovers(out) == []


@pytest.mark.unit
def test_cli_help_describes_options():
    for name, flags in (("hf_to_megatron", ["--tp", "--pp", "--dtype", "--force"]),
                        ("megatron_to_hf", ["--max-shard-size", "--workers", "--hf-naming"]),
                        ("compare", ["--tol", "--multiple", "--seq-len", "--batch"])):
        text = _cli_module(name).build_parser().format_help()
        assert all(f in text for f in flags), text
    res = _run_cli("hf_to_megatron", "--help", timeout=60)  # as a script, from any working directory
    assert res.returncode == 0 and "--tp" in res.stdout


# ---------------------------------------------------------------------------------------- atomic directories

@pytest.mark.unit
def test_atomic_output_dir_publishes_only_on_success(tmp_path):
    from spark_megatron.checkpoint.atomic import OutputExistsError, atomic_output_dir

    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("disk full")
    assert leftovers(out) == []
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert leftovers(out) == [out] and (out / "a.txt").read_text() == "1"
    with pytest.raises(OutputExistsError, match="not empty"):
        with atomic_output_dir(out):
            pytest.fail("must refuse before the block runs")
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"] and leftovers(out) == [out]


@pytest.mark.unit
def test_stale_temp_dirs_of_dead_writers_are_removed(tmp_path):
    from spark_megatron.checkpoint.atomic import remove_stale_temps

    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    stale, live = tmp_path / f"out.tmp-{dead.pid}", tmp_path / f"out.tmp-{os.getpid()}"
    stale.mkdir()
    live.mkdir()
    assert remove_stale_temps(out) == [stale]
    assert not stale.exists() and live.exists()


@pytest.mark.unit
def test_read_meta_rejects_damaged_metadata(tmp_path):
    from spark_megatron.checkpoint import CheckpointError, read_meta

    (tmp_path / "spark_meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        read_meta(tmp_path)
    good = {"family": "qwen2", "hf_config": {}, "padded_vocab_size": 512, "dtype": "float32", "format_version": 1}
    (tmp_path / "spark_meta.json").write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        read_meta(tmp_path)
    (tmp_path / "spark_meta.json").write_text(json.dumps({**good, "colour": "red"}))
    with pytest.raises(CheckpointError, match="unknown field 'colour'"):
        read_meta(tmp_path)
    (tmp_path / "spark_meta.json").write_text(json.dumps(good))
    assert read_meta(tmp_path).padded_vocab_size == 512


# ----------------------------------------------------------------------------------------- vocab padding divisor

def _start_vs_hf(rank: int, world: int, hf_dir: str, ckpt: str, divisor: int) -> dict:
    """A reference model started from the converted checkpoint (as the roles start one from model.megatron_path)
    and one built from the HF weights, both padding the vocab with `divisor`: logprobs of the same tokens."""
    from spark_megatron.config import ModelConfig, ParallelConfig
    from spark_megatron.parallel.groups import init_distributed
    from spark_megatron.roles import megatron_start
    from spark_megatron.train.batching import SequenceSample
    from spark_megatron.train.reference import ReferenceModel

    init_distributed(1, 1)
    par = ParallelConfig(make_vocab_size_divisible_by=divisor)
    seqs = [SequenceSample(tokens=random_tokens(441, batch=1, seq_len=17, seed=s)[0].tolist(), prompt_len=3)
            for s in (1, 2)]
    out = {}
    for name, model_cfg in (("hf", ModelConfig(hf_path=hf_dir)), ("megatron", ModelConfig(hf_path=hf_dir,
                                                                                            megatron_path=ckpt))):
        ref = ReferenceModel(model_cfg, par, hf_dir, start=megatron_start(model_cfg))
        out[name] = ref.compute_logprobs(seqs)
        out[f"{name}_rows"] = ref.model_chunks[0].embedding.word_embeddings.weight.shape[0]
        del ref
    return out


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_vocab_padding_divisor_is_recorded_and_read_back(work):
    """Converted with --make-vocab-size-divisible-by 64 (the recipe's parallel.make_vocab_size_divisible_by): the
    checkpoint records it; export reads it back (bit-exact round trip); a trainer stage padding with 64 starts
    from it with the HF-built model's logprobs; a recipe padding with 128 is refused before any rank starts."""
    from spark_megatron.checkpoint.megatron_format import read_meta
    from spark_megatron.config import ConfigError, RunConfig
    from spark_megatron.launch.preflight import vocab_divisor
    from spark_megatron.models.qwen2 import padded_vocab_size
    from spark_megatron.parallel.spawn import run_on_ranks

    src, ckpt, back = tiny_hf_checkpoint("untied"), work / "divisor64", work / "divisor64_back"
    res = _run_cli("hf_to_megatron", "--hf", src, "--out", ckpt, "--make-vocab-size-divisible-by", 64,
                   "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    meta = read_meta(ckpt)
    assert (meta.vocab_divisible_by, meta.padded_vocab_size) == (64, padded_vocab_size(441, 64)) == (64, 448)
    res = _run_cli("megatron_to_hf", "--megatron", ckpt, "--out", back, "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_bit_exact(src, back)
    (got,) = run_on_ranks(_start_vs_hf, 1, str(src), str(ckpt), 64, timeout_s=300)
    assert got["megatron_rows"] == got["hf_rows"] == 448
    assert all(torch.equal(a, b) for a, b in zip(got["megatron"], got["hf"]))
    cfg = RunConfig()
    cfg.model.megatron_path = str(ckpt)
    with pytest.raises(ConfigError, match="pads its vocab to a multiple of 64 but parallel.make_vocab_size_"
                                          "divisible_by is 128: set it to 64, or convert the HF checkpoint again"):
        vocab_divisor(cfg, ckpt / "spark_meta.json")
    cfg.parallel.make_vocab_size_divisible_by = 64
    vocab_divisor(cfg, ckpt / "spark_meta.json")

"""The GPU check's report: planner against measured memory, the merged JSON, its schema, and a text table.

    python scripts/gpu_report.py plan WORK               # step c: `spark-megatron plan` per actor_step_*.json
    python scripts/gpu_report.py collect WORK OUT [--dry-run]   # OUT/gpu_check.json, .txt, _logs.txt
    python scripts/gpu_report.py validate FILE           # exit 1 listing every schema violation

WORK is the directory scripts/gpu_check.sh fills: steps.jsonl (one line per step: name, rc, seconds,
timed_out, log), step logs, junit XML of the test steps, actor_step_*.json (bench/actor_step.py), imports.json
(scripts/gpu_imports.py), mcore_api.json (scripts/check_mcore_api.py) and planner.json (from `plan`). Missing
pieces (a step that failed or timed out) are reported as missing, never invented. The layout of
gpu_check.json is SCHEMA below, documented field by field in docs/gpu_check.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
BASE_RECIPE = "configs/qwen2_5_7b_text.yaml"
"""A text recipe; every key that matters for the actor's memory is overridden to the benchmarked layout."""
LOG_TAIL_LINES = 120


class Alt(tuple):
    """Schema: any of these alternatives."""


NUM, OPT_NUM, OPT_STR = Alt((int, float)), Alt((int, float, type(None))), Alt((str, type(None)))
ERROR = {"error": str, "traceback": str}
MEMORY = {"params": int, "grads": int, "master_params": int, "adam_states": int, "optimizer": int,
          "activations": Alt((int, type(None))), "peak_allocated": Alt((int, type(None))),
          "step_start_allocated": Alt((int, type(None))), "unaccounted": Alt((int, type(None)))}
SIDE = {"step_s": [NUM], "step_s_median": NUM, "fwd_bwd_s_median": NUM, "optimizer_s_median": NUM,
        "tokens_per_s": NUM, "tflops": NUM, "mfu": OPT_NUM, "mfu_vs_gemm": NUM, "loss_first": NUM,
        "grad_norm_first": NUM, "loss_last": NUM, "memory": MEMORY, "peak_reserved": OPT_NUM}
ACTOR_STEP = {
    "schema": str, "created": str,
    "model": {"name": str, "params": int, "matmul_params": int, "hidden_size": int, "intermediate_size": int,
              "num_hidden_layers": int, "full_depth_layers": int, "num_attention_heads": int,
              "num_key_value_heads": int, "vocab_size": int, "tie_word_embeddings": bool},
    "hf_config": dict,
    "workload": {"seq_len": int, "prompt_len": int, "micro_batch_size": int, "micro_batches": int,
                 "sequences": int, "tokens_per_step": int, "dtype": str, "warmup_steps": int, "timed_steps": int,
                 "setup_s": NUM},
    "device": {"type": str, "name": str, "bf16_peak_tflops": OPT_NUM, "peak_source": str, "gemm_tflops": NUM,
               "memory_bytes": Alt((int, type(None)))},
    "flops": {"per_step": NUM, "per_token": NUM, "convention": str},
    "megatron": Alt((dict(SIDE, layer_spec=str, build_s=NUM, built_allocated_delta=Alt((int, type(None))),
                          skipped_steps=NUM), ERROR)),
    "hf": Alt((dict(SIDE, attn_implementation=OPT_STR, optimizer=str), ERROR)),
    "ratio": Alt(({"megatron_over_hf_tokens_per_s": NUM, "loss_rel_diff": OPT_NUM, "grad_norm_rel_diff": OPT_NUM},
                  {})),
    "versions": dict,
}
COMPONENT = {"planned": int, "measured": Alt((int, type(None))), "rel_error": OPT_NUM}
PLANNER = {"model": str, "layer_spec": str, "command": [str], "rc": int,
           "components": Alt(({"params": COMPONENT, "grads": COMPONENT, "optimizer": COMPONENT,
                               "activations": COMPONENT, "train_peak": COMPONENT}, {})),
           "error": OPT_STR}
STEP = {"name": str, "rc": int, "seconds": NUM, "timed_out": bool, "status": str, "log_tail": str}
TESTS = Alt(({"passed": int, "failed": int, "skipped": int, "errors": int,
              "cases": [{"name": str, "outcome": str, "seconds": NUM, "message": str}]}, type(None)))
SCHEMA = {
    "schema": str, "created": str, "dry_run": bool, "ok": bool, "problems": [str],
    "host": {"python": str, "torch": str, "cuda": OPT_STR, "device": str, "megatron_core": OPT_STR},
    "steps": [STEP], "gpu_tests": TESTS, "mcore_tests": TESTS,
    "actor_step": [ACTOR_STEP], "planner": [PLANNER],
    "imports": Alt((dict, type(None))), "mcore_api": Alt((dict, type(None))),
}
"""gpu_check.json: a dict maps keys to their schemas, [s] is a list of s, Alt is a choice, a type is a type."""


def validate(value, spec, path: str = "$") -> list:
    """Every place where `value` does not follow `spec` (empty list: valid)."""
    if isinstance(spec, Alt):
        if any(not validate(value, s, path) for s in spec):
            return []
        return [f"{path}: {type(value).__name__} matches none of the alternatives"]
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        errs = [f"{path}.{k}: missing" for k in spec if k not in value]
        for k, s in spec.items():
            if k in value:
                errs += validate(value[k], s, f"{path}.{k}")
        return errs
    if isinstance(spec, list):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [e for i, v in enumerate(value) for e in validate(v, spec[0], f"{path}[{i}]")]
    ok = isinstance(value, spec) and (spec is bool or not isinstance(value, bool))
    return [] if ok else [f"{path}: expected {getattr(spec, '__name__', spec)}, got {type(value).__name__}"]


# ---------------------------------------------------------------------------------------------- step c

def plan_command(bench: dict, cfg_dir: Path, out_json: Path) -> list:
    """`spark-megatron plan` for the benchmarked model and layout (one GPU, TP1 PP1, no reference model)."""
    w, dev = bench["workload"], bench["device"]
    gpu_gib = dev["memory_bytes"] / GIB if dev["memory_bytes"] else 80.0
    spec = bench["megatron"].get("layer_spec", "local")
    arch = "hopper" if dev["type"] == "cuda" else "cpu"
    overrides = [
        f"model.hf_path={cfg_dir}", "model.params_dtype=bfloat16", "model.fp8=null", "model.recompute_activations=false",
        "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
        "parallel.data_parallel_size=1",
        "parallel.virtual_pipeline_model_parallel_size=null", "parallel.sequence_parallel=false",
        "parallel.use_distributed_optimizer=true", "parallel.make_vocab_size_divisible_by=128",
        "rollout.tensor_parallel_size=1", "rollout.n=1", f"rollout.max_prompt_tokens={w['prompt_len']}",
        f"rollout.max_response_tokens={w['seq_len'] - w['prompt_len']}", "algorithm.kl_coef=0.0",
        f"data.prompts_per_step={w['sequences']}", f"optim.micro_batch_size={w['micro_batch_size']}",
        f"optim.train_batch_size={w['sequences']}", "launch.executor=local", "launch.nodes=1",
        "launch.gpus_per_node=1", f"launch.gpu_arch={arch}", f"launch.container_has_te={str(spec == 'te').lower()}",
        f"output_dir={cfg_dir / 'run'}"]
    return [sys.executable, "-m", "spark_megatron.launch.cli", "plan", "--config", str(REPO / BASE_RECIPE),
            "--model-config", str(cfg_dir / "config.json"), "--layer-spec", spec, "--gpu-memory-gib",
            f"{gpu_gib:.2f}", "--overhead-gib", "0", "--json", str(out_json), *overrides]


def _component(planned: int, measured) -> dict:
    rel = (planned - measured) / measured if measured else None
    return {"planned": int(planned), "measured": None if measured is None else int(measured), "rel_error": rel}


def compare(bench: dict, plan: dict) -> dict:
    """Planner components of the (only) stage against the memory bench/actor_step.py measured."""
    st, mem = plan["stages"][0], bench["megatron"]["memory"]
    train = max(p["bytes"] for p in plan["phases"] if p["phase"] == "train")
    return {"params": _component(st["param_bytes"], mem["params"]),
            "grads": _component(st["grad_bytes"], mem["grads"]),
            "optimizer": _component(st["master_param_bytes"] + st["adam_bytes"], mem["optimizer"]),
            "activations": _component(st["activation_bytes"] + st["logits_bytes"], mem["activations"]),
            "train_peak": _component(train, mem["peak_allocated"])}


def plan_one(bench: dict) -> dict:
    name = bench["model"]["name"]
    out = {"model": name, "layer_spec": bench["megatron"].get("layer_spec", "local"), "command": [], "rc": -1,
           "components": {}, "error": None}
    if "error" in bench["megatron"]:
        out["error"] = "no Megatron measurement (the benchmark's Megatron side failed)"
        return out
    with tempfile.TemporaryDirectory(prefix="gpu_plan_") as tmp:
        cfg_dir = Path(tmp)
        (cfg_dir / "config.json").write_text(json.dumps(bench["hf_config"]))
        cmd = plan_command(bench, cfg_dir, cfg_dir / "plan.json")
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        out["command"] = ["spark-megatron", *cmd[3:]]
        out["rc"] = proc.returncode
        if not (cfg_dir / "plan.json").is_file():  # rc 1 with a plan = "does not fit", still a plan
            out["error"] = (proc.stderr.strip().splitlines() or ["no plan written"])[-1]
            return out
        out["components"] = compare(bench, json.loads((cfg_dir / "plan.json").read_text()))
    return out


def cmd_plan(work: Path) -> int:
    results = [plan_one(json.loads(p.read_text())) for p in sorted(work.glob("actor_step_*.json"))]
    (work / "planner.json").write_text(json.dumps(results, indent=1))
    if not results:
        print(f"[plan] no actor_step_*.json in {work}: the benchmark steps measured nothing to plan against")
    for r in results:
        print(f"[plan] {r['model']}: " + (r["error"] or ", ".join(
            f"{k} {_pct(c['rel_error'])}" for k, c in r["components"].items())))
    return 0 if results and all(not r["error"] for r in results) else 1


# ---------------------------------------------------------------------------------------------- collect

def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def read_steps(work: Path) -> list:
    steps = []
    for line in (work / "steps.jsonl").read_text().splitlines() if (work / "steps.jsonl").is_file() else []:
        s = json.loads(line)
        status = "ok" if s["rc"] == 0 else ("timed out" if s["timed_out"] else f"failed (rc {s['rc']})")
        steps.append(dict(name=s["name"], rc=int(s["rc"]), seconds=float(s["seconds"]), timed_out=bool(s["timed_out"]),
                          status=status, log_tail=_tail(work / s["log"], LOG_TAIL_LINES) if s.get("log") else ""))
    return steps


def read_junit(path: Path):
    """pytest's junit XML -> counts and one line per test case (None when the file is missing)."""
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    cases, counts = [], {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            el = case.find(tag)
            if el is not None:
                outcome, message = name, (el.get("message") or "")[:500]
                break
        counts[outcome] += 1
        cases.append({"name": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0.0), "message": message})
    return dict(counts, cases=cases)


def _host(benches: list, imports) -> dict:
    """Versions and device, from a benchmark result when there is one (no torch import here then)."""
    import platform

    if benches:
        tv, cuda, dev = benches[0]["versions"]["torch"], benches[0]["versions"]["cuda"], benches[0]["device"]["name"]
    else:
        try:
            import torch

            tv, cuda = torch.__version__, torch.version.cuda
            dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        except Exception:  # noqa: BLE001 - the report must be written even when torch is broken
            tv, cuda, dev = "unavailable", None, "unknown"
    mcore = next((b["versions"].get("megatron_core") for b in benches), None) or \
        (imports or {}).get("megatron_core_version") or None
    return {"python": platform.python_version(), "torch": tv, "cuda": cuda, "device": dev, "megatron_core": mcore}


def collect(work: Path, dry_run: bool) -> dict:
    steps = read_steps(work)
    benches = [b for b in (_read_json(p) for p in sorted(work.glob("actor_step_*.json"))) if b]
    imports = _read_json(work / "imports.json")
    doc = {"schema": "spark_megatron.gpu_check/1", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "dry_run": dry_run, "ok": False, "problems": [],
           "host": _host(benches, imports), "steps": steps,
           "gpu_tests": read_junit(work / "tests_gpu.xml"), "mcore_tests": read_junit(work / "tests_mcore.xml"),
           "actor_step": benches, "planner": _read_json(work / "planner.json") or [],
           "imports": imports, "mcore_api": _read_json(work / "mcore_api.json")}
    doc["problems"] = problems(doc)
    doc["ok"] = not doc["problems"]
    return doc


def problems(doc: dict) -> list:
    """Why the check is not a pass: failed or timed-out steps, and on a GPU run gpu-marked tests that did not
    run (pytest exits 0 when everything is skipped, e.g. when CUDA is not visible)."""
    out = [f"step {s['name']}: {s['status']}" for s in doc["steps"] if s["rc"] != 0]
    if not doc["steps"]:
        out.append("no step ran")
    ran = {s["name"] for s in doc["steps"]}  # `gpu_check.sh --only` runs a subset
    t = doc["gpu_tests"]
    if "a_gpu_tests" in ran and not doc["dry_run"] and (t is None or t["passed"] == 0):
        out.append("no gpu-marked test passed" + ("" if t is None else f" ({t['skipped']} skipped)"))
    if any(n.startswith("b_actor") for n in ran) and not doc["actor_step"]:
        out.append("no actor step measurement")
    return out


def _gib(x) -> str:
    return "   n/a" if x is None else f"{x / GIB:6.2f}"


def table(doc: dict) -> str:
    h = doc["host"]
    out = [f"GPU check on {h['device']} (python {h['python']}, torch {h['torch']}, CUDA {h['cuda']}, megatron-core "
           f"{h['megatron_core']}){' -- DRY RUN on CPU' if doc['dry_run'] else ''}: {'OK' if doc['ok'] else 'FAILED'}"]
    out += [f"  problem: {p}" for p in doc["problems"]]
    out += ["", f"{'step':34s} {'status':16s} {'seconds':>8s}"]
    out += [f"{s['name']:34s} {s['status']:16s} {s['seconds']:8.1f}" for s in doc["steps"]]
    for key, title in (("gpu_tests", "gpu-marked tests"), ("mcore_tests", "megatron-core CPU-path tests")):
        t = doc[key]
        if t is not None:
            out += ["", f"{title}: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                        f"{t['skipped']} skipped"]
            out += [f"  {c['outcome']:7s} {c['name']}  {c['message'][:110]}" for c in t["cases"]
                    if c["outcome"] != "passed"]
    out += ["", f"{'actor step (bf16, 1 device)':30s} {'side':9s} {'ms/step':>9s} {'tok/s':>9s} {'TFLOP/s':>8s} "
                f"{'MFU':>6s} {'/GEMM':>6s} {'peak GiB':>8s}"]
    for b in doc["actor_step"]:
        label = f"{b['model']['name']} {b['model']['num_hidden_layers']}/{b['model']['full_depth_layers']}L"
        for side in ("megatron", "hf"):
            s = b[side]
            if "error" in s:
                out.append(f"{label:30s} {side:9s} FAILED: {s['error'].splitlines()[0][:80]}")
            else:
                mfu = "n/a" if s["mfu"] is None else f"{100 * s['mfu']:.1f}%"
                out.append(f"{label:30s} {side:9s} {1e3 * s['step_s_median']:9.1f} {s['tokens_per_s']:9.0f} "
                           f"{s['tflops']:8.3g} {mfu:>6s} {100 * s['mfu_vs_gemm']:5.1f}% "
                           f"{_gib(s['memory']['peak_allocated'])}")
            label = ""
        r = b["ratio"]
        if r:
            out.append(f"{'':30s} Megatron/HF tokens/s {r['megatron_over_hf_tokens_per_s']:.2f}x, first-step loss "
                       f"{_pct(r['loss_rel_diff'])}, grad norm {_pct(r['grad_norm_rel_diff'])}; layer spec "
                       f"{b['megatron'].get('layer_spec', '?')}, GEMM {b['device']['gemm_tflops']:.3g} TFLOP/s")
    out += ["", "planner vs measured, GiB planned/measured (relative error)"]
    for p in doc["planner"]:
        if p["error"]:
            out.append(f"  {p['model']}: {p['error']}")
            continue
        out.append(f"  {p['model']:14s} " + "  ".join(
            f"{k} {_gib(c['planned']).strip()}/{_gib(c['measured']).strip()} ({_pct(c['rel_error'])})"
            for k, c in p["components"].items()))
    imp, api = doc["imports"], doc["mcore_api"]
    if imp is not None:
        missing = [f["distribution"] or f["module"] for f in imp["findings"] if f["provided_by"] in
                   ("missing", "import-error")]
        out.append(f"\nimports: {'ok' if imp['ok'] else 'MISSING ' + ', '.join(missing)}")
    if api is not None:
        out.append(f"megatron-core {api['megatron_core']} API: {api['checked']} uses checked, "
                   f"{len(api['missing'])} missing")
    return "\n".join(out)


def write_logs(doc: dict, work: Path, out: Path) -> None:
    """All step logs in one file (each capped), since only a few files come back from the device."""
    parts = []
    for s in doc["steps"]:
        log = work / f"{s['name']}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        if len(text) > 1_500_000:
            text = "[... head cut ...]\n" + text[-1_500_000:]
        parts.append(f"===== {s['name']} ({s['status']}, {s['seconds']:.1f} s) =====\n{text}")
    (out / "gpu_check_logs.txt").write_text("\n".join(parts))


def cmd_collect(work: Path, out: Path, dry_run: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    doc = collect(work, dry_run)
    errors = validate(doc, SCHEMA)
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=1))
    text = table(doc)
    (out / "gpu_check.txt").write_text(text + "\n")
    write_logs(doc, work, out)
    print(text)
    for e in errors:
        print(f"[schema] {e}")
    return 0 if not errors else 1


def cmd_validate(path: Path) -> int:
    doc = _read_json(path)
    if doc is None:
        print(f"error: {path}: not readable JSON")
        return 1
    errors = validate(doc, SCHEMA)
    for e in errors:
        print(f"[schema] {path}: {e}")
    print(f"[schema] {path}: {'valid' if not errors else f'{len(errors)} violations'} ({doc.get('schema')})")
    return 0 if not errors else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("plan").add_argument("work", type=Path)
    c = sub.add_parser("collect")
    c.add_argument("work", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--dry-run", action="store_true")
    sub.add_parser("validate").add_argument("file", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "plan":
        return cmd_plan(args.work)
    if args.cmd == "collect":
        return cmd_collect(args.work, args.out, args.dry_run)
    return cmd_validate(args.file)


if __name__ == "__main__":
    sys.exit(main())

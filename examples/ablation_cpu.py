"""Helpers of examples/ablation_cpu.sh (GRPO vs SPARK alternate vs SPARK mixed on the synthetic arithmetic task).

    python examples/ablation_cpu.py data       --out runs/ablation/data
    python examples/ablation_cpu.py judgments  --out runs/ablation/data --model runs/ablation/warmup_s1/warmup_model
    python examples/ablation_cpu.py report     --root runs/ablation --docs docs

data: splits the task's distinct questions (a + b, a - b with operands 0..5) into training questions and held-out
  questions by a seeded shuffle, and writes them in the training record format (train.jsonl, heldout.jsonl) plus
  the evaluation suite (suite.yaml: held-out answers and held-out judgments).
judgments: held-out judgment tasks built from held-out rollouts: a fixed model (the warmed-up model every method
  starts from) samples n responses per held-out question on vLLM, the training verifier labels them, and the
  training's recycle builder turns each group into a pointwise or pairwise judgment task (the same rules and
  templates as training), over several rounds of sampling; pointwise tasks are balanced to as many Yes as No
  labels. Written as spark-format judgment records.
report: reads every run's OUT/summary.json and writes the table (mean, std and per-seed values) and the plot.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

METHODS = ("grpo", "alternate", "mixed")
LABELS = {"grpo": "GRPO (recycling off)", "alternate": "SPARK alternate", "mixed": "SPARK mixed"}
QUESTION = "What is {a} {op} {b}? Put the final answer in \\boxed{{}}."


def questions(max_operand: int = 5) -> list:
    """Every distinct question of synthetic:arith?max=N (subtraction ordered so results are >= 0)."""
    out = [(a, "+", b, a + b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    out += [(a, "-", b, a - b) for a in range(max_operand + 1) for b in range(a + 1)]
    return out


def _record(uid: str, a, op, b, answer) -> dict:
    return {"id": uid, "message": json.dumps([{"role": "user", "content": QUESTION.format(a=a, op=op, b=b)}]),
            "answer": str(answer)}


def cmd_data(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    qs = questions()
    random.Random(args.seed).shuffle(qs)
    k = round(len(qs) * args.heldout_fraction)
    held, train = qs[:k], qs[k:]
    # each training question several times, so every step's batch is full (16 prompts)
    train_rows = [_record(f"t{r}_{i}", *q) for r in range(args.repeat) for i, q in enumerate(train)]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    (out / "heldout.jsonl").write_text("".join(json.dumps(_record(f"h{i}", *q)) + "\n" for i, q in enumerate(held)))
    (out / "suite.yaml").write_text(f"""# held-out evaluation of the ablation (examples/ablation_cpu.sh)
name: ablation-heldout
# greedy as the reference; no repetition penalty: on this toy task it would penalise every answer that repeats
# an operand of the question (e.g. 5 - 0 = 5), a bias of the task's tiny vocabulary, not of the methods
decoding: {{temperature: 0.0, max_tokens: 16, repetition_penalty: 1.0}}
engine: {{engine: vllm, batch_size: 256, max_prompt_tokens: 512}}
datasets:
  - {{name: heldout-answers, path: heldout.jsonl, format: spark, kind: answer}}
  - {{name: heldout-judgments, path: judgments.jsonl, format: spark, kind: judgment}}
""")
    print(f"{len(train)} training questions ({len(train_rows)} records), {len(held)} held-out questions -> {out}")


def cmd_judgments(args) -> None:
    from spark_megatron.config import RecycleConfig, RolloutConfig
    from spark_megatron.data.loading import load_prompts
    from spark_megatron.eval.model import hf_directory, resolve_model
    from spark_megatron.recycle import RecycleBuilder
    from spark_megatron.rollout.engine import SamplingSpec, build_engine
    from spark_megatron.types import TaskKind
    from spark_megatron.verify import Verifier, VerifyRequest

    out = Path(args.out)
    prompts = load_prompts([str(out / "heldout.jsonl")]).prompts
    rc = RecycleConfig(enabled=True, judge_input="answer", label_style="yes_no", max_judgment_per_step=-1,
                       max_reflection_per_step=-1)
    builder = RecycleBuilder(rc, seed=args.seed)
    rows = []
    with hf_directory(resolve_model(args.model), progress=False) as hf, Verifier(num_workers=0) as verifier:
        cfg = RolloutConfig(engine="vllm", n=args.n, max_prompt_tokens=512, max_response_tokens=16,
                            kv_cache_memory_bytes=64 << 20, enforce_eager=True)
        engine = build_engine(cfg, hf, dtype="float32", seed=args.seed)
        try:
            for rnd in range(args.rounds):
                groups = engine.generate(prompts, SamplingSpec(n=args.n, temperature=1.0, max_tokens=16))
                flat = [(g, r) for g in groups for r in g.rollouts]
                for (g, r), v in zip(flat, verifier.verify_batch(
                        [VerifyRequest(r.response_text, g.prompt.ground_truth) for g, r in flat])):
                    r.verdict = v
                for s in builder.build(groups, step=rnd).samples:
                    if s.kind in (TaskKind.POINTWISE, TaskKind.PAIRWISE):
                        rows.append({"id": f"r{rnd}/{s.uid}", "message": json.dumps(s.messages),
                                     "answer": s.ground_truth, "subset": TaskKind(s.kind).value})
        finally:
            engine.shutdown()
    if not rows:
        raise SystemExit("error: the held-out rollouts gave no judgment tasks (no boxed answers: warm up longer)")
    if args.balance:
        rows = balanced(rows, args.seed)
    (out / "judgments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kinds = {k: sum(r["subset"] == k for r in rows) for k in ("pointwise", "pairwise")}
    yes = sum(r["answer"] == "Yes" for r in rows)
    print(f"{len(rows)} held-out judgment tasks ({kinds}, {yes} labelled Yes) -> {out / 'judgments.jsonl'}")


def balanced(rows: list, seed: int) -> list:
    """Equal numbers of Yes and No pointwise tasks (a weak model's rollouts are mostly wrong, and a judge that
    always says No should not score high); pairwise tasks are kept (their A/B order is already a fair coin)."""
    yes = [r for r in rows if r["answer"] == "Yes"]
    no = [r for r in rows if r["answer"] == "No"]
    k = min(len(yes), len(no))
    if k == 0:
        print("warning: pointwise labels are all one verdict; the set stays unbalanced", file=sys.stderr)
        return rows
    rng = random.Random(seed)
    keep = {id(r) for r in rng.sample(yes, k) + rng.sample(no, k)}
    return [r for r in rows if r["subset"] == "pairwise" or id(r) in keep]


# ---------------------------------------------------------------------------------------------- report

def collect(root: Path, seeds: list) -> dict:
    """method -> dataset -> [accuracy per seed]."""
    res = {}
    for m in METHODS:
        for s in seeds:
            summary = json.loads((root / f"{m}_s{s}" / "eval" / "summary.json").read_text())
            for name, d in summary["datasets"].items():
                res.setdefault(m, {}).setdefault(name, []).append(d["accuracy"])
    return res


def _fmt(vals: list) -> str:
    mean = statistics.mean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * sd:.1f} ({', '.join(f'{100 * v:.1f}' for v in vals)})"


def cmd_report(args) -> None:
    root, docs = Path(args.root), Path(args.docs)
    seeds = args.seeds
    res = collect(root, seeds)
    datasets = list(next(iter(res.values())))
    sizes = json.loads((root / f"grpo_s{seeds[0]}" / "eval" / "summary.json").read_text())["datasets"]
    head = "| Method | " + " | ".join(f"{d} (n={sizes[d]['n']})" for d in datasets) + " |"
    lines = [head, "|---|" + "---|" * len(datasets)]
    for m in METHODS:
        lines.append(f"| {LABELS[m]} | " + " | ".join(_fmt(res[m][d]) for d in datasets) + " |")
    floor = constant_judge(root / "data" / "judgments.jsonl")
    note = (f"Accuracy in % on held-out tasks, mean ± sample std over seeds {seeds} (per-seed values in "
            f"parentheses), greedy decoding, each run evaluated with `spark-megatron eval`. A judge that gives "
            f"the same verdict to every task (the best of always A/B x always Yes/No) scores {100 * floor:.1f} "
            f"on the held-out judgments.")
    table = "\n".join(lines) + "\n\n" + note + "\n"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "ablation_table.md").write_text(table)
    plot(res, datasets, seeds, docs / "ablation.png", {d: floor for d in datasets if "judg" in d})
    print(table)


def constant_judge(path: Path) -> float:
    """Accuracy of the best constant judge (always A or B on pairwise, always Yes or No on pointwise tasks)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    best = 0
    for pair in "AB":
        for point in ("Yes", "No"):
            best = max(best, sum(r["answer"] in (pair, point) for r in rows))
    return best / len(rows)


def plot(res: dict, datasets: list, seeds: list, path: Path, floors: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for i, m in enumerate(METHODS):
            vals = [100 * v for v in res[m][d]]
            mean = statistics.mean(vals)
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            ax.bar(i, mean, yerr=sd, capsize=4, color=("tab:gray", "tab:blue", "tab:orange")[i], alpha=0.75)
            ax.plot([i] * len(vals), vals, "k.", ms=5)
        ax.set_xticks(range(len(METHODS)), [LABELS[m].replace(" (", "\n(") for m in METHODS], fontsize=8)
        if d in floors:
            ax.axhline(100 * floors[d], ls="--", color="k", lw=1, label="constant verdict")
            ax.legend(loc="lower right", fontsize=7)
        ax.set_title(d)
        ax.set_ylabel("accuracy (%)")
    fig.suptitle(f"held-out accuracy, mean ± std over seeds {seeds} (dots: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--heldout-fraction", type=float, default=1 / 3)
    d.add_argument("--repeat", type=int, default=8)
    j = sub.add_parser("judgments")
    j.add_argument("--out", required=True)
    j.add_argument("--model", required=True, help="the model whose held-out rollouts are recycled")
    j.add_argument("--n", type=int, default=8)
    j.add_argument("--rounds", type=int, default=8)
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--no-balance", dest="balance", action="store_false",
                   help="keep every pointwise task (default: as many Yes as No labels)")
    r = sub.add_parser("report")
    r.add_argument("--root", required=True)
    r.add_argument("--docs", default="docs")
    r.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = p.parse_args(argv)
    {"data": cmd_data, "judgments": cmd_judgments, "report": cmd_report}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

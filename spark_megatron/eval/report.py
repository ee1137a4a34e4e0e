"""summary.json and table.md, computed from items.jsonl rows alone (plus the suite's order and the read reports).

Per dataset: n, accuracy, first-attempt accuracy (equal to accuracy without self-reflection), per-subset
accuracy, unparsable verdicts and ties (judgment datasets), generation errors, mean generated tokens.
Macro averages as the paper reports them: Avg-M over answer datasets, Avg-R over judgment (reward) datasets,
Avg-All over all datasets (each dataset weighs the same, whatever its size).
"""
from __future__ import annotations

import collections
from typing import Optional


def _mean(values: list) -> Optional[float]:
    return sum(values) / len(values) if values else None


def dataset_summary(rows: list, kind: str) -> dict:
    n = len(rows)
    subsets = collections.defaultdict(list)
    for r in rows:
        if r.get("subset") is not None:
            subsets[str(r["subset"])].append(bool(r["correct"]))
    out = {"kind": kind, "n": n, "correct": sum(bool(r["correct"]) for r in rows),
           "accuracy": _mean([float(bool(r["correct"])) for r in rows]),
           "first_attempt_accuracy": _mean([float(bool(r["first_correct"])) for r in rows]),
           "errors": sum(1 for r in rows if r.get("error")),
           "mean_tokens": _mean([float(r.get("tokens", 0)) for r in rows]),
           "subsets": {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(subsets.items())}}
    if kind == "judgment":
        out["unparsable_items"] = sum(1 for r in rows if r.get("unparsable"))
        out["unparsable_verdicts"] = sum(int(r.get("unparsable", 0)) for r in rows)
        out["ties"] = sum(1 for r in rows if r.get("tie"))
    else:
        out["no_answer"] = sum(1 for r in rows if r.get("extracted") is None)
        out["mean_rounds"] = _mean([float(r.get("rounds", 0)) for r in rows])
    return out


def summarize(rows: list, suite, reports: Optional[dict] = None, model: str = "") -> dict:
    """The summary of every dataset in suite order, from its rows; `reports`: name -> DatasetReport dict."""
    by_ds = collections.defaultdict(list)
    for r in rows:
        by_ds[r["dataset"]].append(r)
    datasets = {}
    for spec in suite.datasets:
        got = by_ds.get(spec.name, [])
        keys = [r["id"] for r in got]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"items.jsonl scores item '{dup}' of {spec.name} more than once")
        entry = dataset_summary(got, spec.kind)
        entry["format"] = spec.format
        if reports and spec.name in reports:
            entry["read"] = reports[spec.name]
        datasets[spec.name] = entry
    return {"model": model, "suite": suite.name, "self_reflection": suite.self_reflection.enabled,
            "datasets": datasets, "averages": averages(datasets, "accuracy"),
            "first_attempt_averages": averages(datasets, "first_attempt_accuracy")}


def averages(datasets: dict, key: str) -> dict:
    vals = {k: [d[key] for d in datasets.values() if d["kind"] == k and d[key] is not None]
            for k in ("answer", "judgment")}
    return {"Avg-M": _mean(vals["answer"]), "Avg-R": _mean(vals["judgment"]),
            "Avg-All": _mean(vals["answer"] + vals["judgment"])}


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table(summary: dict, label: str = "") -> str:
    """Markdown laid out like the paper's Table 1: answer benchmarks, Avg-M, reward benchmarks, Avg-R, Avg-All
    (accuracy in %); with self-reflection a first-attempt row above the final one."""
    ds = summary["datasets"]
    answer = [k for k, v in ds.items() if v["kind"] == "answer"]
    judgment = [k for k, v in ds.items() if v["kind"] == "judgment"]
    cols = answer + (["Avg-M"] if answer else []) + judgment + (["Avg-R"] if judgment else []) + ["Avg-All"]
    name = label or summary.get("model") or "model"
    lines = ["| Model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

    def row(title: str, key: str, avg_key: str) -> str:
        avg = summary[avg_key]
        cells = [_pct(ds[k][key]) for k in answer] + ([_pct(avg["Avg-M"])] if answer else [])
        cells += [_pct(ds[k][key]) for k in judgment] + ([_pct(avg["Avg-R"])] if judgment else [])
        return f"| {title} | " + " | ".join(cells + [_pct(avg["Avg-All"])]) + " |"

    if summary.get("self_reflection"):
        lines.append(row(f"{name} (first attempt)", "first_attempt_accuracy", "first_attempt_averages"))
        lines.append(row(f"{name} + self-reflection", "accuracy", "averages"))
    else:
        lines.append(row(name, "accuracy", "averages"))
    sizes = ", ".join(f"{k} {v['n']}" for k, v in ds.items())
    notes = [f"Accuracy in %, greedy decoding. Items: {sizes}."]
    for k in judgment:
        v = ds[k]
        notes.append(f"{k}: {v['unparsable_items']} items with unparsable verdicts, {v['ties']} ties "
                     f"(both counted wrong).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"

"""`spark-megatron plot RUN_DIR [--out PNG] [--keys ...]`: draw the training curves of a run to PNG."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spark_megatron.metrics import read_metrics

DEFAULT_KEYS = ("policy/accuracy", "judge/accuracy", "reflection/accuracy", "policy/kl", "policy/entropy",
                "rollout/response_len", "perf/tokens_per_s", "time/step_s")


def smooth(values: list, window: int) -> list:
    """Trailing moving average that ignores missing values (None)."""
    out, buf = [], []
    for v in values:
        if v is not None:
            buf.append(v)
            buf = buf[-window:]
        out.append(sum(buf) / len(buf) if buf else None)
    return out


def plot_run(run_dir, out=None, keys=DEFAULT_KEYS, window: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise SystemExit(f"error: {run_dir / 'metrics.jsonl'} has no rows")
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(r["step"], r.get(key)) for r in rows if r.get(key) is not None]
        steps, vals = zip(*pts)
        ax.plot(steps, vals, ".", alpha=0.35, color="tab:blue")
        ax.plot(steps, smooth(list(vals), window), "-", color="tab:blue", label=f"{key} ({window}-step mean)")
        ax.set_ylabel(key.split("/")[-1])
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"SPARK run: {run_dir.name}")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="spark-megatron plot", description=__doc__)
    p.add_argument("run_dir", help="run output_dir containing metrics.jsonl")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS), help="metric keys to draw")
    p.add_argument("--window", type=int, default=5, help="moving-average window in steps")
    a = p.parse_args(argv)
    if not (Path(a.run_dir) / "metrics.jsonl").is_file():
        print(f"error: {a.run_dir}/metrics.jsonl not found", file=sys.stderr)
        return 2
    print(plot_run(a.run_dir, a.out, a.keys, a.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())

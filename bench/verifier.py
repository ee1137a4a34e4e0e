"""Verifier throughput (process pool vs in-process), against an earlier verifier, and the hard timeout.

    python bench/verifier.py [--items 400] [--workers 2] [--timeout 2] [--baseline-rev d057ccc]

Prints a table and exits 0 when every check holds (pool results equal in-process results, the pathological
item is cut off and counted wrong, all other items complete correctly, the earlier verifier gives the same
verdicts on the workloads); exits 1 otherwise. The baseline is the verifier package as it was at
`--baseline-rev` (by default the commit before the hedge-proof rule), read from git into a temporary package and
timed in-process on the same items in the same run, alternating with the current one; the ratio of their
throughputs is what to compare, not the absolute numbers (the machine is shared).
"""
from __future__ import annotations

import argparse
import importlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from math import gcd
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spark_megatron.verify import Verifier  # noqa: E402

PATHOLOGICAL = r"\boxed{9^{9^{9^{9^{9}}}}}"
BASELINE_REV = "d057ccc"
"""The verifier before the hedge-proof rule (issue 12)."""
ROOT = Path(__file__).resolve().parent.parent


def _coprime(a: int, b: int) -> int:
    return a if gcd(a, b) == 1 else 1


def workload(n: int, seed: int = 0) -> list:
    """n distinct (response, ground truth, expected) triples that all need math-verify (no string fast path)."""
    rng = random.Random(seed)
    makers = [
        # in lowest terms: an unreduced fraction given for a number is a computation, not an answer
        lambda a, b: (rf"\frac{{{_coprime(a, b)}}}{{{b}}}", f"{_coprime(a, b) / b:.6f}".rstrip("0").rstrip("."), True),
        lambda a, b: (f"(x+{a})(x+{b})", f"x^2+{a + b}x+{a * b}", True),
        lambda a, b: (f"(x+{a})(x+{b})", f"x^2+{a + b + 1}x+{a * b}", False),
        lambda a, b: (rf"[{a}, {a + b})", rf"[{a},{a + b})", True),
        lambda a, b: (rf"\sqrt{{{a * a * b}}}", rf"{a}\sqrt{{{b}}}", True),
        lambda a, b: (rf"\begin{{pmatrix}}{a}&{b}\\{b}&{a}\end{{pmatrix}}",
                      rf"\begin{{pmatrix}}{a}&{b}\\{a}&{b}\end{{pmatrix}}", a == b),
    ]
    seen, out = set(), []
    while len(out) < n:
        a, b = rng.randint(1, 60), rng.randint(2, 60)
        pred, gt, want = makers[len(out) % len(makers)](a, b)
        if (pred, gt) not in seen:
            seen.add((pred, gt))
            out.append((f"The answer is \\boxed{{{pred}}}.", gt, want))
    return out


def rl_batch(n_prompts: int, seed: int = 1) -> list:
    """A policy step's verification load: n rollouts per prompt that repeat answers, Yes/No and A/B judgments,
    multiple choice and numbers (most decided without sympy), a few responses with two boxes."""
    rng = random.Random(seed)
    out = []
    for i in range(n_prompts):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        kind = i % 4
        if kind == 0:
            gt, answers = str(a + b), [str(a + b), str(a + b + 1), rf"\frac{{{2 * (a + b) + 1}}}{{2}}"]
        elif kind == 1:
            gt, answers = rng.choice(["Yes", "No"]), ["Yes", "No", r"\text{Yes}", "yes."]
        elif kind == 2:
            gt, answers = "C", ["C", "(B) 12", "Option C", "A"]
        else:
            gt, answers = f"{a}x+{b}", [f"{b}+{a}x", f"{a}x+{b + 1}", f"x({a}) + {b}"]
        for j in range(8):
            text = f"Step {j}: reasoning ... so the answer is \\boxed{{{rng.choice(answers)}}}."
            if j == 7:
                text += f" Double-checking: \\boxed{{{rng.choice(answers)}}}"
            out.append((text, gt, None))
    return out


def load_baseline(rev: str, where: Path):
    """The verifier package at git revision `rev` as an importable `_baseline_verify` package (None if git or the
    revision is not available)."""
    pkg = where / "_baseline_verify"
    pkg.mkdir(parents=True, exist_ok=True)
    try:
        names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:spark_megatron/verify"], cwd=ROOT,
                               check=True, capture_output=True, text=True).stdout.split()
        for name in (n for n in names if n.endswith(".py")):
            src = subprocess.run(["git", "show", f"{rev}:spark_megatron/verify/{name}"], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout
            (pkg / name).write_text(src.replace("spark_megatron.verify", "_baseline_verify"))
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"baseline {rev} not available ({e}); skipping the comparison")
        return None
    sys.path.insert(0, str(where))
    return importlib.import_module("_baseline_verify")


def compare(current: Verifier, baseline, workloads: dict, rounds: int = 7) -> list:
    """Rows (workload, items, median current s, median baseline s, median of the per-round throughput ratios,
    same verdicts). Each round times both back to back, in alternating order. In-process, so the process's CPU
    time is the work done: on a shared machine wall time mostly measures the other processes."""
    rows = []
    for name, items in workloads.items():
        times = {"current": [], "baseline": []}
        verdicts = {}
        for r in range(rounds):
            pair = (("current", current), ("baseline", baseline))
            for label, v in (pair if r % 2 == 0 else pair[::-1]):
                out, _, cpu = timed(v, items)
                times[label].append(cpu)
                verdicts[label] = [o.correct for o in out]
        ratios = sorted(b / c for c, b in zip(times["current"], times["baseline"]))
        same = verdicts["current"] == verdicts["baseline"]
        rows.append((name, len(items), statistics.median(times["current"]), statistics.median(times["baseline"]),
                     ratios[len(ratios) // 2], same))
    return rows


def cpu_seconds(verifier: Verifier) -> float:
    """CPU time of this process plus the verifier's worker processes (workers only with psutil)."""
    total = time.process_time()
    try:
        import psutil
    except ImportError:
        return total
    for pid in verifier.worker_pids():
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def timed(verifier: Verifier, items: list) -> tuple:
    """(verdicts, wall seconds, CPU seconds)."""
    c0, t0 = cpu_seconds(verifier), time.perf_counter()
    verdicts = verifier.verify_batch([(r, g) for r, g, _ in items])
    return verdicts, time.perf_counter() - t0, cpu_seconds(verifier) - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=2.0, help="per-answer limit, worker CPU seconds")
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the verifier to compare with")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    items = workload(args.items)
    warm = workload(24, seed=99)
    rows, ok = [], True

    single = Verifier(timeout_s=args.timeout, num_workers=0)
    timed(single, warm)  # sympy/math-verify import and caches
    v_single, t_single, c_single = timed(single, items)
    rows.append(("in-process (1 proc)", len(items), t_single, len(items) / t_single, c_single))
    with tempfile.TemporaryDirectory() as tmp:
        old = load_baseline(args.baseline_rev, Path(tmp))
        if old is not None:
            baseline = old.Verifier(timeout_s=args.timeout, num_workers=0)
            timed(baseline, warm)
            workloads = {"math-verify items": items, "RL batch (256 prompts x 8)": rl_batch(256)}
            versus = compare(single, baseline, workloads)
            # the earlier verifier passes hedges, so only the hedge-free math workload must agree verdict by verdict
            ok &= versus[0][5]

    t0 = time.perf_counter()
    pool = Verifier(timeout_s=args.timeout, num_workers=args.workers)
    timed(pool, warm)
    startup = time.perf_counter() - t0
    v_pool, t_pool, c_pool = timed(pool, items)
    rows.append((f"pool ({args.workers} workers)", len(items), t_pool, len(items) / t_pool, c_pool))

    agree = [a.correct for a in v_single] == [b.correct for b in v_pool]
    expected = [a.correct for a in v_pool] == [w for _, _, w in items]
    ok &= agree and expected

    batch = items[:40] + [(PATHOLOGICAL, "10^{3}", False)] + items[40:80]
    v_bad, t_bad, _ = timed(pool, batch)
    bad = v_bad[40]
    rest_ok = [v.correct for i, v in enumerate(v_bad) if i != 40] == [w for i, (_, _, w) in enumerate(batch) if i != 40]
    cut_off = bad.timed_out and not bad.correct and t_bad < args.timeout * 10 + 10  # 10 x = the wall-clock cap
    ok &= rest_ok and cut_off
    pool.close()

    print(f"load average before the run: {load:.2f} on {os.cpu_count()} cores (other processes share the CPU)")
    print(f"{'mode':24} {'items':>6} {'seconds':>8} {'items/s':>9} {'CPU ms/item':>12}")
    for name, n, t, rate, cpu in rows:
        print(f"{name:24} {n:6d} {t:8.2f} {rate:9.1f} {1000 * cpu / n:12.2f}")
    print(f"pool / in-process throughput ratio: {rows[1][3] / rows[0][3]:.2f}x  "
          f"(pool start + warm-up {startup:.2f} s)")
    print(f"verdicts identical pool vs in-process: {agree}; all match expected: {expected}")
    print(f"pathological batch: {len(batch)} items incl. {PATHOLOGICAL}, limit {args.timeout:.1f} CPU s -> "
          f"{t_bad:.2f} s, timed_out={bad.timed_out}, correct={bad.correct}, other {len(batch) - 1} items "
          f"correct as expected: {rest_ok}, workers restarted: {pool.pool_restarts}")
    if old is not None:
        print(f"\ncurrent verifier vs {args.baseline_rev} (in-process CPU seconds, median of 7 alternating rounds):")
        print(f"{'workload':28} {'items':>6} {'current s':>10} {'baseline s':>11} {'throughput ratio':>17} "
              f"{'same verdicts':>14}")
        for name, n, t_cur, t_old, ratio, same in versus:
            print(f"{name:28} {n:6d} {t_cur:10.3f} {t_old:11.3f} {ratio:17.2f} {str(same):>14}")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

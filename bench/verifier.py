"""Verifier throughput (process pool vs in-process) and the hard timeout on a pathological answer.

    python bench/verifier.py [--items 400] [--workers 2] [--timeout 2]

Prints a table and exits 0 when every check holds (pool results equal in-process results, the pathological
item is cut off and counted wrong, all other items complete correctly); exits 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spark_megatron.verify import Verifier  # noqa: E402

PATHOLOGICAL = r"\boxed{9^{9^{9^{9^{9}}}}}"


def workload(n: int, seed: int = 0) -> list:
    """n distinct (response, ground truth, expected) triples that all need math-verify (no string fast path)."""
    rng = random.Random(seed)
    makers = [
        lambda a, b: (rf"\frac{{{a}}}{{{b}}}", f"{a / b:.6f}".rstrip("0").rstrip("."), True),
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
    args = ap.parse_args()
    load = os.getloadavg()[0]
    items = workload(args.items)
    warm = workload(24, seed=99)
    rows, ok = [], True

    single = Verifier(timeout_s=args.timeout, num_workers=0)
    timed(single, warm)  # sympy/math-verify import and caches
    v_single, t_single, c_single = timed(single, items)
    rows.append(("in-process (1 proc)", len(items), t_single, len(items) / t_single, c_single))

    t0 = time.perf_counter()
    pool = Verifier(timeout_s=args.timeout, num_workers=args.workers)
    timed(pool, warm)
    startup = time.perf_counter() - t0
    v_pool, t_pool, c_pool = timed(pool, items)
    rows.append((f"pool ({args.workers} workers)", len(items), t_pool, len(items) / t_pool, c_pool))

    agree = [a.correct for a in v_single] == [b.correct for b in v_pool]
    expected = [a.correct for a in v_pool] == [w for _, _, w in items]
    ok &= agree and expected

    batch = items[:40] + [(PATHOLOGICAL, "1", False)] + items[40:80]
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
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

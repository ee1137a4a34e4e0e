import os
import sys

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------------ tiers and durations
# Every test carries a tier marker (pytest.ini); a test without one fails the collection, so `-m unit` (the quick
# tier) and the others together always cover the whole suite.
# Every run merges its tests' durations (setup + call + teardown) into one JSON file, so the time of each test and
# tier is known without rerunning the suite: .pytest_durations.json at the repository root (git-ignored), or the
# path in SPARK_TEST_DURATIONS. Tests not run keep their last entry.
import json  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

TIERS = {"unit", "distributed", "e2e", "gpu", "vllm"}
_MARKERS: dict = {}
_DURATIONS: dict = {}


def pytest_collection_modifyitems(items):
    unmarked = []
    for item in items:
        _MARKERS[item.nodeid] = sorted({m.name for m in item.iter_markers()} & TIERS)
        if not _MARKERS[item.nodeid]:
            unmarked.append(item.nodeid)
    if unmarked:
        raise pytest.UsageError(f"tests without a tier marker ({', '.join(sorted(TIERS))}): {unmarked[:5]}")


def pytest_runtest_logreport(report):
    entry = _DURATIONS.setdefault(report.nodeid, {"seconds": 0.0, "outcome": "passed"})
    entry["seconds"] += report.duration
    if report.outcome != "passed" and entry["outcome"] == "passed":
        entry["outcome"] = report.outcome


def pytest_sessionfinish(session, exitstatus):
    if not _DURATIONS:
        return
    path = os.environ.get("SPARK_TEST_DURATIONS") or os.path.join(str(session.config.rootpath),
                                                                 ".pytest_durations.json")
    try:
        with open(path) as f:
            known = json.load(f).get("tests", {})
    except (OSError, ValueError):
        known = {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    for nodeid, entry in _DURATIONS.items():
        known[nodeid] = {**entry, "seconds": round(entry["seconds"], 3), "markers": _MARKERS.get(nodeid, []),
                         "at": now}
    tiers: dict = {}
    for entry in known.values():
        for marker in entry.get("markers") or ["none"]:
            tiers[marker] = round(tiers.get(marker, 0.0) + entry["seconds"], 1)
    out = {"updated": now, "seconds_by_marker": tiers, "tests": dict(sorted(known.items()))}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, path)

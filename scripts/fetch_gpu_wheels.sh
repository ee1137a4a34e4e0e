#!/usr/bin/env bash
# Download the wheels listed in scripts/gpu_wheels.txt for the accelerator machine (CPython 3.12, x86_64
# manylinux) into DIR (default .gpu_wheels, git-ignored), and check that they fit the device tool's carry limit.
#   bash scripts/fetch_gpu_wheels.sh [DIR]
# Needs pip and PyPI; the machine that runs them needs neither (gpu_check.sh installs with --no-index).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gpu_wheels}
list=scripts/gpu_wheels.txt
limit_mib=${GPU_WHEELS_LIMIT_MIB:-48}  # of the 64 MiB carried per call; the working tree needs the rest
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
mkdir -p "$dir"
mapfile -t reqs < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$list" | grep -v '^$')
[ "${#reqs[@]}" -gt 0 ] || { echo "error: $list lists no wheels" >&2; exit 2; }
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do platforms+=(--platform "$p"); done
# PIP_CONSTRAINT: the local machine's global pip constraints must not veto versions meant for another machine
PIP_CONSTRAINT= "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$dir" "${reqs[@]}"
# exactly one wheel per listed name, nothing else (two versions of one package stop the install there)
"$py" - "$dir" "${reqs[@]}" <<'PY'
import re, sys
from pathlib import Path
d, reqs = Path(sys.argv[1]), sys.argv[2:]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
want = {norm(r.split("==")[0]): r.split("==")[1] for r in reqs}
have = {}
for w in sorted(d.glob("*.whl")):
    name, version = w.name.split("-")[:2]
    have.setdefault(norm(name), []).append((version, w))
bad = [f"{n}: {[v for v, _ in vs]}" for n, vs in have.items() if len(vs) > 1]
bad += [f"{n}: not listed in scripts/gpu_wheels.txt" for n in have if n not in want]
bad += [f"{n}=={v}: missing" for n, v in want.items() if n not in have]
bad += [f"{n}: {have[n][0][0]} != {v}" for n, v in want.items() if n in have and have[n][0][0] != v]
if bad:
    sys.exit(f"error: {d}: " + "; ".join(bad) + " (remove stale wheels and fetch again)")
PY
total=$(du -cb "$dir"/*.whl | tail -1 | cut -f1)
for w in "$dir"/*.whl; do awk -v b="$(stat -c %s "$w")" -v n="$(basename "$w")" 'BEGIN{printf "%8.2f MiB  %s\n", b/1048576, n}'; done
awk -v b="$total" -v l="$limit_mib" 'BEGIN{printf "%8.2f MiB  total (limit %s MiB)\n", b/1048576, l}'
if [ "$total" -gt $((limit_mib * 1048576)) ]; then
  echo "error: $dir holds more than $limit_mib MiB: it would not travel with the working tree (64 MiB per call)" >&2
  exit 1
fi

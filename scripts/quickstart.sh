#!/usr/bin/env bash
# Set up .venv (reused when the lock is unchanged), run the tiny SPARK job on CPU, and plot its curves.
# Extra arguments are config overrides, e.g. `bash scripts/quickstart.sh total_steps=10`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 TORCHDYNAMO_DISABLE=1 PYTHONUNBUFFERED=1
out=runs/quickstart
.venv/bin/spark-megatron train --config configs/tiny_cpu.yaml output_dir=$out "$@"
.venv/bin/spark-megatron plot $out

#!/usr/bin/env bash
# The whole product on one CPU machine, small: SPARK training on a tiny random Qwen2 with real vLLM rollouts and a
# Megatron actor at TP2 on 2 gloo ranks, then HF export, a logits check against the checkpoint, and test-time
# self-reflection on the exported model. About 5 minutes on 2 cores (after `bash scripts/setup_env.sh`).
#
#   bash examples/quickstart_cpu.sh [key=value ...]      e.g. total_steps=20 rollout.n=4
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 TORCHDYNAMO_DISABLE=1 PYTHONUNBUFFERED=1
out=${OUT:-runs/example_tp2}
.venv/bin/spark-megatron train --config configs/tiny_cpu.yaml output_dir="$out" \
    parallel.tensor_model_parallel_size=2 total_steps=10 warmup_sft_steps=100 checkpoint.save_interval=5 "$@"
.venv/bin/spark-megatron plot "$out"
bash examples/export_and_serve.sh "$out"

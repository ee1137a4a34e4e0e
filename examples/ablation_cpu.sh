#!/usr/bin/env bash
# A small ablation that runs on one CPU machine: GRPO (recycling off) vs SPARK alternate vs SPARK mixed on the
# synthetic arithmetic task of configs/tiny_cpu.yaml, 3 seeds each, every run evaluated with `spark-megatron eval`
# on held-out answer tasks and held-out judgment tasks (built from held-out rollouts). Writes one table and one
# plot (mean, std, per-seed values) to docs/.
#
#   bash examples/ablation_cpu.sh                 # ~35-60 min on 2 cores, depending on what else runs
#   SEEDS="1 2" STEPS=10 bash examples/ablation_cpu.sh
#
# Protocol:
#   1. data: the task's 57 distinct questions split 2:1 into training and held-out questions (seeded).
#   2. per seed, one supervised warm-up (WARMUP steps, as the quickstart) on the training questions; its model
#      snapshot is the start (and KL reference) of all three methods of that seed, so they differ only in RL.
#   3. held-out judgment tasks: the seed-1 warm-up model samples 8 responses per held-out question (8 rounds),
#      the verifier labels them and the training's recycle builder makes pointwise/pairwise judgment tasks
#      (pointwise tasks balanced to as many Yes as No labels).
#   4. per seed and method, STEPS RL steps (optim.lr=RL_LR: the learning rate the quickstart's single schedule
#      has reached when RL starts), then `spark-megatron eval` on the held-out suite.
#   5. report: docs/ablation_table.md and docs/ablation.png.
# Env: PY, OUT (default runs/ablation), SEEDS ("1 2 3"), STEPS (20), WARMUP (150), RL_LR (2.5e-4), DOCS (docs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/ablation}
SEEDS=${SEEDS:-"1 2 3"}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-150}
RL_LR=${RL_LR:-2.5e-4}
DOCS=${DOCS:-docs}
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 TORCHDYNAMO_DISABLE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SM="$PY -m spark_megatron.launch.cli"
COMMON=(checkpoint.save_interval=0 logging.wandb_project=null logging.tensorboard=false logging.progress=false
        "data.train_files=[$OUT/data/train.jsonl]")
t0=$(date +%s)
stamp() { echo "[ablation $(( $(date +%s) - t0 ))s] $*"; }

mkdir -p "$OUT"
$PY examples/ablation_cpu.py data --out "$OUT/data"
first_seed=${SEEDS%% *}
for seed in $SEEDS; do
  warm="$OUT/warmup_s$seed"
  if [ ! -d "$warm/warmup_model" ]; then
    stamp "seed $seed: warm-up ($WARMUP steps)"
    # total_steps=1: the warm-up, its snapshot (warmup_model), then one RL step that is not used
    $SM train --config configs/tiny_cpu.yaml output_dir="$warm" seed="$seed" warmup_sft_steps="$WARMUP" \
        total_steps=1 algorithm.recycle.enabled=false "${COMMON[@]}" > "$warm.log" 2>&1
  fi
  if [ "$seed" = "$first_seed" ] && [ ! -f "$OUT/data/judgments.jsonl" ]; then
    stamp "held-out judgment tasks from the seed-$seed warm-up model's held-out rollouts"
    $PY examples/ablation_cpu.py judgments --out "$OUT/data" --model "$warm/warmup_model" > "$OUT/judgments.log" 2>&1
    tail -1 "$OUT/judgments.log"
  fi
  for method in grpo alternate mixed; do
    run="$OUT/${method}_s$seed"
    case $method in
      grpo) recycle=(algorithm.recycle.enabled=false) ;;
      alternate) recycle=(algorithm.recycle.enabled=true algorithm.recycle.schedule=alternate) ;;
      mixed) recycle=(algorithm.recycle.enabled=true algorithm.recycle.schedule=mixed) ;;
    esac
    if [ ! -f "$run/metrics.jsonl" ] || [ "$(wc -l < "$run/metrics.jsonl")" -lt "$STEPS" ]; then
      rm -rf "$run"
      stamp "seed $seed: $method, $STEPS RL steps"
      $SM train --config configs/tiny_cpu.yaml output_dir="$run" seed="$seed" warmup_sft_steps=0 \
          total_steps="$STEPS" model.megatron_path="$warm/warmup_model" optim.lr="$RL_LR" optim.warmup_ratio=0 \
          "${recycle[@]}" "${COMMON[@]}" > "$run.log" 2>&1
    fi
    stamp "seed $seed: $method, eval"
    $SM eval --model "$run" --suite "$OUT/data/suite.yaml" --output "$run/eval" --no-progress > "$run.eval.log" 2>&1
    grep -A3 "^| Model" "$run.eval.log" | sed -n 3p
  done
done
stamp "report"
# shellcheck disable=SC2086
$PY examples/ablation_cpu.py report --root "$OUT" --docs "$DOCS" --seeds $SEEDS
stamp "done"

#!/usr/bin/env bash
# SPARK-VL-32B on 2 nodes x 8 H100 (actor TP8 x PP2, vLLM rollouts colocated) through NeMo-Run's SlurmExecutor.
# Dry run by default: renders the sbatch script and the torchrun command into $OUTPUT/launch/<id>/ and prints
# their paths. SUBMIT=1 submits. Run it on the login node (tunnel=local); see docs/cluster.md for ssh tunnels.
#
#   ACCOUNT=myacct PARTITION=batch CONTAINER=/shared/containers/spark_megatron.sqsh \
#   MODEL=/shared/models/Qwen2.5-VL-32B-Instruct DATA=/shared/data/spark_train.jsonl \
#   OUTPUT=/shared/runs/spark-vl-32b bash examples/slurm_qwen2_5_vl_32b.sh [key=value ...]
#
# FP8 (Hopper + Transformer Engine): RECIPE=configs/qwen2_5_vl_32b_fp8_tensorwise.yaml (or _delayed, _blockwise).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RECIPE=${RECIPE:-configs/qwen2_5_vl_32b.yaml}
: "${ACCOUNT:=my_account}" "${PARTITION:=batch}" "${CONTAINER:=/shared/containers/spark_megatron.sqsh}"
: "${MODEL:=/shared/models/Qwen2.5-VL-32B-Instruct}" "${DATA:=/shared/data/spark_train.jsonl}"
: "${OUTPUT:=runs/spark-vl-32b}" "${MOUNTS:=/shared:/shared}"
mode=--dryrun
[ "${SUBMIT:-0}" = 1 ] && mode=
echo "[plan] $RECIPE"
"$PY" -m spark_megatron.launch.cli plan --config "$RECIPE" --model-config configs/models/qwen2_5_vl_32b_instruct.json \
    model.hf_path="$MODEL" output_dir="$OUTPUT" "$@"
echo "[launch] slurm ${mode:-(submitting)}"
"$PY" -m spark_megatron.launch.cli launch --config "$RECIPE" --executor slurm $mode \
    --model-config configs/models/qwen2_5_vl_32b_instruct.json \
    launch.account="$ACCOUNT" launch.partition="$PARTITION" launch.container_image="$CONTAINER" \
    "launch.container_mounts=['$MOUNTS']" model.hf_path="$MODEL" "data.train_files=['$DATA']" output_dir="$OUTPUT" "$@"

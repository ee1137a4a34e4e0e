#!/usr/bin/env bash
# Export a SPARK run's newest complete checkpoint (or any Megatron checkpoint dir) to Hugging Face format, check
# it against the checkpoint, and answer with test-time self-reflection on vLLM. Then serve it with `vllm serve`.
#
#   bash examples/export_and_serve.sh runs/quickstart            # a run dir: uses checkpoints/latest
#   bash examples/export_and_serve.sh /ckpt/step_00000200 /models/spark-hf "--tp 2"
#
# Args: SOURCE (run dir or checkpoint dir), OUT (default SOURCE/hf), extra megatron_to_hf args (quoted).
# Env: PY (python, default .venv/bin/python), DATA (self-reflection prompts; default auto: synthetic:shapes for a
#      VL model, synthetic:arith?max=5 otherwise), LIMIT (prompts, default 32), ENGINE (auto | vllm | hf; auto =
#      vllm, or hf for a VL model without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:?usage: export_and_serve.sh RUN_OR_CHECKPOINT_DIR [OUT] [extra megatron_to_hf args]}
out=${2:-$src/hf}
extra=${3:-}
PY=${PY:-.venv/bin/python}
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_ENABLE_V1_MULTIPROCESSING=0 \
       VLLM_CPU_KVCACHE_SPACE=1 TORCHDYNAMO_DISABLE=1
ckpt=$src
if [ -f "$src/checkpoints/latest" ]; then            # a training run: its newest complete checkpoint
  ckpt=$src/checkpoints/$(cat "$src/checkpoints/latest")
elif [ -f "$src/latest" ]; then                      # a checkpoints/ dir
  ckpt=$src/$(cat "$src/latest")
fi
echo "[export] $ckpt -> $out"
# shellcheck disable=SC2086
"$PY" conversion/megatron_to_hf.py --megatron "$ckpt" --out "$out" --force $extra
echo "[verify] HF export vs Megatron checkpoint (logits and every layer's hidden state)"
"$PY" conversion/compare.py --hf "$out" --megatron "$ckpt"
echo "[infer] test-time self-reflection (engine ${ENGINE:-auto})"
"$PY" examples/self_reflection.py --hf "$out" --data "${DATA:-auto}" --limit "${LIMIT:-32}" \
    --engine "${ENGINE:-auto}" --max-tokens 64 --out "$out/self_reflection.jsonl"
cat <<MSG
[serve] the export is a plain HF checkpoint; on a GPU machine:
    vllm serve $out --served-model-name spark --dtype bfloat16
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "spark", "messages": [{"role": "user", "content": "What is 2+3? Put the answer in \\\\boxed{}."}]}'
MSG

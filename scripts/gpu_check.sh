#!/usr/bin/env bash
# The prepared GPU check (docs/gpu_check.md): one command, each step time-boxed, every step reported even when
# an earlier one failed; results in OUT/gpu_check.json (+ gpu_check.txt, gpu_check_logs.txt).
#
#   bash scripts/gpu_check.sh WHEEL_DIR [--out DIR]   accelerator machine / cluster node (CUDA GPU; no network)
#   bash scripts/gpu_check.sh --installed [--out DIR] a CUDA machine whose Python already has megatron-core
#   bash scripts/gpu_check.sh --dry-run [--out DIR]   CPU: wheel list vs imports, tiny benchmark, schema (CI)
#   ... --only a_gpu_tests,b_actor_7b                   run only these steps (a short rerun); install always runs
#
# WHEEL_DIR holds the wheels of scripts/gpu_wheels.txt (bash scripts/fetch_gpu_wheels.sh DIR); they are
# installed into a private --target directory, never into the machine's Python. OUT defaults to $OUT (the
# device tool's output folder), else ./gpu_check_out. PYTHON overrides the interpreter (default python3;
# the dry run prefers .venv/bin/python). Steps (time boxes in seconds, 530 in all, so the whole check ends
# within 9 minutes whatever happens):
#   install          pip install the carried wheels (--no-index --no-deps)                      30
#   d_imports        scripts/gpu_imports.py: every import of the GPU paths is provided             45
#   d_mcore_api      scripts/check_mcore_api.py against the installed megatron-core                20
#   a_gpu_tests      pytest -m gpu (CUDA parity vs HF, actor on GPU, weight sync vs memcpy)        120
#   b_actor_1.5b     bench/actor_step.py --model qwen2.5-1.5b (28 layers)                          100
#   b_actor_7b       bench/actor_step.py --model qwen2.5-7b --layers 8                             120
#   c_planner        scripts/gpu_report.py plan: `spark-megatron plan` vs the measured memory       20
#   d_mcore_cpu      conversion / reshard / actor tests at TP2 x PP2 on megatron-core 0.19 over      75
#                    gloo (GPU hidden: one GPU cannot host several NCCL ranks)
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
dry=0 wheels="" out="" installed=0 only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --installed) installed=1 ;;
    --out) out=$2; shift ;;
    --only) only=",$2,"; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) wheels=$1 ;;
  esac
  shift
done
if [ "$dry" = 0 ] && [ "$installed" = 0 ] && { [ -z "$wheels" ] || ! ls "$wheels"/*.whl >/dev/null 2>&1; }; then
  echo "error: WHEEL_DIR '${wheels}' holds no .whl files (bash scripts/fetch_gpu_wheels.sh DIR; or --dry-run)" >&2
  exit 2
fi
OUT_DIR=${out:-${OUT:-$REPO/gpu_check_out}}
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
PY=${PYTHON:-python3}
if [ "$dry" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# megatron's torch.compile'd helpers are off the local-spec path; compiling would only spend the time boxes
export TORCHDYNAMO_DISABLE=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$REPO
SITE=$WORK/site
echo "[gpu_check] work dir $WORK, results in $OUT_DIR, python $PY, $([ "$dry" = 1 ] && echo 'DRY RUN (CPU)')"

# step NAME SECONDS CMD...: run CMD with a time limit, log to WORK/NAME.log, append a line to WORK/steps.jsonl
step() {
  local name=$1 limit=$2; shift 2
  local t0 t1 rc
  if [ -n "$only" ] && [ "$name" != install ] && [[ "$only" != *",$name,"* ]]; then return 0; fi
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local timed_out=false
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then timed_out=true; fi
  printf '{"name": "%s", "rc": %d, "seconds": %s, "timed_out": %s, "log": "%s.log"}\n' \
    "$name" "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')" "$timed_out" "$name" >>"$WORK/steps.jsonl"
  echo "[gpu_check] $name: rc $rc$([ "$timed_out" = true ] && echo ' (TIMED OUT)') after $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f", b-a}') s; $(tail -n 1 "$WORK/$name.log" | cut -c1-160)"
  return 0
}

pytest_args=(-q -p no:cacheprovider --durations=10)
gpu_tests=(tests/gpu tests/distributed/test_actor_gpu.py tests/distributed/test_vl_parity.py)

if [ "$dry" = 1 ]; then
  step d_imports 120 "$PY" scripts/gpu_imports.py --json "$WORK/imports.json"
  mcore_src=()
  if ls .gpu_wheels/megatron_core-*.whl >/dev/null 2>&1; then mcore_src=(--mcore "$(ls .gpu_wheels/megatron_core-*.whl | tail -1)"); fi
  step d_mcore_api 60 "$PY" scripts/check_mcore_api.py "${mcore_src[@]}" --json "$WORK/mcore_api.json"
  # on CPU the gpu-marked tests must collect and skip cleanly
  step a_gpu_tests 120 "$PY" -m pytest "${pytest_args[@]}" -m gpu "${gpu_tests[@]}" --junitxml="$WORK/tests_gpu.xml"
  step b_actor_tiny 180 "$PY" bench/actor_step.py --tiny --warmup 1 --steps 1 --micro-batches 2 \
    --out "$WORK/actor_step_0_tiny.json"
  step c_planner 60 "$PY" scripts/gpu_report.py plan "$WORK"
else
  mcore_src=()
  if [ "$installed" = 0 ]; then
    step install 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$wheels"/*.whl
    export PYTHONPATH=$REPO:$SITE
    mcore_src=(--mcore "$SITE")
  fi
  step d_imports 45 "$PY" scripts/gpu_imports.py --json "$WORK/imports.json"
  step d_mcore_api 20 "$PY" scripts/check_mcore_api.py "${mcore_src[@]}" --json "$WORK/mcore_api.json"
  step a_gpu_tests 120 "$PY" -m pytest "${pytest_args[@]}" -m gpu "${gpu_tests[@]}" --junitxml="$WORK/tests_gpu.xml"
  step b_actor_1.5b 100 "$PY" bench/actor_step.py --model qwen2.5-1.5b --out "$WORK/actor_step_1_qwen2.5-1.5b.json"
  step b_actor_7b 120 "$PY" bench/actor_step.py --model qwen2.5-7b --layers 8 --out "$WORK/actor_step_2_qwen2.5-7b.json"
  step c_planner 20 "$PY" scripts/gpu_report.py plan "$WORK"
  # megatron-core 0.19 on this machine's Python 3.12 / torch through the multi-rank CPU (gloo) paths that CI
  # runs on 0.16; the most distinctive first, so a time-out cuts the least
  CUDA_VISIBLE_DEVICES="" step d_mcore_cpu 75 "$PY" -m pytest "${pytest_args[@]}" \
    tests/distributed/test_conversion.py::test_cli_round_trip_is_bit_exact_and_loadable_by_transformers \
    tests/distributed/test_weight_sync_reshard.py::test_tp2_reshard_is_bit_exact_and_within_one_bucket \
    tests/distributed/test_actor.py --junitxml="$WORK/tests_mcore.xml"
fi

args=(collect "$WORK" "$OUT_DIR")
[ "$dry" = 1 ] && args+=(--dry-run)
"$PY" scripts/gpu_report.py "${args[@]}"
rc=$?
ok=$("$PY" -c "import json,sys; print(int(json.load(open(sys.argv[1]))['ok']))" "$OUT_DIR/gpu_check.json" 2>/dev/null || echo 0)
echo "[gpu_check] results: $OUT_DIR/gpu_check.json, gpu_check.txt, gpu_check_logs.txt"
# everything is in OUT now (step logs in gpu_check_logs.txt); KEEP_WORK=1 keeps the raw step files
if [ -z "${KEEP_WORK:-}" ]; then rm -rf "$WORK"; else echo "[gpu_check] step files kept in $WORK"; fi
[ "$rc" = 0 ] && [ "$ok" = 1 ]

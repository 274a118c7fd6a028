#!/usr/bin/env bash
# The GPU rows of benchmarks/README.md ("GPU rows") in one call of under ten minutes:
#   1. train_speed.py --methods: the six methods' paper recipes (their own backbones, random weights)
#      at 384x128, batch 64, bf16: pairs/s, peak memory, counted GFLOP per step and achieved TFLOP/s;
#   2. the SynthPEDES comparison (compare_methods.py, each method's synth recipe and pretrained
#      encoders, 45 epochs) at the papers' 384x128 instead of 128x64, trained and scored on the GPU,
#      six runs at a time, seed 0 of every method first; runs still going at the deadline are dropped.
# Results land in $OUT (7 files): machine.txt, train_speed_cuda.jsonl and .log, compare.log, rows.tar
# (one jsonl per method and seed), runs.tar (each run's config.yaml, metrics.jsonl, command), extra.tar. Merge the rows with
#   python benchmarks/compare_methods.py merge rows/*.jsonl --results benchmarks/results/synth_e45_gpu384.jsonl
#
# usage (repo root, GPU machine): OUT=folder bash benchmarks/gpu_session.sh [total seconds, default 540]
# A machine without tbps' dependencies: `python benchmarks/gpu_carry.py pack` here, carry .device_carry.
# SMOKE=1 checks the script on a CPU in a few minutes (2 steps a run, one small speed row).
# METHODS="irra acsa", SEEDS="1 2" pick the comparison's runs; SPEED=0 skips step 1.
set -u
OUT=${OUT:-runs/gpu_session}
DEVICE=cuda; SPEED_ARGS=(--methods --amp bf16 --steps 8 --warmup 3); CHANGE=()
if [ -n "${SMOKE:-}" ]; then
  DEVICE=cpu; SPEED_ARGS=(--only textreid --amp off --batch-size 2 --steps 1 --warmup 0); CHANGE=(train.max_steps=2)
fi
TOTAL=${1:-540}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .device_carry ]; then
  python3 benchmarks/gpu_carry.py unpack /tmp/site > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import torch, torchvision, transformers, timm, open_clip; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__, \
'open_clip', open_clip.__version__)"; nproc; } 2>&1 | tee "$OUT/machine.txt"

if [ "${SPEED:-1}" != 0 ]; then
  echo "== 1. training speed at paper size ($(($(date +%s) - START)) s)"
  python3 benchmarks/train_speed.py "${SPEED_ARGS[@]}" --device $DEVICE --json "$OUT/train_speed_cuda.jsonl" 2>&1 \
    | tee "$OUT/train_speed.log"
fi

echo "== 2. SynthPEDES comparison at 384x128 on the GPU ($(($(date +%s) - START)) s)"
LEFT=$((TOTAL - ($(date +%s) - START) - 25))
RUNS=/tmp/compare_gpu
mkdir -p "$OUT/rows" "$RUNS"
# the same recipes and authors' overrides as the CPU rows (plan), 384x128 images, one file per seed
python3 benchmarks/compare_methods.py plan ${METHODS:-irra cffa acsa textreid pcc fcsa} 'data.image_size=[384,128]' \
  "${CHANGE[@]}" --device $DEVICE --slots 18 --runs "$RUNS" | grep -E '^python benchmarks/compare_methods.py run [a-z]+ ' > "$OUT/plan.txt"
for seed in ${SEEDS:-0 1 2}; do
  while read -r line; do
    name=$(echo "$line" | awk '{print $4}')
    echo "$line --seeds $seed --results $OUT/rows/${name}_s${seed}.jsonl"
  done < "$OUT/plan.txt"
done | sed 's/^python /python3 /' > "$OUT/commands.txt"
# generate the data once before the parallel runs (each run would wait on the lock otherwise)
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import compare_methods as c; \
from pathlib import Path; c.RUNS = Path('$RUNS'); print(c.ensure_data())" > "$OUT/data.log" 2>&1
md5sum "$RUNS/data/reid_raw.json" | tee -a "$OUT/data.log"
cat "$OUT/data.log"
timeout "$LEFT" xargs -P 6 -I{} -d '\n' bash -c '{} >> "$0/compare.log" 2>&1' "$OUT" < "$OUT/commands.txt"
echo "comparison stopped with rc $? after $(($(date +%s) - START)) s" | tee -a "$OUT/compare.log"
(cd "$RUNS" && find . -name config.yaml -o -name metrics.jsonl -o -name compare_record.json | \
  tar -cf "$OUT/runs.tar" -T -) 2>/dev/null
(cd "$OUT" && tar -cf rows.tar rows && rm -r rows && tar -cf extra.tar setup.log plan.txt commands.txt data.log \
  2>/dev/null; rm -f setup.log plan.txt commands.txt data.log)
grep -h '^\[' "$OUT/compare.log" | grep -E 'R1 ' || true
echo "== done in $(($(date +%s) - START)) s"

#!/usr/bin/env bash
# GPU training measurements, run by hand on a machine with an NVIDIA GPU (never by CI):
#
#   bench/gpu.sh TANDEM_BIN OUT_DIR [DATA_DIR] [STAGES]
#
# TANDEM_BIN is a build with `--features cuda`; DATA_DIR holds ml-100k.* (optional); STAGES is
# a comma list of: bench, torch, quality, epoch (default: all). Each stage appends JSON lines
# to OUT_DIR/gpu.jsonl and its log to OUT_DIR/gpu.log. QUALITY_DEVICES (default "cpu cuda")
# picks the devices the quality stage trains on; TORCH_MODES (default "eager compile") the
# PyTorch twin's modes.
set -uo pipefail
bin=$1
out=$2
data=${3:-}
stages=${4:-bench,torch,quality,epoch}
mkdir -p "$out"
log=$out/gpu.log
json=$out/gpu.jsonl
here=$(cd "$(dirname "$0")" && pwd)
torch_modes=${TORCH_MODES:-eager compile}
has() { [[ ",$stages," == *",$1,"* ]]; }
say() { echo "== $*" | tee -a "$log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"

# Runs a command while sampling the GPU memory in use every 200 ms; the peak goes to the log.
with_peak() {
  local samples sampler rc
  samples=$(mktemp)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$samples" 2>/dev/null &
  sampler=$!
  "$@"
  rc=$?
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  echo "peak GPU memory in use: $(sort -n "$samples" | tail -1) MiB" >>"$log"
  return $rc
}

# The bench shape of `tandem bench train` and the issue's large shapes: batch, items, users.
shapes=("1024 100000 20000" "4096 100000 20000" "8192 1000000 1000000")

if has bench; then
  for s in "${shapes[@]}"; do
    read -r b items users <<<"$s"
    say "tandem bench train --device cuda batch $b items $items users $users"
    with_peak "$bin" bench train --device cuda --steps 30 --batch-size "$b" --items "$items" \
      --users "$users" 2>>"$log" | tr -d '\n' >>"$json" && echo >>"$json"
  done
fi

if has torch; then
  for s in "${shapes[@]}"; do
    read -r b items users <<<"$s"
    for c in $torch_modes; do
      [ "$c" = eager ] && c=
      [ "$c" = compile ] && c=--compile
      say "torch_ref --device cuda $c batch $b items $items users $users"
      python3 "$here/torch_ref.py" --device cuda --steps 30 --batch-size "$b" \
        --items "$items" --users "$users" $c 2>>"$log" >>"$json"
    done
  done
fi

if has quality && [ -n "$data" ] && [ -f "$data/ml-100k.interactions.csv.gz" ]; then
  work=$(mktemp -d)
  "$bin" split --events "$data/ml-100k.interactions.csv.gz" --protocol user \
    --train-out "$work/train.csv" --test-out "$work/test.csv" >>"$log" 2>&1
  for dev in ${QUALITY_DEVICES:-cpu cuda}; do
    say "ml-100k train --device $dev"
    start=$(date +%s.%N)
    "$bin" train --events "$work/train.csv" --user-features "$data/ml-100k.users.csv.gz" \
      --item-features "$data/ml-100k.items.csv.gz" --out "$work/$dev" --device "$dev" \
      --json >"$work/$dev.json" 2>>"$log"
    secs=$(python3 -c "print($(date +%s.%N) - $start)")
    model=$(python3 -c "import json,sys; print(json.load(open('$work/$dev.json'))['dir'])")
    "$bin" eval --events "$data/ml-100k.interactions.csv.gz" --model "$model" --json \
      2>>"$log" | python3 -c "
import json, sys
d = json.load(sys.stdin)
r = d['results'][0]['metrics']
print(json.dumps({'quality': 'ml-100k', 'device': '$dev', 'train_seconds': $secs,
                  'recall@50': r['recall@50'], 'ndcg@10': r.get('ndcg@10')}))" >>"$json"
  done
fi

if has epoch; then
  work=$(mktemp -d)
  say "synth 10M events"
  "$bin" synth --out "$work/s" --users 500000 --items 1000000 --events 10000000 \
    >>"$log" 2>&1
  say "one epoch on 10M events, --device cuda, batch 8192"
  start=$(date +%s.%N)
  with_peak "$bin" train --events "$work/s/events.csv.gz" --out "$work/a" --protocol none --epochs 1 \
    --batch-size 8192 --device cuda --json >"$work/epoch.json" 2>>"$log"
  secs=$(python3 -c "print($(date +%s.%N) - $start)")
  python3 -c "
import json
d = json.load(open('$work/epoch.json'))
e = d['report']['epochs'][0] if 'report' in d else d['epochs'][0]
print(json.dumps({'epoch': '10M events', 'seconds_total': $secs, 'epoch_seconds': e['seconds'],
                  'examples_per_sec': e['examples_per_sec'], 'examples': d.get('report', d).get('examples')}))" \
    >>"$json" 2>>"$log"
fi

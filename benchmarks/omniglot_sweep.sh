#!/usr/bin/env bash
# Train many Omniglot configs side by side (one process each, one CPU thread each), each for
# BUDGET minutes of training, then test each on EPISODES fixed test episodes; made for a GPU machine
# with many cores, where the runs share the GPU. The MANN online run is also scored with the
# paper's online protocol. Tables: benchmarks/metric_results.py --collect --runs RUNS, and
# benchmarks/collect_results.py RUNS/*/results.json.
#
#   BUDGET=5 DEVICE=cuda RUNS=runs/sweep bash benchmarks/omniglot_sweep.sh            # the default 19 runs
#   BUDGET=5 DEVICE=cuda bash benchmarks/omniglot_sweep.sh protonet_omniglot_20w5s     # chosen configs
set -uo pipefail
BUDGET=${BUDGET:-5}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-runs/sweep}
EPISODES=${EPISODES:-1000}
PY=${PYTHON:-python}
if [ $# -gt 0 ]; then
  configs=("$@")
else
  configs=()
  for m in protonet matching relation; do for s in 5w1s 5w5s 20w1s 20w5s; do configs+=("${m}_omniglot_$s"); done; done
  for m in mann snail meta_lstm; do for s in 5w1s 5w5s; do configs+=("${m}_omniglot_$s"); done; done
  configs+=(mann_omniglot_online)
fi
mkdir -p "$RUNS"
# decode the Omniglot zips once, so that the parallel runs all find the cache
$PY -c "from metatl.data.omniglot import load_images; load_images()" || exit 1
start=$(date +%s)
for c in "${configs[@]}"; do
  $PY -m metatl.cli train "configs/$c.yaml" --out "$RUNS/$c" --no-progress --overwrite --set \
    train.time_budget_min="$BUDGET" train.device="$DEVICE" train.num_threads=1 train.val_every=0 \
    eval.episodes="$EPISODES" > "$RUNS/$c.log" 2>&1 &
done
wait
echo "all runs finished in $(( $(date +%s) - start )) s"
if [ -f "$RUNS/mann_omniglot_online/last.pt" ]; then
  $PY benchmarks/mann_online.py "$RUNS/mann_omniglot_online/last.pt" --episodes "$EPISODES" \
    --out "$RUNS/mann_online.json"
fi
for c in "${configs[@]}"; do
  if [ -f "$RUNS/$c/results.json" ]; then echo "$c: ok"; else echo "$c: FAILED"; tail -5 "$RUNS/$c.log"; fi
done

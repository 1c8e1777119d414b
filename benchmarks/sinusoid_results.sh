#!/usr/bin/env bash
# Sinusoid regression (MAML paper, sec. 5.1): MAML against the jointly pretrained baseline, K=5 and
# K=10, MSE after 1, 5 and 10 fine-tuning steps on 600 fixed test tasks.
#   bash benchmarks/sinusoid_results.sh [ITERATIONS]   (the paper trains 70,000 iterations)
set -euo pipefail
ITERS=${1:-70000}
OUT=${OUT:-runs/sinusoid}
for k in 5 10; do
  for cfg in maml_sinusoid pretrain_sinusoid; do
    metatl train configs/$cfg.yaml --out "$OUT/$cfg-K$k" --no-progress --overwrite \
      --set data.shots=$k data.train_queries=$k train.iterations=$ITERS train.val_every=0 train.num_threads=1
  done
done
python benchmarks/collect_results.py "$OUT"/*/results.json

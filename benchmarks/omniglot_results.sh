#!/usr/bin/env bash
# Omniglot 5-way 1-shot / 5-shot with MAML, first-order MAML and Reptile under a CPU budget:
# each run trains for BUDGET minutes on one thread (two runs side by side on a 2-core machine),
# then is scored on the 600 fixed test episodes (15 queries per class).
#   BUDGET=8 bash benchmarks/omniglot_results.sh
set -euo pipefail
BUDGET=${BUDGET:-8}
OUT=${OUT:-runs/omniglot}
run() {  # name config [overrides...]
  local name=$1 cfg=$2; shift 2
  metatl train "configs/$cfg.yaml" --out "$OUT/$name" --no-progress --overwrite \
    --set train.time_budget_min=$BUDGET train.num_threads=1 train.val_every=0 "$@" > "$OUT/$name.log" 2>&1
}
mkdir -p "$OUT"
run fomaml_5w1s fomaml_omniglot_5w1s algorithm.batch_tasks=true & run maml_5w5s maml_omniglot_5w5s & wait
run fomaml_5w5s fomaml_omniglot_5w5s & run reptile_5w1s reptile_omniglot_5w1s & wait
run reptile_5w5s reptile_omniglot_5w5s & wait
# Reptile's non-transductive number: each query normalised with the support set only
metatl eval "$OUT/reptile_5w1s/last.pt" --out "$OUT/reptile_5w1s_nontransductive" --no-progress --set eval.transductive=false
python benchmarks/collect_results.py "$OUT"/*/results.json

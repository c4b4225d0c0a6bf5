#!/usr/bin/env bash
# The README's methods table: digits, MLP 64-1024-1024-10, 90% sparsity (ERK), 30 epochs,
# 5 seeds each. RigL, RigL + Sup-tickets, EDST ensemble, DST ensemble and dense, all from
# the training command; sparsekern.report gathers them (mean ± std over seeds).
#   bash scripts/methods_table.sh            # ~2.5 min on 2 cores; writes benchmarks/results/methods_digits.md
# Extra arguments go to every training command (later flags win), and TABLE names the output:
#   TABLE=benchmarks/results/methods_cifar10.md bash scripts/methods_table.sh \
#       --dataset cifar10 --data-dir DIR --model resnet20 --epochs 160
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/methods}"
# --update-every 100: the table's setting (the command's default now adapts to the run's length)
COMMON=(--dataset digits --model mlp --width 1024 --density 0.1 --epochs 30 --update-every 100 --quiet --no-plots "$@")
TABLE="${TABLE:-benchmarks/results/methods_digits.md}"
for seed in 0 1 2 3 4; do
  python3 -m sparsekern.train --method rigl "${COMMON[@]}" --seed $seed --baseline run --out $OUT/rigl_$seed
  python3 -m sparsekern.train --method suptickets --cycle-fraction 0.1 --cycle-length 1 --superpose caa \
    "${COMMON[@]}" --seed $seed --baseline skip --out $OUT/suptickets_$seed
  python3 -m sparsekern.train --method edst --tickets 3 --exploration-fraction 0.5 --refine-drop 0.8 \
    "${COMMON[@]}" --seed $seed --baseline skip --out $OUT/edst_$seed
  python3 -m sparsekern.train --method ensemble --tickets 3 "${COMMON[@]}" --seed $seed --baseline skip \
    --out $OUT/ensemble_$seed
done > /dev/null
mkdir -p benchmarks/results
{
  echo "Training options: ${COMMON[*]} (defaults: SGD Nesterov lr 0.05, batch 64, ERK); 5 seeds;"
  echo "torch $(python3 -c 'import torch; print(torch.__version__)'), $(date -u +%Y-%m-%d)."
  echo "Produced by \`bash scripts/methods_table.sh $*\`."
  echo
  python3 -m sparsekern.report $OUT/rigl_* $OUT/suptickets_* $OUT/edst_* $OUT/ensemble_*
} > "$TABLE"
cat "$TABLE"

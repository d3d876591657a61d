#!/bin/bash
# Where the KL goes and how it is estimated (docs/pitfalls.md, row 4): the default run with OAI's k1 in the reward,
# k2 as a loss term and GRPO's k3 as a loss term, 3 seeds each, one run at a time. The adaptive controller holds each
# near the same KL (target 4), so the gold scores compare at matched KL. Then:
#   python benchmark/plot.py runs/benchmark/kl_k1_reward__<commit> runs/benchmark/kl_k2_loss__<commit> \
#       runs/benchmark/kl_k3_loss__<commit> --seeds 1 2 3 --out docs/images/kl_estimators.png
set -euo pipefail
cd "$(dirname "$0")/.."
for arm in "k1 reward" "k2 loss" "k3 loss"; do
    set -- $arm
    python benchmark/benchmark.py --command "python train_both.py --policy.kl_estimator $1 --policy.kl_in $2" \
        --seeds 1 2 3 --tag "kl_$1_$2"
done

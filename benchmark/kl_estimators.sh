#!/bin/bash
# Where the KL goes and how it is estimated (docs/pitfalls.md, row 4): the default PPO run against one reward model
# with OAI's k1 in the reward, k2 as a loss term and GRPO's k3 as a loss term, 3 seeds each, one run at a time. The
# adaptive controller holds each near the same KL (target 4 nats), so their gold scores compare at matched KL.
#   bash benchmark/kl_estimators.sh runs/<a train_both.py run>/reward/reward_model
#   python benchmark/plot.py runs/benchmark/kl_k1_reward__<commit> runs/benchmark/kl_k2_loss__<commit> \
#       runs/benchmark/kl_k3_loss__<commit> --out docs/images/kl_estimators.png
set -euo pipefail
cd "$(dirname "$0")/.."
reward_model=${1:?give a reward model folder, e.g. runs/<a train_both.py run>/reward/reward_model}
for arm in "k1 reward" "k2 loss" "k3 loss"; do
    set -- $arm
    python benchmark/benchmark.py --seeds 1 2 3 --tag "kl_$1_$2" \
        --command "python train_policy.py --reward_model $reward_model --kl_estimator $1 --kl_in $2"
done

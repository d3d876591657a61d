#!/bin/bash
# Where the KL goes and how it is estimated (docs/pitfalls.md, row 4): the default PPO run against one reward model
# with OAI's k1 in the reward, k2 as a loss term and GRPO's k3 as a loss term, 3 seeds each, one run at a time.
# First under the adaptive controller (target 4 nats) with its default coefficient; the loss terms then hold the KL far
# lower (about 0.8 nats), so a second pair runs them with a fixed, smaller coefficient (0.005) to reach the KL the
# reward term reaches. Gold at matched KL is read along each run's (KL, gold) path (benchmark/kl_matched.py).
#   bash benchmark/kl_estimators.sh runs/<a train_both.py run>/reward/reward_model
#   python benchmark/kl_matched.py runs/benchmark/kl_*__<commit> --out docs/images/kl_estimators.png
set -euo pipefail
cd "$(dirname "$0")/.."
reward_model=${1:?give a reward model folder, e.g. runs/<a train_both.py run>/reward/reward_model}
for arm in "k1 reward" "k2 loss" "k3 loss"; do
    set -- $arm
    python benchmark/benchmark.py --seeds 1 2 3 --tag "kl_$1_$2" \
        --command "python train_policy.py --reward_model $reward_model --kl_estimator $1 --kl_in $2"
done
for estimator in k2 k3; do
    python benchmark/benchmark.py --seeds 1 2 3 --tag "kl_${estimator}_loss_fixed0.005" \
        --command "python train_policy.py --reward_model $reward_model --kl_estimator $estimator --kl_in loss \
--no_adaptive_kl --kl_coef 0.005"
done

#!/bin/bash
# Reward over-optimization (Gao, Schulman & Hilton 2022) on the embedded sentiment world, 3 seeds, one job at a time on a
# 2-core machine (about an hour): per seed a reward model (train_reward.py's default), best-of-n with it (n = 1 ... 256),
# PPO with three KL settings (adaptive KL target 2 and 8 nats, and no KL penalty), DPO with three betas (0.1, 0.3, 1); then the plot,
# the fits and the table (benchmark/overoptimization.png, .md, .json). OUT= picks another folder for the runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/overoptimization}
for SEED in 1 2 3; do
    python train_reward.py --seed $SEED --run_root $OUT/reward
    RM=$(ls -d $OUT/reward/reward__${SEED}__*/reward_model | tail -n 1)
    python benchmark/best_of_n.py --reward_model $RM --seed $SEED --out $OUT/bon_$SEED.json
    python train_policy.py --reward_model $RM --seed $SEED --kl_target 2 --exp_name ppo_kl2 --run_root $OUT/ppo
    python train_policy.py --reward_model $RM --seed $SEED --kl_target 8 --exp_name ppo_kl8 --run_root $OUT/ppo
    python train_policy.py --reward_model $RM --seed $SEED --kl_coef 0 --no_adaptive_kl --exp_name ppo_nokl --run_root $OUT/ppo
    for BETA in 0.1 0.3 1.0; do
        python train_dpo.py --reward_model $RM --seed $SEED --beta $BETA --num_train 2048 --eval_every 8 --exp_name dpo_beta$BETA --run_root $OUT/dpo
    done
done
python benchmark/overoptimization.py --root $OUT --out benchmark/overoptimization.png

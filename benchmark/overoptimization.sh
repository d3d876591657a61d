#!/bin/bash
# Reward over-optimization (Gao, Schulman & Hilton 2022) on the embedded sentiment world, 3 seeds, one job at a time on a
# 2-core machine (69 minutes measured): per seed a reward model (train_reward.py's default), best-of-n with it (n = 1 ... 256),
# PPO with three KL settings (adaptive KL target 2 and 8 nats, and no KL penalty), DPO with three betas (0.1, 0.3, 1);
# then the plot, the fits and the table (benchmark/overoptimization.png, .md, .json). OUT= picks another folder for the
# runs. Run it again after a stop: finished runs (those with a summary.json) are kept, not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/overoptimization}
finished() { ls -d $1__$2__*/summary.json 2>/dev/null | head -n 1; }
for SEED in 1 2 3; do
    [ -n "$(finished $OUT/reward/reward $SEED)" ] || python train_reward.py --seed $SEED --run_root $OUT/reward
    RM=$(dirname "$(finished $OUT/reward/reward $SEED)")/reward_model
    [ -f $OUT/bon_$SEED.json ] || python benchmark/best_of_n.py --reward_model $RM --seed $SEED --out $OUT/bon_$SEED.json
    for SETTING in "kl2 --kl_target 2" "kl8 --kl_target 8" "nokl --kl_coef 0 --no_adaptive_kl"; do
        set -- $SETTING
        [ -n "$(finished $OUT/ppo/ppo_$1 $SEED)" ] || python train_policy.py --reward_model $RM --seed $SEED "${@:2}" --exp_name ppo_$1 --run_root $OUT/ppo
    done
    for BETA in 0.1 0.3 1.0; do
        [ -n "$(finished $OUT/dpo/dpo_beta$BETA $SEED)" ] || python train_dpo.py --reward_model $RM --seed $SEED --beta $BETA \
            --eval_every 12 --num_test 128 --exp_name dpo_beta$BETA --run_root $OUT/dpo
    done
done
python benchmark/overoptimization.py --root $OUT --out benchmark/overoptimization.png

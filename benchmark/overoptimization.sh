#!/bin/bash
# Reward over-optimization (Gao, Schulman & Hilton 2022) on the embedded sentiment world, 3 seeds, one job at a time on a
# 2-core machine. Per seed: a reward model (train_reward.py's default, 2,048 labels), best-of-n with it (n = 1 ... 256),
# PPO with three KL settings (adaptive KL target 2 and 8 nats, and no KL penalty), DPO with three betas (0.1, 0.3, 1),
# and the critic-free methods of train_rloo.py (RLOO, GRPO, online best-of-n; beta 0.05). Then the turn-down study:
# reward models on 256, 512 and 1,024 labels beside the 2,048, each optimized by PPO without a KL penalty for twice the
# default episodes. Last, the plots, the fits and the tables (docs/images/overoptimization.{png,md,json} and
# docs/images/turn_down.{png,md,json}).
#   bash benchmark/overoptimization.sh                    # everything (about 2.35 hours on two cores, see docs/overoptimization.md)
#   PARTS="rloo labels" bash benchmark/overoptimization.sh  # only some parts (of: bon ppo dpo rloo labels)
# OUT= picks another folder for the runs. Run it again after a stop: finished runs (those with a summary.json) are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/overoptimization}
PARTS=${PARTS:-"bon ppo dpo rloo labels"}
has() { [[ " $PARTS " == *" $1 "* ]]; }
finished() { ls -d $1__$2__*/summary.json 2>/dev/null | head -n 1; }
for SEED in 1 2 3; do
    [ -n "$(finished $OUT/reward/reward $SEED)" ] || python train_reward.py --seed $SEED --run_root $OUT/reward
    RM=$(dirname "$(finished $OUT/reward/reward $SEED)")/reward_model
    # best-of-n also gives the initial policy's scores (n = 1) that every method is measured from: always run
    [ -f $OUT/bon_$SEED.json ] || python benchmark/best_of_n.py --reward_model $RM --seed $SEED --out $OUT/bon_$SEED.json
    if has ppo; then
        for SETTING in "kl2 --kl_target 2" "kl8 --kl_target 8" "nokl --kl_coef 0 --no_adaptive_kl"; do
            set -- $SETTING
            [ -n "$(finished $OUT/ppo/ppo_$1 $SEED)" ] || python train_policy.py --reward_model $RM --seed $SEED "${@:2}" --exp_name ppo_$1 --run_root $OUT/ppo
        done
    fi
    if has dpo; then
        for BETA in 0.1 0.3 1.0; do
            [ -n "$(finished $OUT/dpo/dpo_beta$BETA $SEED)" ] || python train_dpo.py --reward_model $RM --seed $SEED --beta $BETA \
                --eval_every 12 --num_test 128 --exp_name dpo_beta$BETA --run_root $OUT/dpo
        done
    fi
    if has rloo; then
        for ADV in rloo grpo best_of_n; do
            [ -n "$(finished $OUT/rloo/$ADV $SEED)" ] || python train_rloo.py --reward_model $RM --seed $SEED --advantage $ADV \
                --exp_name $ADV --run_root $OUT/rloo
        done
    fi
done
if has labels; then
    for SEED in 1 2 3; do
        for N in 256 512 1024 2048; do
            if [ $N = 2048 ]; then  # the default reward model above
                RM=$(dirname "$(finished $OUT/reward/reward $SEED)")/reward_model
            else
                [ -n "$(finished $OUT/labels/reward_$N $SEED)" ] || python train_reward.py --seed $SEED --num_train $N \
                    --exp_name reward_$N --run_root $OUT/labels
                RM=$(dirname "$(finished $OUT/labels/reward_$N $SEED)")/reward_model
            fi
            [ -n "$(finished $OUT/labels/ppo_nokl_$N $SEED)" ] || python train_policy.py --reward_model $RM --seed $SEED \
                --kl_coef 0 --no_adaptive_kl --total_episodes 5120 --exp_name ppo_nokl_$N --run_root $OUT/labels
        done
    done
    python benchmark/turn_down.py --root $OUT --out docs/images/turn_down.png
fi
python benchmark/overoptimization.py --root $OUT --out docs/images/overoptimization.png

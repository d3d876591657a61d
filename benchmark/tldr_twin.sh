#!/bin/bash
# The summarization twin, three seeds, one after the other: SFT, then reward model and PPO (train_both.py), each seed
# from its own SFT model; then the policies compared on the same held-out posts (benchmark/evaluate.py).
#   bash benchmark/tldr_twin.sh [seeds...]        # default: 1 2 3; runs go to runs/tldr_twin_sweep/
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${*:-1 2 3}
OUT=runs/tldr_twin_sweep
for SEED in $SEEDS; do
    SFT=$OUT/sft_model_$SEED
    /usr/bin/time -f "sft seed $SEED: %e s" python train_sft.py tldr_twin --seed $SEED --output_dir $SFT --run_root $OUT/sft
    /usr/bin/time -f "reward+ppo seed $SEED: %e s" python train_both.py tldr_twin --seed $SEED --run_root $OUT \
        --reward.base_model $SFT --policy.base_model $SFT
done

#!/bin/bash
# The summarization twin over seeds, one job at a time on a 2-core machine, with docs/summarization.md's commands: per
# seed the SFT model (train_sft.py tldr_twin), the reward model and PPO (train_both.py tldr_twin), best-of-8 by that
# reward model on held-out posts (benchmark/best_of_n.py), and DPO on the same comparisons from the same SFT model
# (train_dpo.py tldr_twin); then the table and the plot of the held-out judge and ROUGE-L against updates
# (benchmark/tldr_twin.py).
#   bash benchmark/tldr_twin.sh [seeds...]        # default: 1 2 3; runs go to runs/tldr_twin_sweep/ (OUT= picks another)
# Run it again after a stop: finished runs (those with a summary.json) are kept, not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${*:-1 2 3}
OUT=${OUT:-runs/tldr_twin_sweep}
finished() { ls -d $1__$2__*/summary.json 2>/dev/null | head -n 1; }
for SEED in $SEEDS; do
    SFT=$OUT/sft_model_$SEED
    [ -n "$(finished $OUT/sft/sft_tldr_twin $SEED)" ] || python train_sft.py tldr_twin --seed $SEED --output_dir $SFT --run_root $OUT/sft
    [ -n "$(finished $OUT/tldr_twin $SEED)" ] || python train_both.py tldr_twin --seed $SEED --run_root $OUT \
        --reward.base_model $SFT --policy.base_model $SFT
    RM=$(dirname "$(finished $OUT/tldr_twin $SEED)")/reward/reward_model
    [ -f $OUT/best_of_8_$SEED.json ] || python benchmark/best_of_n.py --reward_model $RM --base_model $SFT \
        --query_dataset data/tldr/validation.jsonl.gz --query_length 160 --response_length 48 --truncate_token eos \
        --gold_labeler tldr_judge --num_queries 256 --max_n 8 --batch_size 128 --seed $SEED --out $OUT/best_of_8_$SEED.json
    [ -n "$(finished $OUT/dpo/dpo $SEED)" ] || python train_dpo.py tldr_twin --seed $SEED --base_model $SFT --run_root $OUT/dpo
done
python benchmark/tldr_twin.py --root $OUT --out docs/images/tldr_twin.png

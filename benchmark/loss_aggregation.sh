#!/bin/bash
# GRPO's loss aggregation on the summarization twin, where EOS makes response lengths vary (docs/pitfalls.md, row 5):
# token (DAPO: the mean over the minibatch's valid tokens), sequence (GRPO: each response's mean, then the mean),
# constant (Dr. GRPO: each response's sum over response_length), 3 seeds each, one run at a time; then compare
# objective/response_length over updates. Needs the twin's SFT model (python train_sft.py tldr_twin) and a twin
# reward model:
#   bash benchmark/loss_aggregation.sh runs/tldr_twin__<seed>__<time>/reward/reward_model
#   python benchmark/plot.py runs/benchmark/aggregation_token__<commit> runs/benchmark/aggregation_sequence__<commit> \
#       runs/benchmark/aggregation_constant__<commit> --out docs/images/loss_aggregation.png \
#       --metrics objective/response_length objective/gold_score objective/kl
set -euo pipefail
cd "$(dirname "$0")/.."
reward_model=${1:?give a twin reward model folder, e.g. runs/tldr_twin__1__<time>/reward/reward_model}
for aggregation in token sequence constant; do
    python benchmark/benchmark.py --seeds 1 2 3 --tag "aggregation_$aggregation" \
        --command "python train_rloo.py tldr_twin --advantage grpo --loss_aggregation $aggregation --reward_model $reward_model"
done

#!/bin/bash
# Truncated importance sampling under bf16 (docs/pitfalls.md, row 3): the default PPO run against one reward model,
# sampler and trainer in bf16 autocast on the CPU, without and with --tis_cap 2, 3 seeds each, one run at a time. The
# adaptive controller holds both near the same KL (target 4 nats), so their gold scores compare at matched KL.
#   bash benchmark/tis.sh runs/<a train_both.py run>/reward/reward_model
#   python benchmark/plot.py runs/benchmark/bf16_no_tis__<commit> runs/benchmark/bf16_tis2__<commit> \
#       --out docs/images/tis_bf16.png
set -euo pipefail
cd "$(dirname "$0")/.."
reward_model=${1:?give a reward model folder, e.g. runs/<a train_both.py run>/reward/reward_model}
python benchmark/benchmark.py --seeds 1 2 3 --tag bf16_no_tis \
    --command "python train_policy.py --reward_model $reward_model --mixed_precision bf16"
python benchmark/benchmark.py --seeds 1 2 3 --tag bf16_tis2 \
    --command "python train_policy.py --reward_model $reward_model --mixed_precision bf16 --tis_cap 2"

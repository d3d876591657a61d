#!/bin/bash
# TF-style Adam (the default, detail 16) vs PyTorch's Adam in both stages, 3 seeds each. The TF-style arm is seeds
# 1-3 of benchmark/sweep_default.sh (the same command); run that first. Then:
#   python benchmark/plot.py runs/benchmark/default__<commit> runs/benchmark/adam_pytorch__<commit> --seeds 1 2 3 --out docs/images/adam_ablation.png
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmark/benchmark.py --command "python train_both.py --reward.optimizer adam_pytorch --policy.optimizer adam_pytorch" \
    --seeds 1 2 3 --tag adam_pytorch

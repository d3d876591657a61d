#!/bin/bash
# RL with verifiable rewards (docs/verifiable.md): for each seed, train_sft.py's arithmetic model, then from it GRPO,
# Dr. GRPO and RLOO (train_rloo.py's arithmetic preset, --advantage changed only) and PPO (train_policy.py's) against the
# verifier, and pass@k for k = 1 ... 64 of the SFT model and the four policies on 128 test problems
# (benchmark/pass_at_k.py). One run at a time; each run's metrics.jsonl holds eval/pass@1 over updates, the
# zero-gradient share and the mean response length.
#   bash benchmark/verifiable.sh 1 2 3
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/benchmark/verifiable__$(git rev-parse --short HEAD)
for seed in "${@:-1}"; do
    root=$out/seed$seed
    python train_sft.py arithmetic --seed "$seed" --run_root "$root" --output_dir "$root/sft_model"
    for method in grpo dr_grpo rloo; do
        python train_rloo.py arithmetic --advantage "$method" --exp_name "$method" --base_model "$root/sft_model" \
            --seed "$seed" --run_root "$root"
    done
    python train_policy.py arithmetic --exp_name ppo --base_model "$root/sft_model" --seed "$seed" --run_root "$root"
    python benchmark/pass_at_k.py "$root/sft_model" "$root"/grpo__*/policy "$root"/dr_grpo__*/policy \
        "$root"/rloo__*/policy "$root"/ppo__*/policy --labels sft grpo dr_grpo rloo ppo --out "$root/pass_at_k.json"
done

#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --array={array}
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-gpu=10
#SBATCH --output={log_dir}/slurm-%A_%a.out
# One seed per array task on one 8-GPU node; seeds: {seeds}
set -euo pipefail
cd "$SLURM_SUBMIT_DIR"
. .venv/bin/activate
{command}

#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --array={array}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-gpu=10
#SBATCH --output={log_dir}/slurm-%A_%a.out
# One seed per array task on {nodes} 8-GPU node(s); seeds: {seeds}
# srun starts the command once per node. On several nodes benchmark.py has put accelerate's multi-node flags into it:
# this node's rank ($SLURM_NODEID), the first node's address ($MAIN_IP) and a c10d rendezvous there. The run folder must
# be on a filesystem every node sees (each process writes its own shard of a DeepSpeed checkpoint).
set -euo pipefail
cd "$SLURM_SUBMIT_DIR"
. .venv/bin/activate
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_IP
srun --nodes={nodes} --ntasks-per-node=1 bash -c '{command}'

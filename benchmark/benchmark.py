"""Run one training command over several seeds: locally with a small worker pool, or as a slurm array.

    python benchmark/benchmark.py --command "python train_both.py" --seeds 1 2 3 4 5 --tag default
    python benchmark/benchmark.py --command "accelerate launch --num_processes 8 train_both.py sentiment" \\
        --seeds 1 2 3 --tag sentiment --slurm                         # writes (and prints) a slurm array script

Every seed appends `--seed N --run_root <run_root>/<tag>__<commit>` to the command, so each run gets its own run
folder under a folder named after the tag and the git commit; `<that folder>/benchmark.jsonl` records, per seed,
the exact command, exit status, wall time and log file. benchmark/plot.py reads those folders.
"""

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import tyro

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    command: str = "python train_both.py"
    """training command; `--seed N --run_root ...` are appended to it"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """one run per seed"""
    tag: str = "default"
    """name of this group of runs (plot.py groups by it)"""
    run_root: str = "runs/benchmark"
    """the runs go to <run_root>/<tag>__<short commit>/"""
    workers: int = 1
    """local runs at once (two CPU-heavy runs on a 2-core machine slow each other ~2x: keep 1 there)"""
    slurm: bool = False
    """write a slurm array script (one seed per array task) instead of running locally"""
    slurm_template: str = "benchmark/slurm_template.sh"
    """template with {job_name}, {array}, {nodes}, {command}, {seeds} and {log_dir} placeholders"""
    nodes: int = 1
    """with --slurm: machines per run; above 1 the command must be `accelerate launch --config_file
    configs/multinode_zero3.yaml --num_processes <8 x nodes> ...`, to which each node's rank and the first node's
    address are added"""


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return (out.stdout.strip() or "nogit") + ("-dirty" if dirty else "")


def seed_command(command: str, seed: int, group_dir: Path) -> str:
    return f"{command} --seed {seed} --run_root {shlex.quote(str(group_dir))}"


def run_local(args: Args, group_dir: Path):
    def one(seed: int) -> dict:
        cmd = seed_command(args.command, seed, group_dir)
        log = group_dir / f"seed{seed}.log"
        start = time.time()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, shell=True, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
        row = {"seed": seed, "command": cmd, "returncode": rc, "wall_s": round(time.time() - start, 1), "log": str(log)}
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(args.workers) as pool:
        rows = list(pool.map(one, args.seeds))
    with open(group_dir / "benchmark.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


def write_slurm(args: Args, group_dir: Path) -> Path:
    template = (ROOT / args.slurm_template).read_text()
    seeds = " ".join(map(str, args.seeds))
    run = seed_command(args.command, 0, group_dir).replace("--seed 0", "--seed $SEED")
    if args.nodes > 1:  # accelerate's multi-node launch: one launcher per node, a c10d rendezvous at the first node
        run = run.replace("accelerate launch ",
                          "accelerate launch --num_machines $SLURM_NNODES --machine_rank $SLURM_NODEID "
                          "--main_process_ip $MAIN_IP --main_process_port 29500 --rdzv_backend c10d ", 1)
    command = f"SEEDS=({seeds}); SEED=${{SEEDS[$SLURM_ARRAY_TASK_ID]}}; {run}"
    script = template.format(job_name=args.tag, array=f"0-{len(args.seeds) - 1}", nodes=args.nodes, command=command,
                             seeds=seeds, log_dir=group_dir)
    path = group_dir / f"{args.tag}.slurm"
    path.write_text(script)
    print(script)
    print(f"written to {path}; submit with: sbatch {path}")
    return path


def main(args: Args) -> int:
    if not args.seeds:
        print("error: --seeds is empty", file=sys.stderr)
        return 2
    if args.nodes > 1 and not (args.slurm and args.command.startswith("accelerate launch ")):
        print("error: --nodes above 1 writes a slurm script (--slurm) for a command that starts with `accelerate "
              "launch`", file=sys.stderr)
        return 2
    group_dir = (ROOT / args.run_root / f"{args.tag}__{git_commit()}").resolve()
    group_dir.mkdir(parents=True, exist_ok=True)
    if args.slurm:
        write_slurm(args, group_dir)
        return 0
    print(f"{len(args.seeds)} run(s) of `{args.command}` into {group_dir}, {args.workers} at a time", flush=True)
    return run_local(args, group_dir)


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main(tyro.cli(Args, description=__doc__, use_underscores=True)))

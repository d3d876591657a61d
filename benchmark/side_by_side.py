"""Our train_policy.py and TRL's PPOTrainer, side by side on one setup, alternating runs so that both see the
same machine state. Reports episodes/s, peak memory and the gold score (VADER) reached at equal episodes.

    python3 -m venv benchmark/.trl-venv && benchmark/.trl-venv/bin/pip install -r benchmark/trl-requirements.txt
    python benchmark/side_by_side.py --reward_model runs/<both run>/reward/reward_model --episodes 2560 --seeds 1 2 3

Same for both: the nano base, that reward model, the same training queries (one per episode), batch 64 as
--nminibatches minibatches, 4 epochs, response 24, temperature 0.7, lr 5e-5 annealed linearly, a fixed KL coefficient
0.15 (TRL has no adaptive controller), no truncation. Episodes/s counts training time only (model loading excluded)
for both. The gold score of each final policy is measured the same way: 256 held-out queries, one sample each at
temperature 0.7.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_policy as tp  # noqa: E402


@dataclass
class Args:
    reward_model: str
    """our reward model folder (train_reward.py's reward_model/)"""
    episodes: int = 2560
    """episodes per run, each with its own query (at most 3,027: the corpus yields 3,283 queries, 256 are held out)"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """one round per seed: ours, then TRL, both with this seed and this seed's queries"""
    nminibatches: int = 2
    """minibatches of the batch of 64"""
    trl_python: str = "benchmark/.trl-venv/bin/python"
    """python of the virtual environment with trl 1.12.0"""
    out: str = "runs/side_by_side"
    """folder for the runs and result.json"""
    ours_flags: str = ""
    """more flags for our train_policy.py, to align one setting with TRL's (e.g. "--value_model reward")"""
    systems: List[str] = field(default_factory=lambda: ["ours", "trl"])
    """which of the two to run (ours alone measures an aligned setting against an earlier TRL result)"""


def run(cmd: list, log: Path) -> dict:
    """Run a child to its end; its peak resident memory is the largest VmHWM (the resident high-water mark of the
    program it runs) read from /proc/<pid>/status every 0.1 s. Not wait4's ru_maxrss: Linux carries the forking parent's
    high-water mark into the child across exec, so a child smaller than this script reported this script's peak."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"})
        peak_kb = 0
        while proc.poll() is None:
            status = Path(f"/proc/{proc.pid}/status")
            lines = status.read_text().splitlines() if status.exists() else []  # gone once the child is reaped
            # none in a zombie
            peak_kb = max([peak_kb] + [int(line.split()[1]) for line in lines if line.startswith("VmHWM:")])
            time.sleep(0.1)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, cmd[:4]))} failed, see {log}")
    return {"peak_rss_gb": peak_kb / 1e6}


@torch.no_grad()
def gold(policy_dir: str, queries: torch.Tensor) -> float:
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    torch.manual_seed(12345)
    responses = tp.Sampler(model, tokenizer.pad_token_id, 0.7)(queries, 24)[0]
    return statistics.mean(tp.gold_scorer("vader")(tokenizer.batch_decode(responses), None))


def main(a: Args):
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "nano")
    texts = tp.load_texts(str(ROOT / "data" / "corpus.jsonl.gz"), "train")
    results = []
    for r, seed in enumerate(a.seeds):
        # our train_policy.py --seed s draws its queries in this order: the first `episodes` of them are its training
        # queries and TRL gets exactly these; the 256 after them (same pass over the corpus) are held out for gold
        batches = tp.query_batches(texts, tokenizer, 32, 24, a.episodes, seed=seed)
        train_queries, heldout = next(batches)[0], next(batches)[0][:256]
        queries_file = out / f"queries_{seed}.json"
        queries_file.write_text(json.dumps(train_queries.tolist()))
        ours_dir, trl_dir = out / f"ours_{r}", out / f"trl_{r}"
        for d in (ours_dir, trl_dir):  # this script's own outputs of an earlier measurement
            shutil.rmtree(d, ignore_errors=True)
        if "ours" in a.systems:
            results.append(run_ours(a, seed, r, ours_dir, out, heldout))
            print(json.dumps(results[-1]), flush=True)
        if "trl" in a.systems:
            results.append(run_trl(a, seed, r, queries_file, trl_dir, out, heldout))
            print(json.dumps(results[-1]), flush=True)
    summary = {}
    for system in a.systems:
        rows = [x for x in results if x["system"] == system]
        summary[system] = {k: statistics.mean(x[k] for x in rows) for k in ("episodes_per_s", "train_s", "peak_rss_gb",
                                                                            "gold")}
        summary[system]["gold_std"] = statistics.stdev(x["gold"] for x in rows) if len(rows) > 1 else 0.0
    if len(a.systems) == 2:
        summary["ratio_ours_over_trl"] = {k: summary["ours"][k] / summary["trl"][k] for k in ("episodes_per_s",
                                                                                              "peak_rss_gb")}
    (out / "result.json").write_text(json.dumps({"ours_flags": a.ours_flags, "runs": results, "summary": summary},
                                                indent=2))
    print(json.dumps(summary, indent=2))


def run_ours(a: Args, seed: int, r: int, ours_dir: Path, out: Path, heldout: torch.Tensor) -> dict:
    """One run of our train_policy.py on the side-by-side setup; its training time from the logged timing/* keys."""
    res = run([sys.executable, "train_policy.py", "--reward_model", a.reward_model, "--total_episodes", str(a.episodes),
               "--seed", str(seed), "--no_adaptive_kl", "--kl_coef", "0.15", "--nminibatches", str(a.nminibatches),
               "--local_micro_batch_size", str(64 // a.nminibatches), "--run_root", str(ours_dir),
               "--print_sample_every", "100000", *a.ours_flags.split()], out / f"ours_{r}.log")
    (run_dir,) = [p for p in ours_dir.iterdir() if p.is_dir()]
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train_s = sum(m["timing/generation_s"] + m["timing/scoring_s"] + m["timing/update_s"] for m in metrics)
    update_flops = statistics.median(m["throughput/update_flops_per_s"] for m in metrics)
    return {"system": "ours", "round": r, "seed": seed, "episodes_per_s": a.episodes / train_s, "train_s": train_s,
            **res, "gold": gold(str(run_dir / "policy"), heldout), "update_flops_per_s": update_flops}


def run_trl(a: Args, seed: int, r: int, queries_file: Path, trl_dir: Path, out: Path, heldout: torch.Tensor) -> dict:
    """One run of TRL's PPOTrainer (benchmark/trl_ppo.py in TRL's environment) on the same queries."""
    res = run([a.trl_python, "benchmark/trl_ppo.py", "--reward_model", a.reward_model, "--queries", str(queries_file),
               "--output_dir", str(trl_dir), "--total_episodes", str(a.episodes), "--seed", str(seed),
               "--nminibatches", str(a.nminibatches)], out / f"trl_{r}.log")
    trl = json.loads((trl_dir / "result.json").read_text())
    return {"system": "trl", "round": r, "seed": seed, "episodes_per_s": trl["episodes_per_s"],
            "train_s": trl["train_s"], **res, "gold": gold(str(trl_dir / "policy"), heldout)}


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__, use_underscores=True))

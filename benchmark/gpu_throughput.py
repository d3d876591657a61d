"""train_policy.py's throughput at OAI's sentiment shape, and TRL 1.12's PPOTrainer on the same setup (one GPU).

    bash benchmark/gpu_throughput.sh          # the exact commands; or, by hand:
    python benchmark/gpu_throughput.py --like data/cache/SmolLM2-135M-Instruct \\
        --config "micro128=--local_micro_batch_size 128" --config "micro512_compile=--local_micro_batch_size 512
        --compile"

The model has the architecture of the folder given by --like (its config.json and tokenizer; its weights, if any, are
not read) with random weights: throughput does not depend on them, so the 98 MB SmolLM2 file is not needed where the
benchmark runs. The reward model is the same random network with a reward head. Shape (OAI's launch.py, sentiment):
query 64, response 24 truncated at '.' after 16, batch 512, 1 minibatch, 4 epochs, bf16. For each --config (a name and
the flags added to that shape), train_policy.py runs --updates updates; the table gives episodes/s over all updates
(first ones included, as a real run pays them), the steady state (median after the first two), the seconds of each
phase, and the update phase's share of the measured bf16 matmul peak. With --trl_python, TRL's PPOTrainer
(benchmark/trl_ppo.py, in its own environment) runs the same episodes at the first config's micro-batch.
"""

import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import tyro
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmark"))
import train_policy as tp  # noqa: E402
from matmul_peak import measure  # noqa: E402

OAI_SHAPE = ["--query_dataset", "data/corpus.jsonl.gz", "--query_length", "64", "--response_length", "24",
             "--truncate_token", ".", "--truncate_after", "16", "--nminibatches", "1", "--noptepochs", "4", "--lr",
             "1e-5", "--kl_coef", "0.15", "--kl_target", "6", "--kl_horizon", "10000", "--print_sample_every", "100000"]


@dataclass
class Args:
    like: str = "data/cache/SmolLM2-135M-Instruct"
    """folder whose config.json and tokenizer give the architecture (python data/build.py smollm2 writes
    SmolLM2-135M's)"""
    config: List[str] = field(default_factory=lambda: ["micro128=--local_micro_batch_size 128 "
                                                       "--local_rollout_forward_batch_size 128"])
    """NAME=FLAGS: a configuration to measure, FLAGS added to OAI's shape (repeatable)"""
    updates: int = 8
    """PPO updates per configuration"""
    batch_size: int = 512
    """episodes per update (OAI: 512)"""
    mixed_precision: str = "bf16"
    """--mixed_precision of every run (and --bf16 for TRL)"""
    trl_python: Optional[str] = None
    """python of an environment with trl 1.12.0 (benchmark/trl-requirements.txt); None skips TRL"""
    out: str = "runs/gpu_throughput"
    """folder for the models, the runs and result.json"""
    seed: int = 1
    """seed of the random weights and of the runs"""


def random_models(like: str, out: Path, seed: int) -> tuple:
    """(base folder, reward model folder): the architecture of `like` with random weights, saved after prepare_lm (so
    that its tokenizer already has the dedicated pad token and TRL reads the same vocabulary), and a reward model on
    it."""
    base, reward = out / "random_base", out / "random_reward_model"
    if not (reward / "reward_head.safetensors").exists():
        torch.manual_seed(seed)
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(like))
        lm, tokenizer = tp.prepare_lm(lm, AutoTokenizer.from_pretrained(like))
        lm.save_pretrained(base)
        tokenizer.save_pretrained(base)
        tp.save_reward_model(tp.RewardModel(lm), tokenizer, reward)
    return base, reward


def ours(name: str, flags: str, base: Path, reward: Path, a: Args, peak: float, out: Path) -> dict:
    run_root = out / name
    cmd = [sys.executable, "train_policy.py", "--base_model", str(base), "--reward_model", str(reward), *OAI_SHAPE,
           "--batch_size", str(a.batch_size), "--total_episodes", str(a.updates * a.batch_size), "--seed", str(a.seed),
           "--mixed_precision", a.mixed_precision,
           "--peak_flops", str(peak), "--run_root", str(run_root), *shlex.split(flags)]
    print("$ " + shlex.join(cmd), flush=True)
    with open(out / f"{name}.log", "w") as log:
        if subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"error: {name} failed, see {out / f'{name}.log'}")
    run_dir = max(run_root.iterdir())
    m = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steady = m[2:] or m

    def median(key):
        return statistics.median(x[key] for x in steady)

    train_s = sum(x["timing/generation_s"] + x["timing/scoring_s"] + x["timing/update_s"] for x in m)
    return {"system": "ours", "config": name, "flags": flags, "episodes_per_s": len(m) * a.batch_size / train_s,
            "steady_episodes_per_s": a.batch_size / statistics.median(x["timing/generation_s"] + x["timing/scoring_s"]
                                                                      + x["timing/update_s"] for x in steady),
            "generation_s": median("timing/generation_s"), "scoring_s": median("timing/scoring_s"),
            "update_s": median("timing/update_s"), "update_peak_fraction": median("throughput/update_peak_fraction"),
            "peak_memory_gb": max(x.get("memory/peak_gb", 0.0) for x in m)}


def trl(base: Path, reward: Path, a: Args, micro: int, out: Path) -> dict:
    """TRL's PPOTrainer on the same queries (ours, left-padded with the same pad token), batch, epochs and lengths."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = tp.load_texts(str(ROOT / "data" / "corpus.jsonl.gz"), "train")
    queries = next(tp.query_batches(texts, tokenizer, 64, 24, a.updates * a.batch_size, seed=a.seed))[0]
    (out / "trl_queries.json").write_text(json.dumps(queries.tolist()))
    cmd = [a.trl_python, "benchmark/trl_ppo.py", "--base_model", str(base), "--reward_model", str(reward), "--queries",
           str(out / "trl_queries.json"), "--output_dir", str(out / "trl"), "--total_episodes",
           str(a.updates * a.batch_size), "--batch_size", str(a.batch_size), "--nminibatches", "1",
           "--micro_batch_size", str(micro), "--rollout_forward_batch_size", str(micro), "--lr", "1e-5",
           "--stop_token_id", str(tokenizer.convert_tokens_to_ids(".")), "--seed",
           str(a.seed)] + ["--bf16"] * (a.mixed_precision == "bf16")
    print("$ " + shlex.join(cmd), flush=True)
    with open(out / "trl.log", "w") as log:
        if subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"error: TRL failed, see {out / 'trl.log'}")
    result = json.loads((out / "trl" / "result.json").read_text())
    return {"system": "trl", "config": f"micro{micro}", "episodes_per_s": result["episodes_per_s"]}


def main(a: Args):
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = max(measure(n, dtype, device) for n in (2048, 4096, 8192) if device.type == "cuda" or n == 2048)
    print(f"{where}: matmul peak {peak:.3e} FLOP/s ({dtype})", flush=True)
    base, reward = random_models(a.like, out, a.seed)
    results = []
    for spec in a.config:
        name, _, flags = spec.partition("=")
        results.append(ours(name, flags, base, reward, a, peak, out))
        print(json.dumps(results[-1]), flush=True)
    if a.trl_python:
        first = shlex.split(a.config[0].partition("=")[2])
        micro = int(first[first.index("--local_micro_batch_size") + 1]) if "--local_micro_batch_size" in first else 32
        results.append(trl(base, reward, a, micro, out))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{where}, {a.updates} updates of {a.batch_size} episodes, "
          f"{sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters()) / 1e6:.0f}M parameters")
    print("| system | config | episodes/s (all updates) | steady episodes/s | generation s | scoring s | update s | "
          "update / peak | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        cells = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else "" for k in
                 ("steady_episodes_per_s", "generation_s", "scoring_s", "update_s", "update_peak_fraction",
                  "peak_memory_gb")]
        print(f"| {r['system']} | {r['config']} | {r['episodes_per_s']:.1f} | " + " | ".join(cells) + " |")
    if a.trl_python:
        print(f"ours ({results[0]['config']}) / TRL: "
              f"{results[0]['episodes_per_s'] / results[-1]['episodes_per_s']:.2f}x; "
              "best config / TRL: "
              f"{max(r['episodes_per_s'] for r in results[:-1]) / results[-1]['episodes_per_s']:.2f}x")
    (out / "result.json").write_text(json.dumps({"device": where, "peak_flops": peak, "time": time.time(),
                                                 "runs": results}, indent=2))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__, use_underscores=True))

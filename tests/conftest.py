import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The embedded world must work with no model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NANO = ROOT / "data" / "nano"
CORPUS = ROOT / "data" / "corpus.jsonl.gz"
LABELS = ROOT / "data" / "labels" / "sentiment_offline_5k.json"

# A tiny GPT-2 for fast SFT runs; the real nano tokenizer.
TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "32", "--eval_every", "2", "--num_samples", "2",
        "--sample_length", "4", "--mixed_precision", "no"]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The first 300 passages of the embedded corpus, in the same format."""
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl.gz"
    with gzip.open(CORPUS, "rt") as src, gzip.open(path, "wt") as dst:
        for i, line in enumerate(src):
            if i == 300:
                break
            dst.write(line)
    return path


def run_script(args: list, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def run_torchrun(script_args: list, port: int) -> subprocess.CompletedProcess:
    """The script in two CPU processes (gloo), as `torchrun --nproc_per_node 2` launches it."""
    return run_script([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *script_args])


def read_metrics(run_root: Path) -> list:
    (run_dir,) = [p for p in run_root.iterdir() if p.is_dir()]
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory) -> Path:
    """The reward model of a tiny train_reward.py run under LoRA (rank 4 on the nano model): train_reward.py's LoRA path,
    and a reward model for the DPO and LoRA tests."""
    root = tmp_path_factory.mktemp("tiny_reward")
    r = run_script([sys.executable, "train_reward.py", "--num_train", "16", "--num_test", "8", "--batch_size", "8",
                    "--local_micro_batch_size", "4", "--normalize_samples", "16", "--rollout_batch_size", "16", "--eval_every", "1",
                    "--lora_r", "4", "--run_root", str(root)])
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return run_dir / "reward_model"

"""Runs that survive: a run stopped by SIGTERM in the middle and resumed ends exactly where an uninterrupted run with the
same seed ends (metrics and weights, bit for bit), in one process and in two; a NaN stops a run; every stage's
arguments are checked before any stage starts; each run ends with summary.json."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, run_script
from safetensors.torch import load_file, save_file
from test_pipeline import TINY_BOTH

# the same tiny pipeline as test_pipeline.py's, long enough (24 reward updates, 12 PPO updates) to be stopped midway
LONG_BOTH = [*TINY_BOTH, "--reward.num_train", "192", "--reward.save_every", "5", "--policy.total_episodes", "192",
             "--policy.save_every", "5", "--policy.keep_checkpoints", "2"]
VOLATILE = ("timing/", "throughput/", "memory/")  # wall-clock figures, different in every run


def stable(path: Path) -> list:
    """metrics.jsonl without its wall-clock figures."""
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(VOLATILE)} for line in open(path)]


def weights(folder: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


def only_run(root: Path) -> Path:
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return run_dir


def stopped_midway(cmd: list, root: Path, metrics: str, after_lines: int) -> subprocess.CompletedProcess:
    """Start cmd in its own process group and send SIGTERM to the whole group (as a scheduler pre-empting a job does)
    once root/<run>/<metrics> has after_lines lines."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        files = list(root.glob(f"*/{metrics}"))
        if files and sum(1 for _ in open(files[0])) >= after_lines:
            os.killpg(proc.pid, signal.SIGTERM)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_same_runs(a: Path, b: Path, stages: tuple):
    for stage in stages:
        assert stable(a / stage / "metrics.jsonl") == stable(b / stage / "metrics.jsonl"), stage
    assert weights(a / "reward" / "reward_model") == weights(b / "reward" / "reward_model")
    assert weights(a / "policy" / "policy") == weights(b / "policy" / "policy")
    for summary in (a / "summary.json", b / "summary.json"):
        assert summary.is_file()
    strip = lambda d: {k: v for k, v in d.items() if not k.endswith(("wall_s", "episodes_per_s"))}
    assert strip(json.loads((a / "summary.json").read_text())) == strip(json.loads((b / "summary.json").read_text()))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    r = run_script([sys.executable, "train_both.py", *LONG_BOTH, "--run_root", str(root)])
    assert r.returncode == 0, r.stderr[-3000:]
    return only_run(root)


@pytest.mark.parametrize("stage", ["reward", "policy"])
def test_stopped_and_resumed_run_ends_exactly_as_an_uninterrupted_one(tmp_path, uninterrupted, stage):
    stopped = stopped_midway([sys.executable, "train_both.py", *LONG_BOTH, "--run_root", str(tmp_path)], tmp_path,
                             f"{stage}/metrics.jsonl", after_lines=4)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    run_dir = only_run(tmp_path)
    assert f"continue with: python train_both.py --resume {run_dir}" in stopped.stdout
    assert not (run_dir / "summary.json").exists() and list((run_dir / stage / "checkpoints").iterdir())
    resumed = run_script([sys.executable, "train_both.py", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed after update" in resumed.stdout
    assert_same_runs(uninterrupted, run_dir, ("reward", "policy"))
    # the last keep_checkpoints (2) of the policy's periodic checkpoints remain
    assert len(list((run_dir / "policy" / "checkpoints").iterdir())) == 2


def test_two_processes_stopped_and_resumed_end_as_uninterrupted(tmp_path):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531", "train_both.py"]
    whole = run_script([*launch, *LONG_BOTH, "--run_root", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[:3000]
    stopped = stopped_midway([*launch, *LONG_BOTH, "--run_root", str(tmp_path / "parts")], tmp_path / "parts",
                             "policy/metrics.jsonl", after_lines=4)
    assert stopped.returncode != 0
    run_dir = only_run(tmp_path / "parts")
    assert list((run_dir / "policy" / "checkpoints").iterdir()), stopped.stderr[-3000:]
    assert {p.name for p in next((run_dir / "policy" / "checkpoints").iterdir()).iterdir()} == {"state.pt", "rng_0.pt", "rng_1.pt", "metrics.jsonl"}
    resumed = run_script([*launch[:-1], "train_both.py", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_runs(only_run(tmp_path / "whole"), run_dir, ("reward", "policy"))
    one = run_script([sys.executable, "train_both.py", "--resume", str(run_dir)])  # not with another process count
    assert one.returncode == 0 and "has finished" in one.stdout


def test_sft_stopped_and_resumed_ends_exactly_as_uninterrupted(tmp_path, small_corpus):
    common = [sys.executable, "train_sft.py", *TINY, "--dataset", str(small_corpus), "--total_steps", "40", "--batch_size", "8",
              "--local_micro_batch_size", "8", "--save_every", "7"]
    whole = run_script([*common, "--run_root", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[:3000]
    stopped = stopped_midway([*common, "--run_root", str(tmp_path / "parts")], tmp_path / "parts", "metrics.jsonl", after_lines=5)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    run_dir = only_run(tmp_path / "parts")
    resumed = run_script([sys.executable, "train_sft.py", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = only_run(tmp_path / "whole")
    assert stable(a / "metrics.jsonl") == stable(run_dir / "metrics.jsonl")
    assert weights(a / "model") == weights(run_dir / "model")
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 40


def test_resume_takes_no_other_flag(tmp_path, uninterrupted):
    r = run_script([sys.executable, "train_both.py", "--resume", str(uninterrupted), "--seed", "3"])
    assert r.returncode == 2 and "give no other flag" in r.stderr
    r = run_script([sys.executable, "train_policy.py", "--resume", str(tmp_path)])
    assert r.returncode == 2 and "not a run folder" in r.stderr


def test_a_nan_reward_stops_the_run_naming_the_update_and_quantity(tmp_path, uninterrupted):
    broken = tmp_path / "nan_reward_model"
    subprocess.run(["cp", "-r", str(uninterrupted / "reward" / "reward_model"), str(broken)], check=True)
    head = load_file(broken / "reward_head.safetensors")
    head["gain"] = torch.full_like(head["gain"], float("nan"))
    save_file(head, broken / "reward_head.safetensors")
    r = run_script([sys.executable, "train_policy.py", "--reward_model", str(broken), "--total_episodes", "64", "--batch_size", "16",
                    "--nminibatches", "1", "--local_micro_batch_size", "8", "--run_root", str(tmp_path / "runs")])
    assert r.returncode == 3, r.stderr[-3000:]
    (last,) = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert last.startswith("error: update 1: ") and "objective/scores = nan" in last and "last good checkpoint: none" in last
    run_dir = only_run(tmp_path / "runs")
    assert len(stable(run_dir / "metrics.jsonl")) == 1 and not (run_dir / "policy").exists()


def test_train_both_checks_every_stage_before_any_work(tmp_path):
    r = run_script([sys.executable, "train_both.py", "--policy.batch_size", "60", "--run_root", str(tmp_path)])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --policy.batch_size 60 / 1 process(es) / --policy.nminibatches 2")
    r = run_script([sys.executable, "train_both.py", "--policy.truncate_token", "two words", "--run_root", str(tmp_path)])
    assert r.returncode == 2 and "--policy.truncate_token 'two words' is not a single token" in r.stderr
    r = run_script([sys.executable, "train_both.py", "--reward.label_dataset", str(tmp_path / "none.json"), "--run_root", str(tmp_path)])
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --reward.label_dataset ")
    assert not list(tmp_path.iterdir())  # nothing was written


def test_total_episodes_rounding_is_said_first(tmp_path, uninterrupted):
    r = run_script([sys.executable, "train_policy.py", "--reward_model", str(uninterrupted / "reward" / "reward_model"),
                    "--total_episodes", "20", "--batch_size", "16", "--nminibatches", "1", "--local_micro_batch_size", "8",
                    "--run_root", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0] == ("note: --total_episodes 20 is not a multiple of --batch_size 16: 2 updates train on 32 "
                                        "episodes (rounded up, as OAI)")
    summary = json.loads((only_run(tmp_path) / "summary.json").read_text())
    assert summary["updates"] == 2 and summary["episodes"] == 32 and {"score/first_update", "kl/last_tenth", "wall_s"} <= set(summary)

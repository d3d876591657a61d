"""Runs that survive: a run stopped by SIGTERM in the middle and resumed ends exactly where an uninterrupted run with
the same seed ends (metrics and weights, bit for bit), in one process and in two; a NaN stops a run; every stage's
arguments are checked before any stage starts; each run ends with summary.json. The runs train the session's 1-layer
model (tests/conftest.py: tiny_models), so that each takes seconds; the stopped ones are left several updates after the
signal is sent."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, long_both, only_run, stable, stopped_midway, weights
from safetensors.torch import load_file, save_file

import train_both
import train_policy
import train_sft


def assert_same_runs(a: Path, b: Path):
    for stage in ("reward", "policy"):
        assert stable(a / stage / "metrics.jsonl") == stable(b / stage / "metrics.jsonl"), stage
    assert weights(a / "reward" / "reward_model") == weights(b / "reward" / "reward_model")
    assert weights(a / "policy" / "policy") == weights(b / "policy" / "policy")
    for summary in (a / "summary.json", b / "summary.json"):
        assert summary.is_file()
    strip = lambda d: {k: v for k, v in d.items() if not k.endswith(("wall_s", "episodes_per_s"))}
    assert strip(json.loads((a / "summary.json").read_text())) == strip(json.loads((b / "summary.json").read_text()))


@pytest.mark.slow
def test_run_stopped_in_each_stage_and_resumed_ends_exactly_as_an_uninterrupted_one(tmp_path, tiny_models, main):
    """Stopped by SIGTERM in the reward stage, resumed, stopped again in the PPO stage, resumed: the same metrics,
    weights and summary as a run that was never stopped; the last keep_checkpoints (2) of PPO's checkpoints remain."""
    flags = long_both(tiny_models)
    whole = main(train_both, *flags, "--run_root", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    parts = tmp_path / "parts"
    stopped = stopped_midway([sys.executable, "train_both.py", *flags, "--run_root", str(parts)], parts,
                             "reward/metrics.jsonl", after_lines=2)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    run_dir = only_run(parts)
    assert f"continue with: python train_both.py --resume {run_dir}" in stopped.stdout
    assert not (run_dir / "summary.json").exists() and not (run_dir / "policy").exists()
    assert list((run_dir / "reward" / "checkpoints").iterdir())
    resume = [sys.executable, "train_both.py", "--resume", str(run_dir)]
    stopped = stopped_midway(resume, parts, "policy/metrics.jsonl", after_lines=1)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "resumed after update" in stopped.stdout and (run_dir / "reward" / "summary.json").is_file()
    assert not (run_dir / "summary.json").exists() and list((run_dir / "policy" / "checkpoints").iterdir())
    resumed = main(train_both, "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed after update" in resumed.stdout
    assert_same_runs(only_run(tmp_path / "whole"), run_dir)
    assert len(list((run_dir / "policy" / "checkpoints").iterdir())) == 2


@pytest.mark.slow
def test_sft_stopped_and_resumed_ends_exactly_as_uninterrupted(tmp_path, small_corpus, main):
    common = [*TINY, "--dataset", str(small_corpus), "--total_steps", "24", "--batch_size", "8",
              "--local_micro_batch_size", "8", "--save_every", "5"]
    whole = main(train_sft, *common, "--run_root", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = stopped_midway([sys.executable, "train_sft.py", *common, "--run_root", str(tmp_path / "parts")],
                             tmp_path / "parts", "metrics.jsonl", after_lines=3)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    run_dir = only_run(tmp_path / "parts")
    resumed = main(train_sft, "--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = only_run(tmp_path / "whole")
    assert stable(a / "metrics.jsonl") == stable(run_dir / "metrics.jsonl")
    assert weights(a / "model") == weights(run_dir / "model")
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 24


def test_resume_takes_no_other_flag(tmp_path, main):
    r = main(train_both, "--resume", tmp_path, "--seed", "3")
    assert r.returncode == 2 and "give no other flag" in r.stderr
    r = main(train_policy, "--resume", tmp_path / "nothing")
    assert r.returncode == 2 and "not a run folder" in r.stderr


def test_a_nan_reward_stops_the_run_naming_the_update_and_quantity(tmp_path, tiny_models, main):
    broken = tmp_path / "nan_reward_model"
    subprocess.run(["cp", "-r", str(tiny_models / "reward_model"), str(broken)], check=True)
    head = load_file(broken / "reward_head.safetensors")
    head["gain"] = torch.full_like(head["gain"], float("nan"))
    save_file(head, broken / "reward_head.safetensors")
    r = main(train_policy, "--base_model", tiny_models / "base", "--reward_model", broken, "--total_episodes", "64",
             "--batch_size", "16", "--nminibatches", "1", "--local_micro_batch_size", "8", "--run_root",
             tmp_path / "runs")
    assert r.returncode == 3, r.stderr[-3000:]
    (last,) = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert last.startswith("error: update 1: ")
    assert "objective/scores = nan" in last and "last good checkpoint: none" in last
    run_dir = only_run(tmp_path / "runs")
    assert len(stable(run_dir / "metrics.jsonl")) == 1 and not (run_dir / "policy").exists()


def test_train_both_checks_every_stage_before_any_work(tmp_path, main):
    r = main(train_both, "--policy.batch_size", "60", "--run_root", tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: --policy.batch_size 60 / 1 process(es) / "
                                                        "--policy.nminibatches 2")
    r = main(train_both, "--policy.truncate_token", "two words", "--run_root", tmp_path)
    assert r.returncode == 2 and "--policy.truncate_token 'two words' is not a single token" in r.stderr
    r = main(train_both, "--reward.label_dataset", tmp_path / "none.json", "--run_root", tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --reward.label_dataset ")
    assert not list(tmp_path.iterdir())  # nothing was written


def test_total_episodes_rounding_is_said_first(tmp_path, tiny_models, main):
    r = main(train_policy, "--base_model", tiny_models / "base", "--reward_model", tiny_models / "reward_model",
             "--total_episodes", "20", "--batch_size", "16", "--nminibatches", "1", "--local_micro_batch_size", "8",
             "--run_root", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0] == ("note: --total_episodes 20 is not a multiple of --batch_size 16: 2 updates "
                                        "train on 32 "
                                        "episodes (rounded up, as OAI)")
    summary = json.loads((only_run(tmp_path) / "summary.json").read_text())
    assert summary["updates"] == 2 and summary["episodes"] == 32 and {"score/first_update", "kl/last_tenth",
                                                                      "wall_s"} <= set(summary)

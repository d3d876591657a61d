"""Runs that survive, part two: every bad flag ends the run before any work with one line (exit 2, nothing written);
accuracy never counts a tie as right and tied or non-integer labels are refused; a checkpoint that cannot be read is
passed over for the one before it (and none readable, none at all, or the old layout is one line, exit 2); a checkpoint
that cannot be written (a full disk) removes its temporary folder and ends with one line (exit 4), and the run resumed
afterwards ends exactly as an uninterrupted one; every run gets a folder of its own; a signal before the first update
is one line (exit 128 + signal). Everything runs in the test's own process, on the session's 1-layer model."""

import errno
import json
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from conftest import FIXTURES, TINY, only_run, stable, weights

import train_both
import train_dpo
import train_policy
import train_reward
import train_rloo
import train_sft


def ppo(tiny_models: Path, *extra) -> list:
    """A PPO run of 4 updates of 16 episodes on the 1-layer model, a checkpoint after each."""
    return ["--base_model", tiny_models / "base", "--reward_model", tiny_models / "reward_model", "--total_episodes",
            "64", "--batch_size", "16", "--nminibatches", "1", "--local_micro_batch_size", "8", "--save_every", "1",
            "--keep_checkpoints", "4", *extra]


# 1. every bad flag: one line naming the flag and its value, exit 2, nothing written ----------------------------------

BAD_FLAGS = [
    (train_policy, ["--lr", "nan"], "--lr nan must be a finite positive number"),
    (train_policy, ["--lr", "-1e-5"], "--lr -1e-05 must be a finite positive number"),
    (train_policy, ["--local_micro_batch_size", "0"], "--local_micro_batch_size 0 must be at least 1"),
    (train_policy, ["--nminibatches", "0"], "--nminibatches 0 must be at least 1"),
    (train_policy, ["--response_length", "0"], "--response_length 0 must be at least 1"),
    (train_policy, ["--temperature", "0"], "--temperature 0.0 must be a finite positive number"),
    (train_reward, ["--temperature", "0"], "--temperature 0.0 must be a finite positive number"),
    (train_reward, ["--batch_size", "0"], "--batch_size 0 must be at least 1"),
    (train_reward, ["--local_micro_batch_size", "0"], "--local_micro_batch_size 0 must be at least 1"),
    (train_reward, ["--query_length", "400"],
     "--query_length + --response_length = 424 exceeds the model's 256 positions"),
    (train_dpo, ["--local_micro_batch_size", "0"], "--local_micro_batch_size 0 must be at least 1"),
    (train_dpo, ["--beta", "0"], "--beta 0.0 must be a finite positive number"),
    (train_rloo, ["--local_micro_batch_size", "0"], "--local_micro_batch_size 0 must be at least 1"),
    (train_rloo, ["--lr", "inf"], "--lr inf must be a finite positive number"),
    (train_sft, ["--local_micro_batch_size", "0"], "--local_micro_batch_size 0 must be at least 1"),
    (train_sft, ["--base_model", "data/nano", "--block_size", "300"],
     "--block_size 300 exceeds the model's 256 positions"),
    (train_both, ["--policy.response_length", "0"], "--policy.response_length 0 must be at least 1"),
    (train_both, ["--reward.lr", "-1"], "--reward.lr -1.0 must be a finite positive number"),
]


@pytest.mark.parametrize("module, flags, message", BAD_FLAGS, ids=[f"{m.__name__}{f}" for m, f, _ in BAD_FLAGS])
def test_a_bad_flag_ends_the_run_before_any_work_with_one_line(module, flags, message, tmp_path, tiny_models, main):
    rm = ["--reward_model", tiny_models / "reward_model"] if module in (train_policy, train_rloo) else []
    r = main(module, *rm, *flags, "--run_root", tmp_path / "runs")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_run_root_that_is_a_file_or_cannot_be_written_is_refused(tmp_path, tiny_models, main, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")
    r = main(train_reward, "--run_root", tmp_path / "a_file")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: --run_root {tmp_path / 'a_file'} is a file, not a folder"
    # a read-only mount (or a folder of another user's): what os.access says of the nearest folder that exists
    monkeypatch.setattr(train_policy.os, "access", lambda path, mode: Path(path) != tmp_path)
    r = main(train_policy, *ppo(tiny_models), "--run_root", tmp_path / "runs" / "deeper")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"error: --run_root {tmp_path / 'runs' / 'deeper'}: {tmp_path} cannot "
                                                 "be written (read-only or not ours)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_reward_model_given_as_a_file_is_named_so(tmp_path, main):
    (tmp_path / "model.safetensors").write_bytes(b"")
    for module in (train_policy, train_rloo):
        r = main(module, "--reward_model", tmp_path / "model.safetensors", "--run_root", tmp_path / "runs")
        assert r.returncode == 2
        assert r.stderr.strip().splitlines()[-1].startswith(f"error: --reward_model {tmp_path / 'model.safetensors'} "
                                                            "is a file")


# 2. no silent wrong result
#    ---------------------------------------------------------------------------------------------


def test_a_tie_is_never_counted_as_right():
    rewards = torch.tensor([[0.5, 0.5], [0.7, 0.2], [0.1, 0.1], [0.3, 0.3]])  # pairwise: column 0 chosen
    best = torch.zeros(4, dtype=torch.long)
    assert train_reward.predicted(rewards, best).tolist() == [False, True, False, False]
    assert train_reward.choice_loss(rewards, best, "pairwise")[1].item() == 0.25
    four = torch.tensor([[0.9, 0.9, 0.1, 0.0], [0.2, 0.8, 0.8, 0.1], [0.1, 0.2, 0.3, 0.4]])
    assert train_reward.predicted(four, torch.tensor([0, 1, 3])).tolist() == [False, False, True]
    # DPO's accuracy: the chosen response's implicit reward above the rejected one's; equal is wrong
    chosen = torch.tensor([-1.0, -2.0])
    stats = train_dpo.dpo_loss(chosen, chosen.clone(), chosen.clone(), chosen.clone(), 0.1, "sigmoid")[1]
    assert stats["rewards/accuracy"].item() == 0.0


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("module", [train_reward, train_dpo])
def test_labels_whose_chosen_equals_rejected_are_refused(module, tmp_path, main):
    rows = [{"prompt": f"Question {i}: name a colour.\nAnswer:", "chosen": " Blue.",
             "rejected": " Seven."} for i in range(8)]
    rows[5]["rejected"] = rows[5]["chosen"]  # a tie, in the held-out labels
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    r = main(module, "--label_dataset", path, "--num_train", "4", "--num_test", "4", "--batch_size", "4",
             "--local_micro_batch_size", "4", "--run_root", tmp_path / "runs")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"error: --label_dataset {path}: 1 held-out label(s) prefer a "
                                                 "response "
                                                 "equal to one they reject (the first: item 5); leave such labels out "
                                                 "of the file")
    assert not (tmp_path / "runs").exists()


def test_best_must_be_an_integer(tmp_path, main):
    items = json.loads((FIXTURES / "oai_offline_labels.json").read_text())
    items[1]["best"] = True  # json true: Python would take it for 1
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(items))
    r = main(train_reward, "--label_dataset", path, "--label_pad_token_id", "50259", "--num_train", "4", "--num_test",
             "2", "--batch_size", "2", "--local_micro_batch_size", "1", "--run_root", tmp_path / "runs")
    assert r.returncode == 2
    message = f"error: --label_dataset {path}: item 1 has best = True, not an integer in 0..3"
    assert r.stderr.strip().splitlines()[-1] == message


# 3. checkpoints that survive
#    -------------------------------------------------------------------------------------------


def stop_after(monkeypatch, update: int):
    """SIGTERM as if it came during update `update`: the run stops after it, with a checkpoint (exit 143)."""
    calls = {"n": 0}

    def requested(self, accelerator):
        calls["n"] += 1  # once before the first update (Run.steps), then once after each
        return signal.SIGTERM if calls["n"] == update + 1 else 0

    monkeypatch.setattr(train_policy.StopRequest, "requested", requested)


@pytest.fixture
def uninterrupted(tmp_path, tiny_models, main) -> Path:
    r = main(train_policy, *ppo(tiny_models), "--run_root", tmp_path / "whole")
    assert r.returncode == 0, r.stderr[-3000:]
    return only_run(tmp_path / "whole")


def stopped_run(tmp_path, tiny_models, main, monkeypatch, after: int) -> Path:
    with monkeypatch.context() as m:
        stop_after(m, after)
        r = main(train_policy, *ppo(tiny_models), "--run_root", tmp_path / "parts")
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    assert f"stopped by SIGTERM after update {after}" in r.stdout
    return only_run(tmp_path / "parts")


def assert_same_as(whole: Path, run_dir: Path):
    assert stable(whole / "metrics.jsonl") == stable(run_dir / "metrics.jsonl")
    assert weights(whole / "policy") == weights(run_dir / "policy")


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_read_is_passed_over_for_the_one_before(tmp_path, tiny_models, main, monkeypatch,
                                                                            uninterrupted):
    run_dir = stopped_run(tmp_path, tiny_models, main, monkeypatch, after=3)
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["00000001", "00000002", "00000003"]
    model = checkpoints[-1] / "pytorch_model.bin"
    model.write_bytes(model.read_bytes()[:1000])  # truncated: a kill while the disk was writing it
    with open(checkpoints[-2] / "metrics.jsonl", "a") as f:  # the metrics copy of the one before: a broken line
        f.write('{"update": 3, "objective/kl": 0.0')
    r = main(train_policy, "--resume", run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"note: checkpoint {checkpoints[-1]} cannot be read (UnpicklingError" in r.stdout or \
        f"note: checkpoint {checkpoints[-1]} cannot be read (RuntimeError" in r.stdout, r.stdout[:2000]
    assert f"note: checkpoint {checkpoints[-2]} cannot be read (JSONDecodeError" in r.stdout
    assert f"resumed after update 1 from {checkpoints[0]}" in r.stdout
    assert_same_as(uninterrupted, run_dir)  # update 1's state, then updates 2-4 again, as the uninterrupted run
    # the two passed over are kept aside for a look; the run wrote its checkpoints 2 and 3 anew
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["00000001", "00000002", "00000003", "unreadable_00000002", "unreadable_00000003"]


def test_resume_with_no_readable_checkpoint_none_at_all_or_the_old_layout_is_one_line(tmp_path, tiny_models, main,
                                                                                      monkeypatch):
    run_dir = stopped_run(tmp_path, tiny_models, main, monkeypatch, after=2)
    for checkpoint in (run_dir / "checkpoints").iterdir():
        (checkpoint / "random_states_0.pkl").unlink()  # accelerate alone would only log it and go on, no longer exact
    r = main(train_policy, "--resume", run_dir)
    assert r.returncode == 2 and "no random_states_0.pkl" in r.stdout
    assert r.stderr.strip().splitlines()[-1] == f"error: --resume {run_dir}: none of its 2 checkpoint(s) can be read"
    (run_dir / "checkpoints" / "00000002" / "state.pt").write_bytes(b"")
    r = main(train_policy, "--resume", run_dir)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        f"error: --resume {run_dir}: {run_dir / 'checkpoints' / '00000002'} was written by an earlier version")
    shutil.rmtree(run_dir / "checkpoints")
    r = main(train_policy, "--resume", run_dir)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: --resume {run_dir}: it has no checkpoint (checkpoints/ is empty or missing), so there is nothing to "
        "continue from; start the run anew")


# 4. a full disk
#    --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_removes_the_partial_checkpoint_and_the_resumed_run_ends_exactly(tmp_path, tiny_models, main,
                                                                                   monkeypatch, uninterrupted):
    save_state, calls = Accelerator.save_state, {"n": 0}

    def full_on_the_third(self, output_dir, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            (Path(output_dir) / "pytorch_model.bin").write_bytes(b"partly written")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(self, output_dir, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Accelerator, "save_state", full_on_the_third)
        r = main(train_policy, *ppo(tiny_models), "--run_root", tmp_path / "parts")
    run_dir = only_run(tmp_path / "parts")
    assert r.returncode == 4, r.stderr[-3000:]
    (last,) = [line for line in r.stderr.splitlines() if line.startswith("error:")]  # its own line, under the bar
    checkpoint = run_dir / "checkpoints" / "00000003"
    assert last.startswith(f"error: checkpoint {checkpoint} could not be written (No space left on device); ")
    assert "GB free in" in last and "a checkpoint takes about" in last
    assert last.endswith(f"continue with: python train_policy.py --resume {run_dir}")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["00000001", "00000002"]  # no tmp_ left
    r = main(train_policy, "--resume", run_dir)  # space freed
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_as(uninterrupted, run_dir)


# 5. one folder per run; a signal before the first update ------------------------------------------------------------


def test_runs_started_in_the_same_second_never_share_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(train_policy.time, "time", lambda: 1_800_000_000.0)
    one_process = SimpleNamespace(is_main_process=True, num_processes=1)
    folders = [train_policy.shared_run_dir(one_process, str(tmp_path), "policy", 1) for _ in range(3)]
    assert [f.name for f in folders] == ["policy__1__1800000000", "policy__1__1800000000_2", "policy__1__1800000000_3"]
    assert all(f.is_dir() for f in folders)


@pytest.mark.slow
def test_two_train_both_runs_in_the_same_second_get_two_folders(tmp_path, tiny_models, main, monkeypatch):
    monkeypatch.setattr(train_policy.time, "time", lambda: 1_800_000_000.0)
    base = str(tiny_models / "base")
    flags = ["--reward.num_train", "16", "--reward.num_test", "8", "--reward.batch_size", "8",
             "--reward.local_micro_batch_size", "8", "--reward.normalize_samples", "16", "--reward.rollout_batch_size",
             "16", "--reward.base_model", base, "--policy.base_model", base, "--policy.total_episodes", "16",
             "--policy.batch_size", "16", "--policy.nminibatches", "1", "--policy.local_micro_batch_size", "8"]
    for seed_flags in ([], ["--policy.lr", "1e-4"]):  # the second with other flags: its args.json must be its own
        r = main(train_both, *flags, *seed_flags, "--run_root", tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    folders = sorted(tmp_path.iterdir())
    assert [f.name for f in folders] == ["both__1__1800000000", "both__1__1800000000_2"]
    lrs = [json.loads((f / "args.json").read_text())["policy"]["lr"] for f in folders]
    assert lrs == [train_policy.Args().lr, 1e-4] and all((f / "summary.json").is_file() for f in folders)


def test_a_signal_before_the_first_update_is_one_line(tmp_path, tiny_models, main, monkeypatch):
    monkeypatch.setattr(train_policy.StopRequest, "requested", lambda self, accelerator: signal.SIGTERM)
    r = main(train_policy, *ppo(tiny_models), "--run_root", tmp_path)
    assert r.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM before the first update; nothing was saved: start the run anew" in r.stdout


def test_sft_uses_its_own_positions_and_steps(tmp_path, small_corpus, main):
    r = main(train_sft, *TINY, "--n_positions", "16", "--dataset", small_corpus, "--run_root", tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: --block_size 32 exceeds the model's 16 positions"

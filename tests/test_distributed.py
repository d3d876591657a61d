"""Two processes (CPU, gloo): plain DDP against one process, DeepSpeed ZeRO-2 and ZeRO-3 (configs/zero2.yaml,
configs/zero3.yaml) against plain DDP, and runs stopped by SIGTERM and resumed in two processes.

Plain DDP against one process: at near-greedy temperature train_both.py's first updates log the same figures, and so do
SFT's first steps; the processes split each batch and average their gradients. ZeRO against DDP: each script's first two
updates log the same figures, and the saved model loads and computes the same outputs; what does not combine fails at
once. Stopped and resumed (train_both.py and GRPO under DDP, PPO under ZeRO-2): exactly the uninterrupted run.

The uninterrupted runs under DDP come from one launch shared by these tests (tests/conftest.py: two_process_runs). This
file's tests run on one xdist worker (--dist loadfile), one after the other: two launches of two processes on two cores
would wait on each other at every all-reduce.

Tolerance: the forward passes of DDP and ZeRO run the same kernels on the same weights, but the two sum the processes'
gradients in different orders (DDP's bucketed all-reduce; DeepSpeed's flat partitions, reduce-scattered), so the weights
after an update differ in the last bits of fp32 (measured: at most 4e-6 on a logged KL of 0.16, 1.2e-7 on a weight;
1.1e-5 relative on a gradient norm, which DeepSpeed sums over its partitions). The figures of the first two updates are
compared to a relative 1e-4 (an absolute 1e-5 near 0); saved weights to 1e-5, the models' outputs to 1e-4."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import (ROOT, TINY, TINY_BOTH, VOLATILE, launch, launch_several, long_both, long_rloo, only_run,
                      read_metrics, run_script, several, stable, stopped_midway, weights, zero_runs)
from safetensors.torch import load_file

import train_both
import train_policy
import train_sft
from test_pipeline import read
from test_resume import assert_same_runs
from test_rloo import stop_and_resume

pytestmark = pytest.mark.slow


def assert_close_updates(ddp: list, zero: list, stage: int):
    """The figures of the first two updates (and of a held-out evaluation before training), as the module's docstring
    says."""
    assert len(ddp) == len(zero)
    for i, (a, b) in enumerate(zip(ddp[:3], zero[:3])):
        assert set(a) == set(b)
        for key, value in a.items():
            if isinstance(value, float) and not key.startswith(VOLATILE):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-5), f"ZeRO-{stage}, line {i}: {key}"


def assert_same_weights(a: Path, b: Path):
    for f in sorted(a.glob("*.safetensors")):
        x, y = load_file(f), load_file(b / f.name)
        assert set(x) == set(y), f.name
        for name in x:
            assert torch.allclose(x[name], y[name], atol=1e-5), f"{f.name}: {name}"


TOKENS = torch.tensor([[5, 17, 101, 42, 7, 300, 12, 9]])


def lm_outputs(folder: Path) -> torch.Tensor:
    return train_policy.AutoModelForCausalLM.from_pretrained(folder)(TOKENS).logits


def reward_outputs(folder: Path) -> torch.Tensor:
    return train_policy.load_reward_model(str(folder))[0](TOKENS, pad_token_id=0)


# Per script (tests/conftest.py: zero_runs): the folder of the model it saves and how to compute with that model. DPO
# runs under LoRA (its reference is then the policy with the adapters off, inside the sharded engine); PPO has a
# separate reference and reward model, each an inference engine at ZeRO-3 (and train_rloo.py's GRPO the same way); the
# reward model sets its gain and bias by hand (normalization); SFT clips its gradients. DPO runs last in a launch: after
# its LoRA run at ZeRO-3 the processes' counters of DeepSpeed parameter ids differ, which a later ZeRO-3 engine in the
# same processes refuses (each script runs in processes of its own outside these tests).
SAVED = {"policy": ("policy", lm_outputs), "reward": ("reward_model", reward_outputs), "rloo": ("policy", lm_outputs),
         "sft": ("model", lm_outputs), "dpo": ("policy", lm_outputs)}


def resume_flags(tiny_models: Path) -> list:
    """PPO on the 1-layer model to stop and resume at ZeRO-2: 6 updates, a checkpoint every 2."""
    return ["--total_episodes", "96", "--batch_size", "16", "--nminibatches", "1", "--local_micro_batch_size", "4",
            "--noptepochs", "2", "--print_sample_every", "100", "--save_every", "2", "--base_model",
            str(tiny_models / "base"), "--reward_model", str(tiny_models / "reward_model")]


def assert_match_ddp(ddp_runs: Path, zero: Path, stage: int):
    for name, (saved, outputs) in SAVED.items():
        ddp_dir, zero_dir = only_run(ddp_runs / name), only_run(zero / name)
        assert json.loads((ddp_dir / "args.json").read_text())["zero_stage"] == 0
        assert json.loads((zero_dir / "args.json").read_text())["zero_stage"] == stage
        ddp = [json.loads(line) for line in open(ddp_dir / "metrics.jsonl")]
        assert_close_updates(ddp, [json.loads(line) for line in open(zero_dir / "metrics.jsonl")], f"{stage} ({name})")
        assert_same_weights(ddp_dir / saved, zero_dir / saved)  # whole tensors: gathered from the shards at ZeRO-3
        with torch.no_grad():
            assert torch.allclose(outputs(ddp_dir / saved), outputs(zero_dir / saved),
                                  atol=1e-4), f"ZeRO-{stage} ({name})"


def test_dpo_in_two_processes(two_process_runs):
    """train_dpo.py under plain DDP: 32 best-of-4 labels give 96 pairs, 6 updates of 16, split over the processes."""
    run_dir = only_run(two_process_runs / "zero_ref" / "dpo")
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert len([m for m in metrics if "loss/dpo" in m]) == 6
    assert json.loads((run_dir / "args.json").read_text())["world_size"] == 2


@pytest.fixture(scope="session")
def deepspeed_op():
    """DeepSpeed's shared-memory all-reduce for CPU processes, which the first DeepSpeed launch on a machine compiles
    (about a minute on a fresh one; cached in ~/.cache/torch_extensions): built here once, before the ZeRO tests."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load()


def test_zero2_matches_ddp(two_process_runs, deepspeed_op, tmp_path, tiny_models, small_corpus):
    launch_several(zero_runs(tiny_models, small_corpus), tmp_path, 2, 29652)
    assert_match_ddp(two_process_runs / "zero_ref", tmp_path, 2)


def test_zero3_matches_ddp(two_process_runs, deepspeed_op, tmp_path, tiny_models, small_corpus):
    launch_several(zero_runs(tiny_models, small_corpus), tmp_path, 3, 29653)
    assert_match_ddp(two_process_runs / "zero_ref", tmp_path, 3)


def test_zero2_run_stopped_and_resumed_ends_as_uninterrupted(deepspeed_op, tmp_path, tiny_models, capsys):
    # one launch: the uninterrupted run into whole/, then the same run into parts/, stopped by SIGTERM
    runs = {name: ["train_policy.py", resume_flags(tiny_models)] for name in ("whole", "parts")}
    stopped = stopped_midway(several(runs, tmp_path, 2, 29671), tmp_path / "parts", "metrics.jsonl", after_lines=1)
    assert "stopped by SIGTERM" in stopped.stdout, stopped.stderr[-3000:]
    run_dir = only_run(tmp_path / "parts")
    last = sorted((run_dir / "checkpoints").iterdir())[-1]
    # accelerate's save_state: each process's random generators, the KL controller, the query position and the run's
    # own state (custom_checkpoint_0..2), metrics.jsonl; DeepSpeed's own checkpoint (its folder holds the shards of
    # weights and optimizer, `latest` names it, and DeepSpeed adds its scripts that merge the shards)
    assert {p.name for p in last.iterdir()} == {"random_states_0.pkl", "random_states_1.pkl", "custom_checkpoint_0.pkl",
                                                "custom_checkpoint_1.pkl", "custom_checkpoint_2.pkl", "metrics.jsonl",
                                                "pytorch_model", "latest", "zero_to_fp32.py", "zero_to_torch.py"}
    assert (last / "pytorch_model").is_dir()
    with pytest.raises(SystemExit) as refused:  # what resuming it under plain DDP (2 processes, stage 0) says
        train_policy.resume_has_work(str(run_dir), 2, 0)
    assert refused.value.code == 2
    assert f"error: --resume {run_dir}: the run had ZeRO stage 2, not 0" in capsys.readouterr().err
    resumed = run_script(launch(["train_policy.py", "--resume", str(run_dir)], 2, 29673), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = only_run(tmp_path / "whole")
    assert stable(a / "metrics.jsonl") == stable(run_dir / "metrics.jsonl")
    assert_same_weights(a / "policy", run_dir / "policy")


def test_what_does_not_combine_with_deepspeed_fails_at_once(deepspeed_op, tmp_path, tiny_models):
    head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "zero2.yaml"),
            "--num_processes", "1", "--main_process_port", "29675"]
    r = run_script([*head, "train_policy.py", "--compile", "--reward_model", str(tiny_models / "reward_model"),
                    "--run_root", str(tmp_path)])
    assert r.returncode != 0 and "error: --compile does not combine with DeepSpeed" in r.stderr
    assert "Traceback" not in r.stderr.split("error: --compile")[0] and not list(tmp_path.iterdir())


# Plain DDP against one process; runs stopped and resumed under DDP ----------------------------------------------


def test_ddp_matches_one_process_first_update(tmp_path, two_process_runs, main):
    # near-greedy sampling (temperature 0.001) so that both layouts draw the same responses: per-process seeds differ
    # (the nano model, whose distributions are peaked: a random model's are nearly flat, and even 0.001 leaves them to
    # chance); the 2-process run is tests/conftest.py's two_process_runs/both_near_greedy
    one = main(train_both, *TINY_BOTH, "--reward.temperature", "0.001", "--policy.temperature", "0.001", "--run_root",
               tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    d1, d2 = only_run(tmp_path), only_run(two_process_runs / "both_near_greedy")
    r1, r2 = read(d1, "reward"), read(d2, "reward")
    for key in ("normalize/before_training/mean", "normalize/before_training/std", "test/accuracy", "test/loss"):
        assert r1[0][key] == pytest.approx(r2[0][key], abs=1e-4), key
    assert r1[1]["train/loss"] == pytest.approx(r2[1]["train/loss"], abs=1e-4)  # the same 8 labels, split differently
    assert r1[2]["train/loss"] == pytest.approx(r2[2]["train/loss"], abs=1e-4)  # after one identical update
    p1, p2 = read(d1, "policy"), read(d2, "policy")
    for key in ("objective/scores", "objective/gold_score", "objective/kl", "objective/entropy", "objective/kl_coef"):
        assert p1[0][key] == pytest.approx(p2[0][key], abs=1e-4), key


def test_ddp_matches_one_process_first_sft_step(small_corpus, tmp_path, two_process_runs, main):
    """Against tests/conftest.py's two_process_runs/sft_first_step."""
    one = main(train_sft, *TINY, "--dataset", small_corpus, "--total_steps", "2", "--batch_size", "8",
               "--local_micro_batch_size", "4", "--run_root", tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    m1, m2 = read_metrics(tmp_path), read_metrics(two_process_runs / "sft_first_step")
    # one process: 2 micro-batches of 4 accumulated; two processes: 1 micro-batch of 4 each, averaged
    assert m1[0]["train/loss"] == pytest.approx(m2[0]["train/loss"], abs=1e-5)
    assert m1[1]["train/loss"] == pytest.approx(m2[1]["train/loss"], abs=1e-4)  # after one identical update
    assert m1[-1]["eval/loss"] == pytest.approx(m2[-1]["eval/loss"], abs=1e-4)


def test_train_both_stopped_and_resumed_in_two_processes_ends_as_uninterrupted(tmp_path, tiny_models, two_process_runs,
                                                                               main):
    """Against the uninterrupted 2-process run of tests/conftest.py's two_process_runs (both_long)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
              "train_both.py"]
    stopped = stopped_midway([*launch, *long_both(tiny_models), "--run_root", str(tmp_path / "parts")],
                             tmp_path / "parts", "policy/metrics.jsonl", after_lines=1)
    assert stopped.returncode != 0
    run_dir = only_run(tmp_path / "parts")
    assert list((run_dir / "policy" / "checkpoints").iterdir()), stopped.stderr[-3000:]
    last = next((run_dir / "policy" / "checkpoints").iterdir())
    assert {p.name for p in last.iterdir()} == {"pytorch_model.bin", "optimizer.bin", "random_states_0.pkl",
                                                "random_states_1.pkl", "custom_checkpoint_0.pkl",
                                                "custom_checkpoint_1.pkl", "custom_checkpoint_2.pkl", "metrics.jsonl"}
    resumed = run_script([*launch[:-1], "train_both.py", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_runs(only_run(two_process_runs / "both_long"), run_dir)
    one = main(train_both, "--resume", run_dir)  # not with another process count
    assert one.returncode == 0 and "has finished" in one.stdout


def test_grpo_stopped_and_resumed_in_two_processes_ends_as_uninterrupted(tmp_path, tiny_models, two_process_runs):
    """Against tests/conftest.py's two_process_runs/rloo_long."""
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561"]
    run_dir = stop_and_resume(head, long_rloo(tiny_models), tmp_path,
                              lambda run_dir: run_script([*head, "train_rloo.py", "--resume", str(run_dir)]))
    whole = only_run(two_process_runs / "rloo_long")
    assert stable(whole / "metrics.jsonl") == stable(run_dir / "metrics.jsonl")
    assert weights(whole / "policy") == weights(run_dir / "policy")

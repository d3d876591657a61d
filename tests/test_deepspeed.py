"""DeepSpeed ZeRO-2 and ZeRO-3 (configs/zero2.yaml, configs/zero3.yaml) against plain DDP, two CPU processes over gloo:
each script's first two updates log the same figures, and the saved model loads and computes the same outputs; a
ZeRO-2 run stopped by SIGTERM and resumed ends exactly as an uninterrupted one; what does not combine fails at once.

Tolerance: the forward passes of DDP and ZeRO run the same kernels on the same weights, but the two sum the processes'
gradients in different orders (DDP's bucketed all-reduce; DeepSpeed's flat partitions, reduce-scattered), so the
weights after an update differ in the last bits of fp32 (measured: at most 4e-6 on a logged KL of 0.16, 1.2e-7 on a
weight; 1.1e-5 relative on a gradient norm, which DeepSpeed sums over its partitions). The figures of the first two
updates are compared to a relative 1e-4 (an absolute 1e-5 near 0); saved weights to 1e-5, the models' outputs to 1e-4."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, read_metrics, run_script
from safetensors.torch import load_file
from test_resume import only_run, stable, stopped_midway

import train_policy

VOLATILE = ("timing/", "throughput/", "memory/")


def launch(script_args: list, stage: int, port: int, run_root: Path = None) -> list:
    """The command of a 2-process run: torchrun (plain DDP, stage 0) or accelerate launch with configs/zero<stage>.yaml."""
    if stage == 0:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    else:
        head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / f"zero{stage}.yaml"),
                "--num_processes", "2", "--main_process_port", str(port)]
    return [*head, *script_args, *(["--run_root", str(run_root)] if run_root else [])]


def assert_close_updates(ddp: list, zero: list, stage: int):
    """The figures of the first two updates (and of a held-out evaluation before training), as the module's docstring says."""
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


@pytest.fixture(scope="module")
def reward_model_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rm")
    r = run_script([sys.executable, "train_reward.py", "--num_train", "16", "--num_test", "8", "--batch_size", "8",
                    "--local_micro_batch_size", "4", "--normalize_samples", "16", "--rollout_batch_size", "16", "--run_root", str(root)])
    assert r.returncode == 0, r.stderr[-3000:]
    return only_run(root) / "reward_model"


# Per script: its tiny arguments, the saved model's folder and how to run it. DPO runs under LoRA (its reference is then
# the policy with the adapters off, inside the sharded engine); PPO has a separate reference and reward model, each an
# inference engine at ZeRO-3 (and train_rloo.py's GRPO the same way); the reward model sets its gain and bias by hand (normalization); SFT clips its gradients.
SCRIPTS = {
    "policy": (["train_policy.py", "--total_episodes", "32", "--batch_size", "16", "--nminibatches", "1", "--local_micro_batch_size", "4",
                "--noptepochs", "2", "--print_sample_every", "100"], "policy", lm_outputs),
    "reward": (["train_reward.py", "--num_train", "32", "--num_test", "8", "--batch_size", "8", "--local_micro_batch_size", "2",
                "--normalize_samples", "16", "--rollout_batch_size", "16", "--eval_every", "1"], "reward_model", reward_outputs),
    "dpo": (["train_dpo.py", "--num_train", "32", "--num_test", "6", "--batch_size", "16", "--local_micro_batch_size", "4", "--num_eval", "6",
             "--eval_every", "1", "--local_rollout_forward_batch_size", "8", "--lora_r", "4"], "policy", lm_outputs),
    "rloo": (["train_rloo.py", "--total_episodes", "32", "--batch_size", "16", "--k", "4", "--nminibatches", "2", "--local_micro_batch_size", "4",
              "--advantage", "grpo", "--print_sample_every", "100"], "policy", lm_outputs),
    "sft": (["train_sft.py", *TINY, "--total_steps", "3", "--batch_size", "8", "--local_micro_batch_size", "2", "--max_grad_norm", "0.5"],
            "model", lm_outputs),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_zero2_and_zero3_match_ddp(name, tmp_path, reward_model_folder, small_corpus):
    script_args, saved, outputs = SCRIPTS[name]
    if name in ("policy", "dpo", "rloo"):
        script_args = [*script_args, "--reward_model", str(reward_model_folder)]
    if name == "sft":
        script_args = [*script_args, "--dataset", str(small_corpus)]
    port = 29650 + 3 * list(SCRIPTS).index(name)
    runs = {}
    for stage in (0, 2, 3):
        r = run_script(launch(script_args, stage, port + (0, 2, 3).index(stage), tmp_path / str(stage)), timeout=600)
        assert r.returncode == 0, f"stage {stage}: {r.stderr[-3000:]}"
        runs[stage] = only_run(tmp_path / str(stage))
        assert json.loads((runs[stage] / "args.json").read_text())["zero_stage"] == stage
    ddp = read_metrics(tmp_path / "0")
    for stage in (2, 3):
        assert_close_updates(ddp, read_metrics(tmp_path / str(stage)), stage)
        assert_same_weights(runs[0] / saved, runs[stage] / saved)  # whole tensors: gathered from the shards at ZeRO-3
        with torch.no_grad():
            assert torch.allclose(outputs(runs[0] / saved), outputs(runs[stage] / saved), atol=1e-4), f"ZeRO-{stage}"


def test_zero2_run_stopped_and_resumed_ends_as_uninterrupted(tmp_path, reward_model_folder):
    args = ["train_policy.py", "--total_episodes", "128", "--batch_size", "16", "--nminibatches", "1", "--local_micro_batch_size", "4",
            "--noptepochs", "2", "--print_sample_every", "100", "--save_every", "2", "--reward_model", str(reward_model_folder)]
    whole = run_script(launch(args, 2, 29670, tmp_path / "whole"), timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = stopped_midway(launch(args, 2, 29671, tmp_path / "parts"), tmp_path / "parts", "metrics.jsonl", after_lines=4)
    assert "stopped by SIGTERM" in stopped.stdout, stopped.stderr[-3000:]
    run_dir = only_run(tmp_path / "parts")
    last = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert {p.name for p in last.iterdir()} == {"state.pt", "rng_0.pt", "rng_1.pt", "metrics.jsonl", "deepspeed"}
    assert "model" not in torch.load(last / "state.pt", weights_only=False)  # the engine's own files hold the shards
    ddp = run_script(launch(["train_policy.py", "--resume", str(run_dir)], 0, 29672))
    assert ddp.returncode != 0 and "error: --resume" in ddp.stderr and "the run had ZeRO stage 2, not 0" in ddp.stderr
    resumed = run_script(launch(["train_policy.py", "--resume", str(run_dir)], 2, 29673), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = only_run(tmp_path / "whole")
    assert stable(a / "metrics.jsonl") == stable(run_dir / "metrics.jsonl")
    assert_same_weights(a / "policy", run_dir / "policy")


def test_what_does_not_combine_with_deepspeed_fails_at_once(tmp_path, reward_model_folder):
    head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "zero2.yaml"), "--num_processes", "1",
            "--main_process_port", "29675"]
    r = run_script([*head, "train_policy.py", "--compile", "--reward_model", str(reward_model_folder), "--run_root", str(tmp_path)])
    assert r.returncode != 0 and "error: --compile does not combine with DeepSpeed" in r.stderr
    assert "Traceback" not in r.stderr.split("error: --compile")[0] and not list(tmp_path.iterdir())

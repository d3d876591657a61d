"""LoRA through peft in train_sft.py, train_reward.py and train_policy.py (train_dpo.py's in test_dpo.py): only the
adapters of the language model train, the heads train in full, the saved model is merged (its weights differ from the
base model's by a matrix of rank at most r), PPO's reference is the policy with its adapters off; --load_in_4bit on a
CPU is one line, in all four scripts."""

import sys

import pytest
import torch
from conftest import NANO, run_script
from safetensors.torch import load_file
from test_resume import only_run

BASE = load_file(NANO / "model.safetensors")
C_ATTN = "transformer.h.0.attn.c_attn.weight"  # GPT-2's fused q, k, v projection, (in, out)


def rank_of_change(folder, name=C_ATTN) -> int:
    weights = load_file(folder / "model.safetensors")
    return torch.linalg.matrix_rank(weights[name] - BASE[name]).item()


def test_reward_model_under_lora_trains_adapters_and_head_and_saves_merged(tiny_reward_model):
    assert 0 < rank_of_change(tiny_reward_model) <= 4  # moved, and only along the rank-4 adapters
    assert not any("lora" in k for k in load_file(tiny_reward_model / "model.safetensors"))
    head = load_file(tiny_reward_model / "reward_head.safetensors")
    assert head["gain"].item() != 1.0  # the normalization set it; the head trained in full (no way to tell from init alone)


def test_ppo_under_lora(tmp_path, tiny_reward_model):
    r = run_script([sys.executable, "train_policy.py", "--reward_model", str(tiny_reward_model), "--total_episodes", "32",
                    "--batch_size", "16", "--nminibatches", "1", "--local_micro_batch_size", "8", "--noptepochs", "2", "--lora_r", "4",
                    "--run_root", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "65,793 trained policy and value parameters" in r.stdout  # 65,536 of adapters + the value head's 256 + 1
    policy = only_run(tmp_path) / "policy"
    assert 0 < rank_of_change(policy) <= 4
    assert (policy / "value_head.safetensors").is_file()


def test_sft_under_lora(tmp_path, small_corpus):
    r = run_script([sys.executable, "train_sft.py", "--base_model", str(NANO), "--dataset", str(small_corpus), "--total_steps", "4", "--batch_size", "8",
                    "--local_micro_batch_size", "8", "--warmup_steps", "1", "--eval_every", "2", "--num_samples", "1",
                    "--sample_length", "4", "--lr", "1e-2", "--lora_r", "2", "--run_root", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "32,768 trained parameters" in r.stdout
    assert 0 < rank_of_change(only_run(tmp_path) / "model") <= 2


@pytest.mark.parametrize("script", ["train_sft.py", "train_reward.py", "train_policy.py", "train_dpo.py"])
def test_load_in_4bit_on_a_cpu_is_one_clear_line(tmp_path, script):
    extra = ["--base_model", str(NANO)] if script == "train_sft.py" else ["--reward_model", str(NANO)] if script == "train_policy.py" else []
    r = run_script([sys.executable, script, *extra, "--lora_r", "4", "--load_in_4bit", "--run_root", str(tmp_path)])
    assert r.returncode == 2 and r.stderr.startswith("error: --load_in_4bit (QLoRA)") and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert not list(tmp_path.iterdir())

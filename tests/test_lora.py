"""LoRA through peft in train_sft.py, train_reward.py and train_policy.py (train_dpo.py's in test_dpo.py): only the
adapters of the language model train, the heads train in full, the saved model is merged (its weights differ from the
base model's by a matrix of rank at most r), PPO's reference is the policy with its adapters off; --load_in_4bit on a
CPU is one line, in all four scripts."""

import pytest
import torch
from conftest import NANO, only_run
from safetensors.torch import load_file

import train_dpo
import train_policy
import train_reward
import train_sft

BASE = load_file(NANO / "model.safetensors")
C_ATTN = "transformer.h.0.attn.c_attn.weight"  # GPT-2's fused q, k, v projection, (in, out)


def rank_of_change(folder, name=C_ATTN) -> int:
    weights = load_file(folder / "model.safetensors")
    return torch.linalg.matrix_rank(weights[name] - BASE[name]).item()


def test_reward_model_under_lora_trains_adapters_and_head_and_saves_merged(tiny_reward_model):
    assert 0 < rank_of_change(tiny_reward_model) <= 4  # moved, and only along the rank-4 adapters
    assert not any("lora" in k for k in load_file(tiny_reward_model / "model.safetensors"))
    head = load_file(tiny_reward_model / "reward_head.safetensors")
    # the normalization set it; the head trained in full (no way to tell from init alone)
    assert head["gain"].item() != 1.0


@pytest.mark.slow
def test_ppo_under_lora(tmp_path, tiny_reward_model, main):
    r = main(train_policy, "--reward_model", tiny_reward_model, "--total_episodes", "32", "--batch_size", "16",
             "--nminibatches", "1", "--local_micro_batch_size", "8", "--noptepochs", "2", "--lora_r", "4",
             "--run_root", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "65,793 trained policy and value parameters" in r.stdout  # 65,536 of adapters + the value head's 256 + 1
    policy = only_run(tmp_path) / "policy"
    assert 0 < rank_of_change(policy) <= 4
    assert (policy / "value_head.safetensors").is_file()


@pytest.mark.slow
def test_sft_under_lora(tmp_path, small_corpus, main):
    r = main(train_sft, "--base_model", NANO, "--dataset", small_corpus, "--total_steps", "4", "--batch_size", "8",
             "--local_micro_batch_size", "8", "--warmup_steps", "1", "--eval_every", "2", "--num_samples", "1",
             "--sample_length", "4", "--lr", "1e-2", "--lora_r", "2", "--run_root", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "32,768 trained parameters" in r.stdout
    assert 0 < rank_of_change(only_run(tmp_path) / "model") <= 2


@pytest.mark.parametrize("script", [train_sft, train_reward, train_policy, train_dpo])
def test_load_in_4bit_on_a_cpu_is_one_clear_line(tmp_path, script, main):
    extra = ["--base_model", NANO] if script is train_sft else ["--reward_model",
                                                                NANO] if script is train_policy else []
    r = main(script, *extra, "--lora_r", "4", "--load_in_4bit", "--run_root", tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("error: --load_in_4bit (QLoRA)") and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert not list(tmp_path.iterdir())

"""TRL's PPOTrainer (trl 1.12.0, trl.experimental.ppo) on the same setup as our train_policy.py: run by
benchmark/side_by_side.py inside its own virtual environment (benchmark/trl-requirements.txt), never imported here.

Our reward model folder (backbone + reward_head.safetensors) becomes a GPT2ForSequenceClassification whose `score`
layer is a Linear(d, 1) with gain * w and gain * b + bias, so TRL reads the same reward at the same (last non-pad)
token. The value model is a second copy of the base model with a fresh score head, as TRL requires.
"""

import argparse
import json
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.experimental.ppo import PPOConfig, PPOTrainer

from trl_common import reward_model_for_trl, write_result


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base_model", default="data/nano")
    p.add_argument("--reward_model", required=True)
    p.add_argument("--queries", required=True, help="JSON list of left-padded query token lists")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--total_episodes", type=int, default=2560)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--nminibatches", type=int, default=2)
    p.add_argument("--micro_batch_size", type=int, default=None,
                   help="episodes per forward/backward (default: a whole minibatch)")
    p.add_argument("--rollout_forward_batch_size", type=int, default=None,
                   help="episodes per rollout forward (default: the batch)")
    p.add_argument("--noptepochs", type=int, default=4)
    p.add_argument("--response_length", type=int, default=24)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--kl_coef", type=float, default=0.15)
    p.add_argument("--stop_token_id", type=int, default=None,
                   help="truncate responses after this token (ours: --truncate_token)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (ours: --mixed_precision bf16)")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()

    torch.manual_seed(a.seed)
    tokenizer = AutoTokenizer.from_pretrained(a.base_model)
    policy = AutoModelForCausalLM.from_pretrained(a.base_model)
    ref = AutoModelForCausalLM.from_pretrained(a.base_model)
    value = AutoModelForSequenceClassification.from_pretrained(a.base_model, num_labels=1)
    for m in (policy, ref, value):
        m.config.pad_token_id = tokenizer.pad_token_id
    reward = reward_model_for_trl(a.reward_model)
    queries = json.load(open(a.queries))
    dataset = Dataset.from_dict({"input_ids": queries})
    # TRL 1.12's batch (per process) = per_device_train_batch_size x gradient_accumulation_steps, which num_mini_batches
    # splits into minibatches, each taken per_device_train_batch_size episodes at a time
    micro = a.micro_batch_size or a.batch_size // a.nminibatches
    config = PPOConfig(
        output_dir=a.output_dir, per_device_train_batch_size=micro, gradient_accumulation_steps=a.batch_size // micro,
        num_mini_batches=a.nminibatches, num_ppo_epochs=a.noptepochs, total_episodes=a.total_episodes,
        response_length=a.response_length, temperature=a.temperature, learning_rate=a.lr, kl_coef=a.kl_coef,
        cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=True,
        local_rollout_forward_batch_size=a.rollout_forward_batch_size or a.batch_size, stop_token_id=a.stop_token_id,
        missing_eos_penalty=None if a.stop_token_id is None else 1.0, bf16=a.bf16,
        num_sample_generations=0, gradient_checkpointing=False, report_to=[], save_strategy="no", seed=a.seed,
        use_cpu=not torch.cuda.is_available(), logging_steps=1, lr_scheduler_type="linear", optim="adamw_torch",
        weight_decay=0.0, adam_epsilon=1e-5,
    )
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=value)
    start = time.time()
    trainer.train()
    wall = time.time() - start
    trainer.model.policy.save_pretrained(f"{a.output_dir}/policy")
    tokenizer.save_pretrained(f"{a.output_dir}/policy")
    result = {"system": "trl", "episodes": a.total_episodes, "train_s": wall, "episodes_per_s": a.total_episodes / wall}
    write_result(a.output_dir, result)


if __name__ == "__main__":
    main()

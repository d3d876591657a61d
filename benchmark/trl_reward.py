"""TRL 1.16's RewardTrainer on the same pairwise labels as our train_reward.py in its pairwise setting: run by
benchmark/side_by_side_trl116.py inside its own virtual environment (benchmark/trl116-requirements.txt), never imported
by our code.

    benchmark/.trl116-venv/bin/python benchmark/trl_reward.py --pairs <pairs.json> --output_dir <folder>

The pairs are ours, as token ids: queries left-padded, responses right-padded, pads stripped here; TRL's RewardTrainer
takes query + response ids as they are (chosen_ids / rejected_ids: `_prepare_dataset` in trl/trainer/reward_trainer.py
then neither appends EOS nor tokenizes). The training pairs come in our order (train_sampling_strategy="sequential"),
batch_size pairs per optimizer step, one pass of pairs // batch_size steps. The held-out accuracy is computed as ours
computes it (train_reward.py's `accuracy` / `choice_loss`): the fraction of held-out pairs whose chosen response's
reward is the argmax of the two (a tie counts as right).
"""

import argparse
import json
import time

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

from trl_common import write_result


@torch.no_grad()
def held_out_accuracy(model, pairs: dict, pad: int, batch: int) -> float:
    model.eval()
    correct = []
    for i in range(0, len(pairs["query"]), batch):
        seqs = [[t for t in q + r if t != pad] for part in ("chosen", "rejected")
                for q, r in zip(pairs["query"][i : i + batch], pairs[part][i : i + batch])]
        width = max(len(s) for s in seqs)
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=model.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=model.device)
        rewards = torch.stack(model(input_ids=input_ids, attention_mask=mask).logits[:, 0].chunk(2), 1)  # (b, 2)
        correct += (rewards.argmax(1) == 0).tolist()
    return sum(correct) / len(correct)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", default="data/nano")
    p.add_argument("--pairs", required=True,
                   help='JSON {"train": {"query", "chosen", "rejected"}, "test": {...}}: token lists, train in '
                        'training order')
    p.add_argument("--output_dir", required=True)
    p.add_argument("--batch_size", type=int, default=16, help="pairs per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="annealed linearly to 0")
    p.add_argument("--eps", type=float, default=1e-5, help="Adam epsilon")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(a.base_model)
    pad = tokenizer.pad_token_id
    pairs = json.load(open(a.pairs))
    train = pairs["train"]
    dataset = Dataset.from_dict({part: [[t for t in q + r if t != pad] for q, r in zip(train["query"], train[part])]
                                 for part in ("chosen", "rejected")}).rename_columns({"chosen": "chosen_ids",
                                                                                      "rejected": "rejected_ids"})
    steps = len(dataset) // a.batch_size

    torch.manual_seed(a.seed)
    model = AutoModelForSequenceClassification.from_pretrained(a.base_model, num_labels=1)
    model.config.pad_token_id = pad
    config = RewardConfig(
        output_dir=a.output_dir, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
        max_steps=steps, train_sampling_strategy="sequential", learning_rate=a.lr, lr_scheduler_type="linear",
        warmup_steps=0, optim="adamw_torch", weight_decay=0.0, adam_epsilon=a.eps, max_grad_norm=0.0, max_length=None,
        center_rewards_coefficient=None, disable_dropout=True, bf16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", logging_steps=1, seed=a.seed, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    start = time.time()
    trainer.train()
    wall = time.time() - start
    model = trainer.accelerator.unwrap_model(trainer.model)
    accuracy = held_out_accuracy(model, pairs["test"], pad, a.batch_size)
    model.save_pretrained(f"{a.output_dir}/reward_model")
    tokenizer.save_pretrained(f"{a.output_dir}/reward_model")
    result = {"system": "trl", "trainer": "reward", "pairs": steps * a.batch_size, "train_s": wall,
              "pairs_per_s": steps * a.batch_size / wall,
              "optimizer_steps": trainer.state.global_step, "test_accuracy": accuracy,
              "test_pairs": len(pairs["test"]["query"])}
    write_result(a.output_dir, result)


if __name__ == "__main__":
    main()

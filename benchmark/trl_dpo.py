"""TRL 1.16's DPOTrainer on the same setup as our train_dpo.py's default run: run by benchmark/side_by_side_trl116.py
inside its own virtual environment (benchmark/trl116-requirements.txt), never imported by our code.

    benchmark/.trl116-venv/bin/python benchmark/trl_dpo.py --pairs <pairs.json> --output_dir <folder>

The pairs are ours, as token ids in our training order: queries left-padded, responses right-padded, pads stripped
here. TRL's DPOTrainer takes text only (`_prepare_dataset` in trl/trainer/dpo_trainer.py appends EOS to each response
and tokenizes prompt + response); the subclass below hands its collator our ids unchanged (prompt_ids, chosen_ids,
rejected_ids, the columns that collator reads), so no EOS is added, as in ours. The order is ours
(train_sampling_strategy="sequential"), batch_size pairs per optimizer step as micro_batch_size x gradient accumulation,
one pass of pairs // batch_size steps.
"""

import argparse
import json
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from trl_common import write_result


class DPOTrainerOnIds(DPOTrainer):
    """DPOTrainer whose dataset already holds prompt_ids, chosen_ids and rejected_ids (no EOS appended, no
    tokenizing)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", default="data/nano")
    p.add_argument("--pairs", required=True, help='JSON {"query", "chosen", "rejected"}: token lists in training order')
    p.add_argument("--output_dir", required=True)
    p.add_argument("--batch_size", type=int, default=64, help="pairs per optimizer step")
    p.add_argument("--micro_batch_size", type=int, default=32, help="pairs per forward/backward")
    p.add_argument("--lr", type=float, default=1e-4, help="annealed to 0 by a cosine without warm-up")
    p.add_argument("--eps", type=float, default=1e-5, help="AdamW epsilon")
    p.add_argument("--weight_decay", type=float, default=0.01,
                   help="AdamW weight decay (ours: torch.optim.AdamW's default)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(a.base_model)
    pad = tokenizer.pad_token_id
    pairs = json.load(open(a.pairs))
    strip = lambda rows: [[t for t in row if t != pad] for row in rows]
    dataset = Dataset.from_dict({"prompt_ids": strip(pairs["query"]), "chosen_ids": strip(pairs["chosen"]),
                                 "rejected_ids": strip(pairs["rejected"])})
    steps = len(dataset) // a.batch_size

    torch.manual_seed(a.seed)
    policy = AutoModelForCausalLM.from_pretrained(a.base_model)
    config = DPOConfig(
        output_dir=a.output_dir, per_device_train_batch_size=a.micro_batch_size,
        gradient_accumulation_steps=a.batch_size // a.micro_batch_size, max_steps=steps,
        train_sampling_strategy="sequential", learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=0,
        optim="adamw_torch", weight_decay=a.weight_decay, adam_epsilon=a.eps, max_grad_norm=0.0, beta=a.beta,
        loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=False, disable_dropout=True, bf16=False,
        gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1, seed=a.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )
    trainer = DPOTrainerOnIds(model=policy, args=config, train_dataset=dataset, processing_class=tokenizer)
    start = time.time()
    trainer.train()
    wall = time.time() - start
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(f"{a.output_dir}/policy")
    tokenizer.save_pretrained(f"{a.output_dir}/policy")
    logged = [h for h in trainer.state.log_history if "loss" in h]
    result = {"system": "trl", "trainer": "dpo", "pairs": steps * a.batch_size, "train_s": wall,
              "pairs_per_s": steps * a.batch_size / wall,
              "optimizer_steps": trainer.state.global_step, "loss_last_step": logged[-1]["loss"] if logged else None}
    write_result(a.output_dir, result)


if __name__ == "__main__":
    main()

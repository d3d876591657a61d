"""TRL 1.16's RLOOTrainer or GRPOTrainer on the same setup as our train_rloo.py --advantage rloo / grpo: run by
benchmark/side_by_side_trl116.py inside its own virtual environment (benchmark/trl116-requirements.txt), never imported
by our code.

    benchmark/.trl116-venv/bin/python benchmark/trl_critic_free.py --trainer rloo --reward_model <folder> \
        --queries <queries.json> --output_dir <folder>
    benchmark/.trl116-venv/bin/python benchmark/trl_critic_free.py --trainer grpo --verifier arithmetic \
        --base_model <SFT model> --queries <problems.json> --output_dir <folder> ...   # RL with verifiable rewards

What TRL gets, and how (trl/trainer/{rloo,grpo}_trainer.py of trl 1.16.0):
  * the prompts: TRL takes text prompts and tokenizes them itself (`_tokenize_prompts`); the subclasses below return our
    own query token ids for each prompt instead (left pads stripped; TRL left-pads a batch to its longest prompt), in
    our order (shuffle_dataset=False: RepeatSampler then walks the dataset in order, batch_size / k prompts per update);
  * the reward: our reward model folder becomes a GPT2ForSequenceClassification (as trl_ppo.py converts it); with
    --reward_input ids (the default) a reward function scores the exact query + response token ids with it; with
    --reward_input text TRL's own path scores it on prompt + completion text, which it decodes (dropping special tokens
    such as a sampled <|endoftext|>) and re-tokenizes;
  * the verifier (--verifier arithmetic, RL with verifiable rewards): the reward function is our own check_answers,
    imported from train_policy.py (the code train_rloo.py --verifier runs), on the problem's query ids and the
    completion ids TRL passes (cut after the first EOS); the response stops at EOS on both sides, as ours with
    --truncate_token eos --mask_after_truncate. The pad token is made impossible in sampling and in every log-prob
    (policy, old and reference), as ours makes it (train_policy.sampling_logits): a bias of -1e9 on its logit in the LM
    head of TRL's policy and reference (forbid_token), which TRL's generation and its fused log-prob head both add.
    Forbidding it in sampling alone (suppress_tokens, as the reward-model runs here do) leaves it a token the samples
    never show but the log-probs count: on this task, where most answers are wrong and pushed down, TRL's GRPO moved
    the probability there (its KL reached 31 nats per token by update 16 and the reward fell to 0, seed 1);
  * with a reward model, no stop at EOS: TRL always stops at and cuts after the tokenizer's EOS (`eos_token_ids` in
    __init__, `_generate_single_turn`) and has no option to turn that off. Here the pad token, which the sampler may
    never draw (suppress_tokens, as our sampler forbids it), is made the only stop token, so every response has
    exactly max_completion_length tokens, as ours;
  * one update = batch_size episodes (batch_size / k prompts x k) sampled at once (steps_per_generation = nminibatches),
    nminibatches optimizer steps of batch_size / nminibatches episodes (gradient_accumulation_steps 1), noptepochs
    passes (num_iterations): TRL splits a batch into minibatches once (shuffled) and reuses the same split every pass.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from trl_common import reward_model_for_trl, write_result

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_policy as tp  # noqa: E402  (the verifier: train_policy.check_answers, the code ours runs)


def with_our_prompt_ids(trainer_class, ids_of: dict):
    """trainer_class whose prompts are tokenized as ids_of[prompt text] (our query ids) instead of by the tokenizer."""

    class Trainer(trainer_class):
        def _tokenize_prompts(self, prompts: list):
            return [list(ids_of[p]) for p in prompts], None, {}

    return Trainer


def reward_on_ids(model, ids_of: dict, pad_token_id: int):
    """A TRL reward function: the model's score of query ids + completion ids, right-padded (the score read at the last
    real token, as ours reads it)."""

    @torch.inference_mode()
    def reward_model(prompts, completions, completion_ids, **kwargs):
        seqs = [list(ids_of[p]) + list(c) for p, c in zip(prompts, completion_ids)]
        width = max(len(s) for s in seqs)
        input_ids = torch.tensor([s + [pad_token_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        return model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist()

    return reward_model


def reward_of_verifier(name: str, ids_of: dict, tokenizer):
    """A TRL reward function: train_policy.check_answers (VERIFIERS[name], as train_rloo.py --verifier calls it) on
    each prompt's query ids, left-padded, and its completion ids, right-padded; TRL's completion ids end at the first
    EOS, so an answer ended if it holds the EOS, and is cut off otherwise."""
    pad = tokenizer.pad_token_id

    def verifier(prompts, completions, completion_ids, **kwargs):
        width_q = max(len(ids_of[p]) for p in prompts)
        width_r = max(len(c) for c in completion_ids)
        queries = torch.tensor([[pad] * (width_q - len(ids_of[p])) + list(ids_of[p]) for p in prompts])
        responses = torch.tensor([list(c) + [pad] * (width_r - len(c)) for c in completion_ids])
        return tp.check_answers(name, queries, responses, tokenizer)["correct"].tolist()

    return verifier


def forbid_token(model, token_id: int):
    """Make token_id impossible in model's logits, in generation and in TRL's fused log-prob head alike: its LM head
    gets a bias (a buffer, not saved) of 0 everywhere and -1e9 at token_id."""
    head = model.get_output_embeddings()
    if head.bias is not None:
        raise SystemExit("forbid_token: the LM head already has a bias")
    bias = torch.zeros(head.weight.shape[0], dtype=head.weight.dtype, device=head.weight.device)
    del head.bias
    head.register_buffer("bias", bias.index_fill(0, torch.tensor([token_id]), -1e9), persistent=False)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer", choices=["rloo", "grpo"], required=True)
    p.add_argument("--base_model", default="data/nano")
    p.add_argument("--reward_model", help="our reward model folder (train_reward.py's reward_model/)")
    p.add_argument("--verifier", choices=sorted(tp.VERIFIERS),
                   help="instead of a reward model, our verifier (train_policy.VERIFIERS); the response stops at EOS")
    p.add_argument("--queries", required=True,
                   help="JSON list of left-padded query token lists, one per prompt, in training order")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--total_episodes", type=int, default=2560)
    p.add_argument("--batch_size", type=int, default=64, help="episodes per update (batch_size / k prompts)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt (TRL: num_generations)")
    p.add_argument("--nminibatches", type=int, default=2)
    p.add_argument("--noptepochs", type=int, default=2, help="TRL: num_iterations")
    p.add_argument("--response_length", type=int, default=24, help="TRL: max_completion_length")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--eps", type=float, default=1e-5, help="Adam epsilon")
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--cliprange", type=float, default=0.2, help="TRL: epsilon")
    p.add_argument("--max_grad_norm", type=float, default=0.0,
                   help="gradient clipping (0: none, as ours; TRL's own default is 1.0)")
    p.add_argument("--reward_input", choices=["ids", "text"], default="ids")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    if (a.reward_model is None) == (a.verifier is None):
        p.error("give one of --reward_model and --verifier")

    tokenizer = AutoTokenizer.from_pretrained(a.base_model)
    pad = tokenizer.pad_token_id
    queries = json.load(open(a.queries))[: a.total_episodes // a.k]
    if len(queries) * a.k != a.total_episodes or a.total_episodes % a.batch_size:
        raise SystemExit(f"--total_episodes {a.total_episodes} needs {a.total_episodes // a.k} queries (has "
                         f"{len(queries)}) "
                         f"and a multiple of --batch_size {a.batch_size}")
    ids_of, texts = {}, []
    for q in queries:
        ids = [t for t in q if t != pad]
        text = tokenizer.decode(ids)
        if ids_of.setdefault(text, ids) != ids:
            raise SystemExit(f"two different queries decode to the same text {text!r}")
        texts.append(text)
    dataset = Dataset.from_dict({"prompt": texts})

    torch.manual_seed(a.seed)
    policy = AutoModelForCausalLM.from_pretrained(a.base_model)
    if a.verifier:
        reward_funcs, reward_tokenizers = reward_of_verifier(a.verifier, ids_of, tokenizer), None
    elif a.reward_input == "ids":
        reward = reward_model_for_trl(a.reward_model)
        reward_funcs, reward_tokenizers = reward_on_ids(reward, ids_of, pad), None
    else:
        reward_funcs = reward_model_for_trl(a.reward_model)
        reward_tokenizers = AutoTokenizer.from_pretrained(a.reward_model)
    common = dict(
        output_dir=a.output_dir, per_device_train_batch_size=a.batch_size // a.nminibatches,
        gradient_accumulation_steps=1, steps_per_generation=a.nminibatches, num_generations=a.k,
        num_iterations=a.noptepochs, max_completion_length=a.response_length, temperature=a.temperature, top_p=1.0,
        top_k=0, generation_kwargs={} if a.verifier else {"eos_token_id": pad, "suppress_tokens": [pad]},
        shuffle_dataset=False,
        num_train_epochs=1, learning_rate=a.lr, lr_scheduler_type="linear", warmup_steps=0, optim="adamw_torch",
        weight_decay=0.0, adam_epsilon=a.eps, max_grad_norm=a.max_grad_norm, beta=a.beta, epsilon=a.cliprange,
        disable_dropout=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=1, seed=a.seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )
    if a.trainer == "rloo":
        config, trainer_class = RLOOConfig(**common, normalize_advantages=False), RLOOTrainer
    else:  # ours: group-std scaling, k3 KL in the loss (no importance weight on it), per-response token mean
        config, trainer_class = GRPOConfig(**common, loss_type="grpo", scale_rewards="group",
                                           use_bias_correction_kl=False, importance_sampling_level="token"), GRPOTrainer
    if a.verifier:
        forbid_token(policy, pad)
    trainer = with_our_prompt_ids(trainer_class, ids_of)(
        model=policy, reward_funcs=reward_funcs, args=config, train_dataset=dataset, processing_class=tokenizer,
        reward_processing_classes=reward_tokenizers)
    if a.verifier:
        forbid_token(trainer.ref_model, pad)  # TRL loads the reference from the model's path
    else:
        trainer.eos_token_ids = [pad]  # the only "EOS" is the pad, never sampled: no cut after <|endoftext|>
    start = time.time()
    trainer.train()
    wall = time.time() - start
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(f"{a.output_dir}/policy")
    tokenizer.save_pretrained(f"{a.output_dir}/policy")
    steps = [h for h in trainer.state.log_history if "completions/min_length" in h]
    result = {"system": "trl", "trainer": a.trainer, "episodes": a.total_episodes, "train_s": wall,
              "episodes_per_s": a.total_episodes / wall,
              "optimizer_steps": trainer.state.global_step,
              "completion_min_length": min(h["completions/min_length"] for h in steps),
              "kl_last_step": steps[-1].get("kl")}
    write_result(a.output_dir, result)


if __name__ == "__main__":
    main()

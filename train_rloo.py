"""Critic-free RL against a learned reward model, beside train_policy.py's PPO: RLOO, GRPO, Dr. GRPO, online best-of-n.

    python train_rloo.py --reward_model runs/<reward run>/reward_model         # RLOO, the embedded world (CPU, minutes)
    python train_rloo.py --advantage grpo --reward_model ...                   # GRPO (dr_grpo, best_of_n likewise)
    accelerate launch --num_processes 8 train_rloo.py tldr --reward_model models/rm_tldr   # TRL's RLOO TL;DR values

Every update samples k responses for each of batch_size / k prompts and scores them with the reward model. No value
model: each sample's advantage is its reward against the other samples of its prompt, which is what the four methods
share; they differ in the baseline, the scaling, where the KL penalty goes and the loss (the `advantages_of` and
`policy_loss` functions below, each with its paper). Sampling, truncation, the EOS trick, the reference baseline, the
reward model, checkpoints, --resume and DeepSpeed are train_policy.py's (the reward model train_reward.py's), copied
({OAI} stands for https://github.com/openai/lm-human-preferences/blob/cbfd210bb8b08f6bc5c26878c10984b90f516c66, {SFD}
for https://github.com/vwxyzjn/summarize_from_feedback_details/blob/ee77a9abc31f5338365ee087945c5bcafac7f1ca). Metrics
carry PPO's names where they mean the same (objective/kl, objective/scores, objective/gold_score, objective/entropy).
Tensor shapes: b = episodes on this process (b / k prompts), Q = query_length, R = response_length.
"""

import collections
import copy
import functools
import gzip
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn
import tyro
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GgufConfig, StaticCache
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.integrations import unset_hf_deepspeed_config
from transformers.pytorch_utils import Conv1D


@dataclass
class Args:
    # ---- task and data (as train_policy.py) ----
    base_model: str = "data/nano"
    """initial policy and reference model: hub id, local folder or .gguf file"""
    reward_model: Optional[str] = None
    """folder written by train_reward.py (its run folder's reward_model/)"""
    verifier: Optional[Literal["arithmetic"]] = None
    """instead of a reward model, a program that checks each answer (RL with verifiable rewards): arithmetic scores 1
    for the right sum of a data/arithmetic problem and 0 otherwise (arithmetic_verifier); queries are problems"""
    format_reward: float = 0.0
    """with --verifier: added to the score of every well-formed answer (one "Answer: N" at the end), right or wrong"""
    query_dataset: str = "data/corpus.jsonl.gz"
    """queries: books texts (a .jsonl(.gz) of JSON strings or of {"text": ...}, or a hub dataset with a text column),
    TL;DR posts with reference summaries (a .jsonl(.gz) of {subreddit, title, post, summary}, or a hub dataset), or a
    verifiable task's problems (a .jsonl(.gz) of {"problem": ...}, data/arithmetic/)"""
    query_split: str = "train"
    """split of a hub query dataset"""
    query_length: int = 32
    """query tokens, left-padded (formatted as train_policy.py formats them)"""
    response_length: int = 24
    """tokens sampled per response (always all of them: no stop at EOS)"""
    truncate_token: Optional[str] = None
    """cut each response after the first occurrence of this token at or after truncate_after before scoring (OAI: '.';
    SFD: "eos"); None keeps it whole"""
    truncate_after: int = 16
    """responses are cut no earlier than this index; one with no truncate_token from here on scores the penalty"""
    penalty_reward_value: float = -1.0
    """score of a response that has no truncate_token at or after truncate_after"""
    mask_after_truncate: bool = False
    """SFD's EOS trick: what follows the truncate token leaves the loss and the KL"""
    reference_baseline: bool = False
    """trlX: the score is r(query, response) - r(query, reference summary) (TL;DR queries, which carry references)"""

    # ---- sampling ----
    temperature: float = 0.7
    """sampling temperature; every log-probability is computed from logits divided by it"""

    # ---- the estimator and its update ----
    advantage: Literal["rloo", "grpo", "dr_grpo", "best_of_n"] = "rloo"
    """rloo: reward minus the mean of the prompt's other k - 1 rewards, KL in the reward, sequence-level loss (Ahmadian
    et al. 2024); grpo: (reward - group mean) / group std, token-level clipped loss with the k3 KL as a loss term,
    averaged per response (Shao et al. 2024); dr_grpo: GRPO without the std and with a constant length normalisation
    (Liu et al. 2025); best_of_n: the log-likelihood of each prompt's best sample (RAFT / ReST's simplest form)"""
    k: int = 4
    """samples per prompt (TRL: RLOO 2, GRPO 8)"""
    cliprange: float = 0.2
    """clip of the probability ratio when a batch is used more than once (sequence ratio for rloo, token ratio for grpo
    and dr_grpo; best_of_n does not clip)"""
    total_episodes: int = 2560
    """episodes (query, response pairs) in all, k per prompt; updates = total_episodes / batch_size"""
    batch_size: int = 64
    """episodes per update (batch_size / k prompts), summed over all processes"""
    nminibatches: int = 2
    """minibatches per epoch (each one optimizer step)"""
    noptepochs: int = 2
    """epochs over each batch, reshuffled every epoch"""
    local_micro_batch_size: int = 32
    """episodes per forward/backward on one process (a multiple of k: whole prompts); accumulated to a minibatch"""
    tis_cap: Optional[float] = None
    """truncated importance sampling (Yao et al. 2025): the ratio's old log-probs come from a training forward of the
    batch before the update, and each loss is weighted by min(pi_train / pi_sampler, tis_cap), detached: per token for
    grpo and dr_grpo, per response (the product over its tokens) for rloo and best_of_n; None: off"""
    lr: float = 5e-5
    """Adam learning rate at the first update, annealed linearly to 0 at the last"""
    eps: float = 1e-5
    """Adam epsilon"""
    optimizer: Literal["adam_tf", "adam_pytorch", "adamw"] = "adam_tf"
    """adam_tf: TF1's Adam (epsilon-hat, as OAI ran); adam_pytorch: torch.optim.Adam; adamw: torch.optim.AdamW"""
    max_grad_norm: float = float("inf")
    """clip each optimizer step's global gradient norm to this; inf: no clipping, as OAI's code (TRL's trainers clip at
    1.0 by default). The norm before clipping is logged either way (policy/grad_norm)"""

    # ---- KL penalty ----
    beta: float = 0.05
    """KL coefficient: in the reward, per response (rloo; best_of_n picks by that reward), or the k3 estimator as a loss
    term per token (grpo, dr_grpo). TRL: RLOO 0.05, GRPO 0.0"""
    loss_aggregation: Optional[Literal["token", "sequence", "constant"]] = None
    """how grpo's and dr_grpo's token losses become one: token, the sum over the minibatch's valid tokens divided by
    their count over every micro-batch and process (DAPO; TRL's default); sequence, each response's mean, then the
    mean (GRPO); constant, each response's sum divided by response_length, then the mean (Dr. GRPO). Unset: the
    estimator's own (grpo sequence, dr_grpo constant)"""
    kl_estimator: Optional[Literal["k1", "k2", "k3"]] = None
    """per-token KL estimate, d = logp - logp_ref: k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1 (see kl_estimate); unset,
    the estimator's own: k1 for rloo and best_of_n, k3 for grpo and dr_grpo"""
    kl_in: Optional[Literal["reward", "loss"]] = None
    """where the KL goes: each response's reward (its summed estimate), or the loss (grpo and dr_grpo: per token with
    the clipped term; rloo and best_of_n: the mean over responses of the summed estimate); unset, the estimator's
    own: the reward for rloo and best_of_n, the loss for grpo and dr_grpo"""

    # ---- experiment ----
    exp_name: str = "rloo"
    """name of the experiment; the run folder is runs/<exp_name>__<seed>__<unix time>"""
    seed: int = 1
    """seed; process r samples and shuffles with seed + r * 100003, as OAI's set_mpi_seed"""
    track: bool = False
    """log to Weights & Biases (set WANDB_MODE=offline to log without a network)"""
    wandb_project_name: str = "lm-human-preferences-torch"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team); None uses your default"""
    run_root: str = "runs"
    """folder that holds the run folders"""
    save_every: int = 10
    """write a checkpoint every this many updates (0: only when SIGTERM or SIGINT stops the run)"""
    keep_checkpoints: int = 2
    """checkpoints kept in <run folder>/checkpoints; older ones are deleted"""
    resume: Optional[str] = None
    """run folder to continue from its last checkpoint, with the arguments it started with (args.json); no other flag"""

    # ---- logging and evaluation ----
    gold_labeler: Literal["vader", "tldr_judge", "none"] = "vader"
    """programmatic labeler whose score of every sample is logged as objective/gold_score (as train_policy.py)"""
    eval_dataset: Optional[str] = None
    """held-out TL;DR posts: ROUGE, win rate against the reference and gold every eval_every updates; with --verifier,
    held-out problems: pass@1, the share of right answers"""
    eval_split: str = "validation"
    """split of a hub eval_dataset"""
    num_eval: int = 64
    """held-out posts per evaluation (the same ones every time)"""
    eval_every: int = 10
    """evaluate every this many updates, and after the last"""
    eval_temperature: float = 0.01
    """sampling temperature of the evaluation (SFD: 0.01)"""
    print_sample_every: int = 10
    """print a table of samples every this many updates"""
    num_print_samples: int = 3
    """rows of that table"""

    # ---- LoRA (peft) ----
    lora_r: int = 0
    """rank of the LoRA adapters put on the language model's layers (0: no LoRA, every weight trains)"""
    lora_alpha: float = 16.0
    """LoRA's scale numerator: the adapters' update is multiplied by lora_alpha / lora_r"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input"""
    lora_target_modules: str = "all-linear"
    """layers that get adapters: comma-separated module names, or all-linear"""
    load_in_4bit: bool = False
    """QLoRA: the frozen base weights quantized to 4-bit NF4 by bitsandbytes (a CUDA GPU only; needs --lora_r)"""

    # ---- speed ----
    mixed_precision: Literal["no", "bf16"] = "no"
    """bf16: every forward multiplies in bf16, the frozen reference and reward models are kept in bf16; log-probs,
    losses and Adam's state stay fp32. The sampler's log-probs then differ from the training forward's (TRL's RLOO blog
    warns of it): the first epoch's ratio is not exactly 1"""
    local_rollout_forward_batch_size: int = 64
    """episodes per forward pass of the reference and reward models on one process (a multiple of k)"""


# ---------------------------------------------------------------------------------------------------------
# A rollout, with PPO's pieces (copied): sampling, log-probs at the temperature, the frozen reference, truncation and
# masks; then RLOO's own forward pass, which runs each prompt once for its k samples
# ---------------------------------------------------------------------------------------------------------


# Copied from train_policy.py
def model_inputs(tokens: torch.Tensor, pad_token_id: int) -> dict:
    """Pads are masked out and each real token's position counts only the real tokens before it, so that padding (left
    or right) never changes a real token's output. {OAI}/lm_human_preferences/language/model.py#L265-L269"""
    mask = tokens != pad_token_id
    return dict(input_ids=tokens, attention_mask=mask.long(), position_ids=(mask.cumsum(1) - 1).clamp(min=0))


# Copied from train_policy.py
def sampling_logits(logits: torch.Tensor, temperature: float, pad_token_id: int) -> torch.Tensor:
    """Logits divided by the temperature, in sampling and in every later log-prob, and the pad token made
    impossible (OAI slices its special tokens off the logits). {OAI}/lm_human_preferences/policy.py#L58-L59"""
    logits = logits.float() / temperature  # a new tensor, so the pad's column is filled in place (no (b, R, V) copy)
    return logits.index_fill_(-1, torch.tensor([pad_token_id], device=logits.device), -1e9)


# Copied from train_policy.py
def sample_token(probs: torch.Tensor) -> torch.Tensor:
    """(b, 1) token ids drawn from (b, V) probabilities by inverting the CDF with one uniform per row. The same
    distribution as torch.multinomial(probs, 1), which draws V exponentials per row instead (7 of the 35 ms of a
    64 x 4096 sampling step on two CPU cores). A zero-probability token (the pad) is never drawn."""
    cdf = probs.cumsum(-1)  # (b, V)
    u = torch.rand(len(probs), 1, device=probs.device) * cdf[:, -1:]  # (b, 1), uniform on [0, total mass)
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1)


# Copied from train_policy.py
class Sampler:
    """Fixed-length sampling as OAI's sampler: R = response_length tokens drawn one by one at `temperature` (top_k 0,
    top_p 1, no stop at EOS, so every response has exactly R tokens). With each token it returns its log-prob, the
    entropy of the distribution it was drawn from and, given a value head, the value of the state before it, all
    computed at the step itself, as OAI's sampler returns log-probs and values: no (b, R, V) logits are kept.
    {OAI}/lm_human_preferences/language/sample.py#L24-L43

    The KV cache is pre-allocated (a StaticCache of Q + R positions, reused from call to call), so every decoding step
    has the same shapes and addresses: with compile=True the step is compiled once, as a CUDA graph on a GPU, which
    removes the per-step launch and Python overhead that dominates sampling with a small model."""

    def __init__(self, lm, pad_token_id: int, temperature: float, compile: bool = False):
        self.lm, self.pad_token_id, self.temperature = lm, pad_token_id, temperature
        self.cache, self.cache_shape = None, None
        self.step = torch.compile(self.forward, mode="reduce-overhead", dynamic=False) if compile else self.forward

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> tuple:
        """(logits (b, V), hidden state after the final layer norm (b, d)) at the last of the (b, t) `tokens`, whose
        keys and values are appended to the cache. `mask` (b, Q+R) covers every slot of the cache."""
        out = self.lm(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                      use_cache=True, output_hidden_states=True, logits_to_keep=1)
        return out.logits[:, -1], out.hidden_states[-1][:, -1]

    @torch.no_grad()
    def __call__(self, queries: torch.Tensor, response_length: int, value_head=None) -> tuple:
        """(tokens, log-probs, entropies, values or None), each (b, R), for (b, Q) left-padded queries."""
        b, Q = queries.shape
        if self.cache_shape != (b, Q + response_length):
            self.cache = StaticCache(config=self.lm.config, max_cache_len=Q + response_length)
            self.cache_shape = (b, Q + response_length)
        else:
            self.cache.reset()
        inputs = model_inputs(queries, self.pad_token_id)
        # one mask over all Q + R cache slots for every step: response slots are real tokens, and the causal mask hides
        # those not written yet
        mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(b, response_length)], 1)
        position = inputs["position_ids"][:, -1:]  # (b, 1)
        logits, hidden = self.forward(queries, mask, inputs["position_ids"])  # the prompt, in one uncompiled pass
        tokens, logprobs, entropies, values = [], [], [], []
        for t in range(response_length):
            logp = torch.log_softmax(sampling_logits(logits, self.temperature, self.pad_token_id), -1)  # (b, V), fp32
            probs = logp.exp()
            tokens.append(sample_token(probs))  # (b, 1)
            logprobs.append(logp.gather(1, tokens[-1]))
            entropies.append(-(probs * logp).sum(-1, keepdim=True))
            if value_head is not None:
                values.append(value_head(hidden).float())  # (b, 1): the value of the state before token t
            if t + 1 < response_length:
                position = position + 1
                logits, hidden = self.step(tokens[-1], mask, position)
        values = torch.cat(values, 1) if value_head is not None else None
        return torch.cat(tokens, 1), torch.cat(logprobs, 1), torch.cat(entropies, 1), values


# Copied from train_policy.py
def response_logits(lm, tokens: torch.Tensor, pad_token_id: int, response_length: int) -> torch.Tensor:
    """(b, R, V) logits that predict the R response tokens of (b, Q+R) query+response tokens. The output projection
    (d x V, the largest matmul of a small model) runs on these R positions only, not on the Q query positions."""
    return lm(**model_inputs(tokens, pad_token_id), logits_to_keep=response_length + 1).logits[:, :-1]


# Copied from train_policy.py
def response_logprobs(logits: torch.Tensor, responses: torch.Tensor, temperature: float, pad_token_id: int,
                      entropy: bool = True) -> tuple:
    """(log-probs (b, R) of the response tokens, entropies (b, R) or None) from the (b, R, V) logits that predict them.
    The entropy is a statistic, not part of any loss: it is computed outside the autograd graph, and not at all with
    entropy=False (the reference's log-probs), which saves two passes over the (b, R, V) log-probs.
    {OAI}/lm_human_preferences/policy.py#L114-L126"""
    logp = torch.log_softmax(sampling_logits(logits, temperature, pad_token_id), -1)  # (b, R, V)
    logprobs = logp.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return logprobs, None
    with torch.no_grad():
        return logprobs, -(logp.exp() * logp).sum(-1)


# Copied from train_policy.py
class FrozenReference:
    """The frozen initial policy that KL penalties and DPO's log-ratios are measured against: a copy of the policy's
    model made before training (kept in bf16 under --mixed_precision bf16; sharded under ZeRO-3: place_frozen), or,
    under LoRA, the policy's own model with its adapters turned off, which is the initial model without a second copy in
    memory."""

    def __init__(self, lm, lora, accelerator, dtype):
        self.lora = lora
        self.lm = lm if lora is not None else place_frozen(copy.deepcopy(lm), accelerator, dtype)

    @torch.no_grad()
    def __call__(self, *inputs, logits_fn=None) -> torch.Tensor:
        """(b, R, V) logits of R response tokens from the reference's model: logits_fn(lm, *inputs), by default
        response_logits(lm, tokens, pad_token_id, response_length) of (b, Q+R) query+response tokens."""
        with self.lora.disable_adapter() if self.lora is not None else nullcontext():
            return (logits_fn or response_logits)(self.lm, *inputs)


# Copied from train_policy.py
def truncate_responses(responses: torch.Tensor, truncate_token: int, truncate_after: int,
                       pad_token_id: int) -> torch.Tensor:
    """Replace every token after the first truncate_token at or after index truncate_after with the pad token.
    {OAI}/lm_human_preferences/lm_tasks.py#L39-L50"""
    hit = responses == truncate_token
    hit[:, :truncate_after] = False
    after = (hit.long().cumsum(1) - hit.long()).bool()  # strictly after the first hit
    return responses.masked_fill(after, pad_token_id)


# Copied from train_policy.py
def penalize(scores: torch.Tensor, responses: torch.Tensor, truncate_token: int, truncate_after: int,
             penalty: float) -> torch.Tensor:
    """A response with no truncate_token at or after truncate_after gets `penalty` instead of its score.
    {OAI}/lm_human_preferences/lm_tasks.py#L58-L65 and {OAI}/lm_human_preferences/train_policy.py#L384-L390"""
    valid = (responses[:, truncate_after:] == truncate_token).any(1)
    return torch.where(valid, scores, torch.full_like(scores, penalty))


# Copied from train_policy.py
def response_masks(truncated: torch.Tensor, pad_token_id: int, mask_after_truncate: bool) -> tuple:
    """(valid (b, R), value_valid (b, R), score index (b,)) for (b, R) truncated responses. OAI trains on whole
    responses: everything valid, the score at the last token. SFD masks what follows the truncate token: log-probs are
    valid up to it, values one position further, and the score goes one position after it (or on it, when it is the last
    token). {SFD}/summarize_from_feedback_details/ppo.py#L669-L685"""
    R = truncated.shape[1]
    if not mask_after_truncate:
        valid = torch.ones_like(truncated, dtype=torch.bool)
        return valid, valid, torch.full((len(truncated),), R - 1, device=truncated.device)
    last = (truncated != pad_token_id).sum(1) - 1  # (b,): the truncate token, or R - 1 (sampled responses hold no pads)
    idx = torch.arange(R, device=truncated.device)
    return idx <= last[:, None], idx <= last[:, None] + 1, torch.where(last + 1 < R, last + 1, last)


# Copied from train_policy.py
def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid elements. {SFD}/summarize_from_feedback_details/ppo.py#L208-L213"""
    return (values * valid).sum() / valid.sum()


# Copied from train_policy.py
def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from a token sampled from pi, with d = logp - logp_ref (Schulman 2020,
    http://joschu.net/blog/kl-approx.html); each (b, R). Which is unbiased, in value and as a gradient (Liu et al. 2025,
    https://arxiv.org/abs/2510.01555; tests/test_pitfalls.py computes it exactly):
    - k1 = d: unbiased in value; in the reward (OAI) its policy gradient is the reverse KL's; as a loss its expected
      gradient is zero;
    - k2 = d^2 / 2: biased in value; as a loss its gradient is the reverse KL's, as k1's in the reward;
    - k3 = exp(-d) + d - 1: unbiased in value and never negative; as a loss (GRPO) its gradient is KL(ref || pi)'s,
      the other direction."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    delta = ref_logprobs - logprobs
    return delta.exp() - delta - 1


@contextmanager
def output_rows(lm, keep: Optional[torch.Tensor]):
    """Within it the model's output layer (d x V) sees only the positions where keep (b, T) is True: the model's logits
    come back (N, V), N = keep.sum(), in the order of x[keep], for (b, T) inputs (keep None: all, (b, T, V)). A position
    that no loss reads (after a response's EOS under SFD's mask) then costs no output projection and no pass over V,
    which with a small model and a 4096-token vocabulary is a fifth of a training step."""
    if keep is None:
        yield
        return
    head = getattr(lm, "module", lm).get_output_embeddings()  # under DDP or a DeepSpeed engine, the model inside
    handle = head.register_forward_pre_hook(lambda module, inputs: (inputs[0][keep], *inputs[1:]))
    try:
        yield
    finally:
        handle.remove()


def shared_prompt_logprobs(lm, prompts: torch.Tensor, responses: torch.Tensor, pad_token_id: int, temperature: float,
                           keep: Optional[torch.Tensor] = None, entropy: bool = True) -> tuple:
    """(log-probs (b, R), entropies (b, R) or None) of b = n k responses, k to each of the n (n, Q) left-padded prompts
    in order (the rows of prompts.repeat_interleave(k, 0)): response_logprobs of response_logits of the concatenated
    rows, with each prompt run through the model once instead of k times. Its keys and values (a DynamicCache of
    attention layers, gradients flowing back through it) are repeated k times and the responses attend to them, at the
    positions and under the mask model_inputs gives the whole row: the same log-probs and gradients (without dropout,
    which would draw one mask per prompt). At Q 32, R 24, k 4 the layers see 16 x 32 + 64 x 23 tokens instead of
    64 x 56, 45% fewer, in the update and the reference's pass. (TRL's trainers run every row whole; vLLM's prefix cache
    shares a prompt in sampling only.) With keep (b, R), only the kept positions (the tokens the loss reads: `valid`)
    go through the output layer and the softmax (output_rows); the others get 0."""
    n, k = len(prompts), len(responses) // len(prompts)
    if n * k != len(responses):
        raise ValueError(f"{len(responses)} responses are not k per prompt for {n} prompts")

    def at_kept(logits: torch.Tensor, tokens: torch.Tensor, kept: Optional[torch.Tensor]) -> tuple:
        """(b, c) log-probs and entropies of (b, c) tokens from the logits of the kept positions ((N, V); kept None:
        all, (b, c, V)), 0 where not kept."""
        if kept is None:
            return response_logprobs(logits, tokens, temperature, pad_token_id, entropy)
        values = response_logprobs(logits, tokens[kept], temperature, pad_token_id, entropy)  # (N,), (N,) or None
        return tuple(v if v is None else v.new_zeros(kept.shape).masked_scatter(kept, v) for v in values)

    inputs = model_inputs(prompts, pad_token_id)
    head = lm(**inputs, use_cache=True, logits_to_keep=1)  # logits (n, 1, V) predict each response's first token
    first = head.logits.repeat_interleave(k, 0)  # (b, 1, V)
    outputs = [at_kept(first, responses[:, :1], None) if keep is None else
               at_kept(first[:, 0][keep[:, 0]], responses[:, :1], keep[:, :1])]
    if responses.shape[1] > 1:
        cache = head.past_key_values
        cache.batch_repeat_interleave(k)  # (n, heads, Q, d) keys and values -> (b, heads, Q, d)
        real = (responses != pad_token_id).long()  # (b, R)
        mask = torch.cat([inputs["attention_mask"].repeat_interleave(k, 0), real], 1)  # (b, Q + R)
        # (b, R): each response token's position, counted on from the prompt's last
        positions = inputs["position_ids"][:, -1:].repeat_interleave(k, 0) + real.cumsum(1)
        rest_kept = None if keep is None else keep[:, 1:]
        with output_rows(lm, rest_kept):  # the response's own tokens predict the ones after them
            rest = lm(input_ids=responses[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                      past_key_values=cache).logits  # (b, R - 1, V), or (N, V) of the kept positions
        outputs.append(at_kept(rest, responses[:, 1:], rest_kept))
    logprobs, entropies = zip(*outputs)
    return torch.cat(logprobs, 1), None if not entropy else torch.cat(entropies, 1)


# ---------------------------------------------------------------------------------------------------------
# The estimators (pure functions). Rewards and advantages are (b,) with each prompt's k samples consecutive.
# ---------------------------------------------------------------------------------------------------------


def kl_placement(advantage: str, kl_estimator: Optional[str], kl_in: Optional[str]) -> tuple:
    """(estimator, where) of the KL penalty: the flags where given, else the estimator's own: k1 in the reward for rloo
    and best_of_n (Ahmadian et al. 2024, section 3, https://arxiv.org/abs/2402.14740), k3 in the loss for grpo and
    dr_grpo (Shao et al. 2024, eq. 3-4, https://arxiv.org/abs/2402.03300)."""
    own_estimator, own_place = ("k3", "loss") if advantage in ("grpo", "dr_grpo") else ("k1", "reward")
    return kl_estimator or own_estimator, kl_in or own_place


def sequence_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, valid: torch.Tensor,
                     kl_estimator: str, kl_in: str, beta: float) -> torch.Tensor:
    """(b,) rewards the advantages are built from: score - beta * the summed per-token KL estimate over the valid
    tokens when the KL is in the reward (rloo and best_of_n by default: k1, sum_t log pi - log ref); the bare score
    when it is a loss term (grpo and dr_grpo by default)."""
    if kl_in == "loss":
        return scores
    return scores - beta * (kl_estimate(logprobs, ref_logprobs, kl_estimator) * valid).sum(1)


def same_reward_share(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """The share of prompts whose k samples all got the same reward: their advantages are 0 under every estimator here
    (a 0/1 verifier's groups that all failed or all passed), so they add nothing to the gradient but the KL's."""
    r = rewards.view(-1, k)
    return (r == r[:, :1]).all(1).float().mean()


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Each reward minus the mean of the other k - 1 rewards of its prompt (the leave-one-out baseline: unbiased, since
    it does not depend on the sample itself). Ahmadian et al. 2024, eq. 7, https://arxiv.org/abs/2402.14740"""
    r = rewards.view(-1, k)  # (prompts, k)
    return (r - (r.sum(1, keepdim=True) - r) / (k - 1)).flatten()


def grpo_advantages(rewards: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """(reward - group mean) / (group std + eps), the std unbiased as torch's and TRL's; 0 for a group of one sample or
    of equal rewards (nothing to prefer). Shao et al. 2024, section 4.1.2, https://arxiv.org/abs/2402.03300"""
    r = rewards.view(-1, k)
    std = r.std(1, keepdim=True) if k > 1 else torch.zeros_like(r[:, :1])
    return (dr_grpo_advantages(rewards, k).view(-1, k) / (std + eps)).flatten()


def dr_grpo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Reward - group mean, without GRPO's division by the std, which favours prompts that are too easy or too hard
    (Liu et al. 2025, "Understanding R1-Zero-Like Training", section 3.1, https://arxiv.org/abs/2503.20783)."""
    r = rewards.view(-1, k)
    return (r - r.mean(1, keepdim=True)).flatten()


def best_of_n_weights(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """1 for each prompt's best sample (the first of equal ones), 0 for the others: online best-of-n, trained on with
    the log-likelihood loss (RAFT, Dong et al. 2023, https://arxiv.org/abs/2304.06767; ReST's improve step with one
    threshold, Gulcehre et al. 2023, https://arxiv.org/abs/2308.08998)."""
    r = rewards.view(-1, k)
    return torch.zeros_like(r).scatter_(1, r.argmax(1, keepdim=True), 1.0).flatten()


def advantages_of(rewards: torch.Tensor, advantage: str, k: int) -> torch.Tensor:
    """(b,) advantages (best_of_n: its weights) of --advantage."""
    return {"rloo": rloo_advantages, "grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages,
            "best_of_n": best_of_n_weights}[advantage](rewards, k)


def importance_weights(train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, valid: torch.Tensor,
                       cap: float, per_token: bool) -> torch.Tensor:
    """Truncated importance sampling's weights (Yao et al. 2025, https://fengyao.notion.site/off-policy-rl): how much
    likelier the trainer finds each sample than the sampler that drew it, capped; (b, R) per token, min(pi_train /
    pi_sampler, cap), or (b,) per response, min(the product over its valid tokens, cap), from (b, R) log-probs."""
    if per_token:
        return (train_logprobs - sampler_logprobs).exp().clamp(max=cap)
    return ((train_logprobs - sampler_logprobs) * valid).sum(1).exp().clamp(max=cap)


def clipped_surrogate(advantages: torch.Tensor, ratio: torch.Tensor, cliprange: float) -> torch.Tensor:
    """PPO's pessimistic clipped objective, elementwise: max(-A r, -A clip(r, 1 - c, 1 + c)).
    {OAI}/lm_human_preferences/train_policy.py#L343-L357"""
    return torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))


def policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                advantages: torch.Tensor, valid: torch.Tensor, advantage: str, cliprange: float, beta: float,
                k: int, kl_estimator: str, kl_in: str, aggregation: Optional[str] = None, token_count=None,
                weights: Optional[torch.Tensor] = None) -> tuple:
    """(loss, stats) of a micro-batch: (b, R) log-probs of the current policy, of the sampling policy and of the
    reference, (b,) advantages (best_of_n: its 0/1 weights), (b, R) valid tokens; `advantage` names the estimator, k
    the samples per prompt; with kl_in "loss", beta x the kl_estimator's estimate joins the loss.
    - rloo: -A * ratio of the whole response, clipped (TRL's RLOOTrainer, https://huggingface.co/docs/trl/rloo_trainer);
    - grpo: PPO's clipped token loss with A on every token (+ beta * the KL estimate per token), averaged over each
      response's tokens, then over responses (Shao et al. 2024, eq. 3);
    - dr_grpo: the same sum over tokens divided by the constant response_length instead (Liu et al. 2025, eq. 7);
      `aggregation` (token, sequence or constant; unset: grpo sequence, dr_grpo constant) chooses either for both, or
      DAPO's sum over all valid tokens divided by token_count, this micro-batch's share of the minibatch's count;
    - best_of_n: -log-likelihood of the selected samples, per response_length token, averaged over the prompts
      (k x the mean over the batch of weight x log-likelihood).
    rloo and best_of_n add the KL loss term as beta x the mean over responses of the summed estimate. weights:
    truncated importance sampling's detached weights of the policy term (not the KL's), (b, R) for grpo and dr_grpo,
    (b,) for rloo and best_of_n (importance_weights), or None."""
    R = valid.shape[1]
    log_ratio = (new_logprobs - old_logprobs) * valid  # (b, R)
    stats = {"policy/approxkl": 0.5 * masked_mean(log_ratio**2, valid)}
    kl = kl_estimate(new_logprobs, ref_logprobs, kl_estimator) if kl_in == "loss" else None  # (b, R)
    if kl is not None:
        stats[f"policy/{kl_estimator}_kl"] = masked_mean(kl, valid)
    if advantage == "rloo":
        ratio = log_ratio.sum(1).exp()  # (b,)
        losses = clipped_surrogate(advantages, ratio, cliprange)
        losses = losses * weights if weights is not None else losses
        stats["policy/clipfrac"] = ((ratio - 1).abs() > cliprange).float().mean()
        loss = losses.mean()
    elif advantage in ("grpo", "dr_grpo"):
        ratio = log_ratio.exp()  # (b, R)
        token = clipped_surrogate(advantages[:, None], ratio, cliprange)
        token = token * weights if weights is not None else token
        token = (token + beta * kl) * valid if kl is not None else token * valid
        aggregation = aggregation or ("sequence" if advantage == "grpo" else "constant")
        if aggregation == "token":
            loss = token.sum() / token_count
        else:
            length = valid.sum(1).clamp(min=1) if aggregation == "sequence" else R
            loss = (token.sum(1) / length).mean()
        stats["policy/clipfrac"] = masked_mean(((ratio - 1).abs() > cliprange).float(), valid)
    else:
        selected = advantages if weights is None else advantages * weights  # 1 for each prompt's best sample, else 0
        loss = -(selected * (new_logprobs * valid).sum(1)).mean() * k / R
    if kl is not None and advantage in ("rloo", "best_of_n"):
        loss = loss + beta * (kl * valid).sum(1).mean()
    return loss, {"loss/policy": loss.detach(), **{name: value.detach() for name, value in stats.items()}}


def train(args: Args) -> Path:
    """RLOO, GRPO, Dr. GRPO or online best-of-n (--advantage) against a frozen reward model; returns the run folder."""
    stop = StopRequest()  # from here on SIGTERM or SIGINT stops the run after a checkpoint, not in the middle
    world = start_processes().num_processes
    num_updates, texts, eval_texts = check_args(args)
    local_batch_size = args.batch_size // world
    local_minibatch_size = local_batch_size // args.nminibatches
    grad_accum = local_minibatch_size // args.local_micro_batch_size
    accelerator = make_accelerator(args, args.local_micro_batch_size, grad_accum, args.max_grad_norm)
    rank, device = accelerator.process_index, accelerator.device
    if not resume_has_work(args.resume, world, zero_stage(accelerator)):
        return Path(args.resume)
    kl_estimator, kl_in = kl_placement(args.advantage, args.kl_estimator, args.kl_in)

    # 1. Models: the policy (no value model), the frozen reference and the frozen reward model; the same init on every
    #    process, the frozen ones sharded under ZeRO-3 (place_frozen) and kept in bf16 under --mixed_precision bf16.
    torch.manual_seed(args.seed)
    lm, tokenizer = prepare_lm(*load_base_model(args.base_model, load_in_4bit=args.load_in_4bit))
    reward_model = None  # with --verifier a program checks each answer instead (step 4)
    if args.verifier is None:
        reward_model, reward_tokenizer = load_reward_model(args.reward_model)
        check_same_tokenizer(reward_tokenizer, tokenizer, args)
    truncate_token = truncate_token_id(args.truncate_token, tokenizer)
    gold_fn = gold_scorer(args.gold_labeler)
    frozen_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    lora = add_lora(lm, args)
    reference = FrozenReference(lm, lora, accelerator, frozen_dtype)
    if reward_model is not None:
        reward_model = place_frozen(reward_model, accelerator, frozen_dtype)
    trained = [p for p in lm.parameters() if p.requires_grad]
    num_trained = sum(p.numel() for p in trained)  # counted before ZeRO-3 shards them
    optimizer = make_optimizer(trained, args.optimizer, args.lr, args.eps)
    policy, optimizer = accelerator.prepare(lm, optimizer)  # DDP, or a DeepSpeed engine with its ZeRO optimizer
    unwrapped = accelerator.unwrap_model(policy)
    pad = tokenizer.pad_token_id
    sampler = Sampler(unwrapped, pad, args.temperature)

    # 2. Prompts: batch_size / k per update, the same on every process, each taking whole prompts (so that each group
    #    of k samples lies on one process), counted by a Stream (a checkpoint keeps the position); a seed per process
    #    for sampling and shuffles.
    batches = Stream(query_batches(texts, tokenizer, args.query_length, args.response_length,
                                   args.batch_size // args.k, args.seed))
    local_prompts = local_batch_size // args.k
    torch.manual_seed(args.seed + rank * 100003)

    # The run folder, its log and checkpoints (a resumed run takes back the weights, optimizer, query position, random
    # generators and metrics of its last checkpoint); the held-out evaluation of the initial policy.
    run = Run(accelerator, args, None, "python train_rloo.py --resume {run_dir}", "episode", keep_samples=True,
              stop=stop, objects=(batches,),
              about=f"{args.advantage}: {num_updates} updates of {args.batch_size // args.k} "
              f"prompts x k = {args.k} ({world} process(es) x {args.nminibatches} minibatch(es) x {grad_accum} "
              f"micro-batch(es) of {args.local_micro_batch_size}); {num_trained:,} trained parameters")
    held_out = HeldOut(eval_texts, tokenizer, unwrapped, policy, reward_model, gold_fn, args, accelerator)
    held_out.before_training(run)
    for update in run.steps(num_updates, args.advantage, {"score": "objective/scores", "kl": "objective/kl",
                                                          "gold": "objective/gold_score"}):
        t0 = now(device)
        for group in optimizer.param_groups:  # lr annealed linearly to 0, as train_policy.py
            group["lr"] = args.lr * (1 - update / num_updates)

        # 3. Rollouts: k samples of each of this process's prompts, with their log-probs from the sampling pass; the
        #    truncated responses and the tokens the loss reads (valid: with SFD's mask, none after the truncate token);
        #    the reference's log-probs of those, each prompt run once for its k samples (shared_prompt_logprobs), in
        #    chunks of local_rollout_forward_batch_size episodes. Under ZeRO-3 the policy's weights are gathered.
        queries, references = next(batches)
        prompts = queries[rank * local_prompts : (rank + 1) * local_prompts].to(device)  # (b / k, Q)
        queries = prompts.repeat_interleave(args.k, 0)  # (b, Q): each prompt k times in a row
        if references is not None:  # (b, R) TL;DR reference summaries, k times each
            references = references[rank * local_prompts : (rank + 1) * local_prompts]
            references = references.repeat_interleave(args.k, 0).to(device)
        policy.eval()
        chunk = args.local_rollout_forward_batch_size
        with torch.no_grad(), accelerator.autocast(), full_weights(policy, accelerator):
            responses, logprobs, entropies, _ = sampler(queries, args.response_length)  # (b, R) each
            truncated = responses
            if truncate_token is not None:
                truncated = truncate_responses(responses, truncate_token, args.truncate_after, pad)
            valid = response_masks(truncated, pad, args.mask_after_truncate)[0]  # (b, R)
            logprobs = logprobs * valid  # 0 where no loss reads, as every log-prob below
            keep = valid if args.mask_after_truncate else None  # OAI reads every token: no rows to leave out

            def sample_logprobs(model) -> torch.Tensor:
                """(b, R) log-probs of this process's valid sampled tokens under `model`, in chunks of whole prompts."""
                def one_chunk(prompt_chunk, response_chunk, valid_chunk) -> torch.Tensor:  # (c, Q), (c, k, R) x 2
                    response_chunk, valid_chunk = response_chunk.flatten(0, 1), valid_chunk.flatten(0, 1)  # (c k, R)
                    kept = valid_chunk if keep is not None else None
                    return model(prompt_chunk, response_chunk, pad, args.temperature, kept, False)[0]

                return in_chunks(one_chunk, chunk // args.k, prompts, responses.view(local_prompts, args.k, -1),
                                 valid.view(local_prompts, args.k, -1))

            ref_logprobs = sample_logprobs(lambda *inputs: reference(*inputs, logits_fn=shared_prompt_logprobs))
            t_gen = now(device)

            # 4. Scores of the truncated responses by the reward model (less the reference summary's with trlX's
            #    baseline) or by --verifier's program, the penalty for no truncate token, the gold labeler's score, as
            #    train_policy.py's step 4.
            if args.verifier is None:
                scores = in_chunks(lambda qr: reward_model(qr, pad), chunk, torch.cat([queries, truncated], 1))  # (b,)
            else:  # 1 for a right answer, plus format_reward for a well-formed one: (b,) each
                checks = check_answers(args.verifier, queries, truncated, tokenizer)
                scores = checks["correct"] + args.format_reward * checks["formatted"]
            if args.reference_baseline:  # trlX's baseline, as train_policy.py
                scores = scores - in_chunks(lambda qr: reward_model(qr, pad), chunk,
                                            torch.cat([queries, references], 1))
            if truncate_token is not None:
                scores = penalize(scores, truncated, truncate_token, args.truncate_after, args.penalty_reward_value)
            response_texts, gold = gold_scores(gold_fn, queries, truncated, tokenizer, references is not None)

            # 5. Rewards and advantages within each prompt's k samples: the estimator's only work.
            rewards = sequence_rewards(scores, logprobs, ref_logprobs, valid, kl_estimator, kl_in, args.beta)  # (b,)
            advantages = advantages_of(rewards, args.advantage, args.k)  # (b,); best_of_n: 0/1 weights

            # Truncated importance sampling (--tis_cap; Yao et al. 2025), as train_policy.py: the training forward's
            # log-probs of the samples before any step become the ratio's old ones, and min(pi_train / pi_sampler,
            # cap) weights each loss. Off, the sampler's log-probs are the old ones.
            old_logprobs, tis_weights = logprobs, None
            if args.tis_cap is not None:  # the training forward of step 6
                old_logprobs = sample_logprobs(functools.partial(shared_prompt_logprobs, policy))  # (b, R)
                tis_weights = importance_weights(old_logprobs, logprobs, valid, args.tis_cap,
                                                 args.advantage in ("grpo", "dr_grpo"))  # (b, R) or (b,)
        t_score = now(device)

        # 6. noptepochs passes over the batch in nminibatches minibatches, reshuffled each time by whole prompts (so
        #    that a micro-batch runs each of its prompts once for its k samples: shared_prompt_logprobs); micro-batches
        #    accumulate gradients (accelerator.accumulate divides each loss by grad_accum; DDP averages, DeepSpeed
        #    steps, at the last).
        policy.train()
        minibatch_stats, first_step = [], []  # first_step: (training, sampler log-probs, valid) before any step
        for _ in range(args.noptepochs):
            order = torch.randperm(local_prompts, device=device)
            for start in range(0, local_prompts, local_minibatch_size // args.k):
                minibatch = order[start : start + local_minibatch_size // args.k]  # of this process's prompts
                # the k samples of each, as rows of the batch
                minibatch_rows = (minibatch[:, None] * args.k + torch.arange(args.k, device=device)).flatten()
                stats, token_count = {}, None
                if args.loss_aggregation == "token":  # DAPO: each micro-batch's share of the minibatch's valid tokens
                    token_count = accelerator.reduce(valid[minibatch_rows].sum(), "sum") / (grad_accum * world)
                for micro in range(grad_accum):
                    prompt_ids = minibatch.view(grad_accum, -1)[micro]  # this micro-batch's prompts
                    episodes = minibatch_rows.view(grad_accum, -1)[micro]  # and their k samples each
                    with accelerator.accumulate(policy):
                        new_logprobs, entropy = shared_prompt_logprobs(policy, prompts[prompt_ids], responses[episodes],
                                                                       pad, args.temperature,
                                                                       None if keep is None else keep[episodes])
                        if not minibatch_stats:  # no step yet: the policy is the sampler's
                            first_step.append((new_logprobs.detach(), logprobs[episodes], valid[episodes]))
                        loss, micro_stats = policy_loss(new_logprobs, old_logprobs[episodes],
                                                        ref_logprobs[episodes], advantages[episodes], valid[episodes],
                                                        args.advantage, args.cliprange, args.beta, args.k, kl_estimator,
                                                        kl_in, args.loss_aggregation, token_count,
                                                        None if tis_weights is None else tis_weights[episodes])
                        accelerator.backward(loss)
                    micro_stats["policy/entropy"] = masked_mean(entropy, valid[episodes])  # outside the graph already
                    for name, value in micro_stats.items():
                        stats[name] = stats.get(name, 0) + value / grad_accum
                # the gradient's global norm, clipped at max_grad_norm (DeepSpeed's engine clipped and stepped in the
                # last backward, and reports the norm)
                grad_norm = accelerator.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                if grad_norm is not None:
                    stats["policy/grad_norm"] = torch.as_tensor(float(grad_norm), device=device)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                minibatch_stats.append(stats)
        t_update = now(device)

        # 7. Statistics of the rollouts (PPO's names where they mean the same), averaged over processes with the
        #    minibatches' (rloo_metrics); the held-out evaluation every eval_every updates.
        kl = ((logprobs - ref_logprobs) * valid).sum(1)  # (b,)
        rollout_stats = {
            "objective/kl": kl.mean(), "objective/entropy": (-logprobs * valid).sum(1).mean(),
            "objective/scores": scores.mean(), "objective/entropy_exact": (entropies * valid).sum(1).mean(),
            "objective/rewards": rewards.mean(),
            "objective/advantage_std": advantages.std() if len(advantages) > 1 else torch.zeros((), device=device),
        }
        if truncate_token is not None:  # the responses that ended early, and the tokens responses keep
            rollout_stats["objective/truncated_fraction"] = (truncated == pad).any(1).float().mean()
            rollout_stats["objective/response_length"] = (truncated != pad).sum(1).float().mean()
        if gold is not None:
            rollout_stats["objective/gold_score"] = gold.mean()
        if args.verifier is not None:  # the share of right answers, of well-formed ones, of groups with no gradient
            rollout_stats.update({"objective/correct": checks["correct"].mean(),
                                  "objective/formatted": checks["formatted"].mean(),
                                  "objective/zero_gradient_share": same_reward_share(scores, args.k)})
        rollout_stats.update(logprob_mismatch(*map(torch.cat, zip(*first_step))))
        if tis_weights is not None:  # the weights (over valid tokens, or responses), and the share the cap cut
            counted = valid if tis_weights.dim() == 2 else torch.ones_like(tis_weights, dtype=torch.bool)
            rollout_stats["tis/weight_mean"] = masked_mean(tis_weights, counted)
            rollout_stats["tis/capped_fraction"] = masked_mean((tis_weights >= args.tis_cap).float(), counted)
        metrics = rloo_metrics(accelerator, update, num_updates, args, rollout_stats, minibatch_stats,
                               (t0, t_gen, t_score, t_update))
        eval_summaries = held_out.every(update + 1, num_updates, metrics)

        # The samples shown and kept, the metrics logged; a NaN or inf stops the run (exit 3); a checkpoint every
        # save_every updates, and when SIGTERM or SIGINT asked the run to stop, which it then does (exit 128 + signal).
        rows = sample_rows(update + 1, queries, response_texts, scores, gold, kl,
                           min(args.num_print_samples, local_batch_size), tokenizer)
        show_samples(run, update, num_updates, rows, eval_summaries, args)
        run.end_step(update + 1, num_updates, metrics)

    # The policy (a plain model folder, adapters merged under LoRA), the sample tables and the summary of the run.
    save_rloo_policy(accelerator, policy, unwrapped, lora, tokenizer, run.dir)
    run.finish(summarize, args.advantage)
    return run.dir


# =========================================================================================================
# Plumbing. Everything below serves train() above and is not the algorithm: the command line and the presets, reading
# the data, loading the models, LoRA, measuring, the run folder, checkpoints and resume, signals, DeepSpeed, the checks
# of the arguments, the metrics and the summary. The `# Copied from` blocks are shared with the other scripts and kept
# identical by tests/test_pipeline.py.
# =========================================================================================================


# ---------------------------------------------------------------------------------------------------------
# The command line and the presets
# ---------------------------------------------------------------------------------------------------------


# Copied from train_policy.py
FLAG_PREFIX = "--"  # how messages spell a flag: train_both.py sets "--reward." / "--policy." while a stage runs


# Copied from train_policy.py
def fail(message: str):
    """Bad input: one line on stderr naming the flag as the user typed it, exit status 2, before anything is written."""
    message = re.sub(r"(?<![\w.-])--(?=[a-z])", FLAG_PREFIX, message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# Copied from train_policy.py
def cli(args_class, presets: dict, description: str):
    """tyro CLI with an optional first positional preset name: `script.py sentiment --seed 2`. `--resume <run folder>`
    comes alone: the run continues with the arguments it started with, read back from its args.json."""
    argv = sys.argv[1:]
    preset = argv[:1] if argv and not argv[0].startswith("-") else []
    default = args_class()
    if preset:
        if preset[0] not in presets:
            fail(f"unknown preset {preset[0]!r}; presets: {', '.join(presets)}")
        default = replace(default, **presets[preset[0]])
    args = tyro.cli(args_class, default=default, args=argv[len(preset) :], description=description,
                    use_underscores=True)
    if args.resume is None:
        return args
    if len(argv) > (1 if argv[0].startswith("--resume=") else 2):
        fail("--resume continues a run with the arguments it started with (its args.json): give no other flag or "
             "preset")
    if not os.path.isfile(os.path.join(args.resume, "args.json")):
        fail(f"--resume {args.resume}: not a run folder (no args.json)")
    with open(os.path.join(args.resume, "args.json")) as f:
        return replace(args_from_json(args_class, json.load(f)), resume=args.resume)


# Copied from train_policy.py
def args_from_json(args_class, values: dict):
    """args_class rebuilt from its args.json (nested argument classes too); other keys (world_size, ...) are facts of
    the run."""
    kwargs = {}
    for f in fields(args_class):
        if f.name in values:
            default = getattr(args_class(), f.name)
            kwargs[f.name] = args_from_json(type(default), values[f.name]) if is_dataclass(default) else values[f.name]
    return args_class(**kwargs)


PRESETS = {
    # TRL's RLOO TL;DR run (docs, "RLOO Trainer": pythia-1b, k 2, 2 epochs, 2 minibatches, lr 3e-6, kl 0.03) with SFD's
    # task and details as train_policy.py's tldr preset has them. base_model is the tldr SFT run's model.
    "tldr": dict(
        exp_name="rloo_tldr", base_model="models/sft_tldr",
        query_dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144",
        query_length=512, response_length=53, truncate_token="eos", truncate_after=0, penalty_reward_value=-1.0,
        temperature=0.7, mask_after_truncate=True, advantage="rloo", k=2, beta=0.03, total_episodes=1_000_000,
        batch_size=512, nminibatches=2, noptepochs=2, local_micro_batch_size=16, local_rollout_forward_batch_size=64,
        lr=3e-6, eps=1e-5, optimizer="adamw", gold_labeler="none",
        eval_dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144",
        eval_split="validation", eval_temperature=0.01,
    ),
}


# the summarization twin: train_policy.py's tldr_twin sizes (data/tldr/, the nano SFT model, the judge as gold)
PRESETS["tldr_twin"] = {**PRESETS["tldr"], **dict(
    exp_name="rloo_twin", base_model="runs/tldr_twin/sft_model", query_dataset="data/tldr/train.jsonl.gz",
    query_length=160, response_length=48, k=4, beta=0.05, total_episodes=1024, batch_size=64,
    local_micro_batch_size=32, lr=3e-5, reference_baseline=True, gold_labeler="tldr_judge",
    eval_dataset="data/tldr/validation.jsonl.gz", num_eval=256, eval_every=4, eval_temperature=0.7,
    print_sample_every=8,
)}


# RL with verifiable rewards on data/arithmetic: GRPO against arithmetic_verifier from train_sft.py's arithmetic model
# (python train_sft.py arithmetic), 8 samples per problem as TRL's GRPOConfig (num_generations 8); the response ends
# at its EOS (SFD's mask after it), an answer cut off there scores 0 as a wrong one. Held-out pass@1 on validation at
# the sampling temperature.
PRESETS["arithmetic"] = dict(
    exp_name="grpo_arithmetic", base_model="runs/arithmetic/sft_model", verifier="arithmetic",
    query_dataset="data/arithmetic/train.jsonl.gz", eval_dataset="data/arithmetic/validation.jsonl.gz",
    query_length=6, response_length=32, truncate_token="eos", truncate_after=0, penalty_reward_value=0.0,
    mask_after_truncate=True, temperature=0.7, advantage="grpo", k=8, beta=0.01, total_episodes=16384, batch_size=256,
    nminibatches=4, noptepochs=1, local_micro_batch_size=64, lr=2e-4, gold_labeler="none", num_eval=512,
    eval_every=8, eval_temperature=0.7, print_sample_every=16,
)


# ---------------------------------------------------------------------------------------------------------
# Data: queries and the truncate token
# ---------------------------------------------------------------------------------------------------------


# Copied from train_policy.py
TLDR_KEYS = ("subreddit", "title", "post", "summary")


# Copied from train_policy.py
def load_texts(path: str, split: str, flag: str = "--query_dataset"):
    """Query data, indexable: books texts (str) from a local .jsonl(.gz) of JSON strings (OAI's
    book_passages/{mode}.jsonl) or of objects with "text" (data/corpus.jsonl.gz), or from a hub dataset with a "text"
    column (bookcorpus); or TL;DR rows (dict with subreddit, title, post, summary) from a .jsonl(.gz) (data/tldr/,
    summarize-from-feedback's tldr_3_filtered) or a hub dataset with those columns; or problem rows (dict with a
    "problem", data/arithmetic/)."""
    if os.path.exists(path) or path.endswith((".jsonl", ".gz", ".json")):
        if not os.path.isfile(path):
            fail(f"{flag} {path}: file not found")
        texts = []
        try:
            with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path,
                                                                                            encoding="utf-8")) as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        text = json.loads(line)
                        if isinstance(text, dict) and "post" not in text and "problem" not in text:
                            text = text.get("text")
                        if isinstance(text, dict) and "problem" in text and not isinstance(text["problem"], str):
                            fail(f"{flag} {path}: line {n} is a problem row without a string \"problem\"")
                        if isinstance(text, dict) and "post" in text and not all(isinstance(text.get(k), str)
                                                                                 for k in TLDR_KEYS):
                            fail(f"{flag} {path}: line {n} is a TL;DR row without string {', '.join(TLDR_KEYS)}")
                        if not isinstance(text, (str, dict)) or (texts and row_kind(text) != row_kind(texts[0])):
                            fail(f"{flag} {path}: line {n} is neither a JSON string, an object with a string \"text\", "
                                 "a TL;DR row nor a problem row like the lines before it")
                        texts.append(text)
        except json.JSONDecodeError as e:
            fail(f"{flag} {path}: line {n} is not valid JSON ({e.msg})")
        except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
            fail(f"{flag} {path}: cannot be read ({e})")
    else:
        import datasets

        try:
            texts = datasets.load_dataset(path, split=split)
        except Exception as e:  # offline, unknown id or split: one line, exit 2
            fail(f"{flag} {path}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        if set(TLDR_KEYS) <= set(texts.column_names):
            texts = texts.select_columns(list(TLDR_KEYS))  # rows as dicts
        elif "text" in texts.column_names:
            texts = texts["text"]  # a lazy column: BookCorpus's 74M rows stay memory-mapped
        else:
            fail(f"{flag} {path}: split {split} has neither a \"text\" column nor the TL;DR columns "
                 f"{', '.join(TLDR_KEYS)}")
    if len(texts) == 0:
        fail(f"{flag} {path}: no texts")
    return texts


# Copied from train_policy.py
def format_query(tokens: list, dot: int, query_length: int, pad_token_id: int) -> Optional[list]:
    """OAI's books query: start after the first '.', keep query_length tokens, end after the last '.';
    None when there is no '.' to end at. Left-padded with the pad token (OAI right-pads and gives explicit
    positions; left padding with explicit positions is the same function and lets sampling append on the right).
    {OAI}/lm_human_preferences/language/datasets.py#L48-L67"""
    if dot in tokens:
        first = tokens.index(dot) + 1
        if first < len(tokens):
            tokens = tokens[first:]
    tokens = tokens[:query_length]
    if dot not in tokens:
        return None
    tokens = tokens[: len(tokens) - tokens[::-1].index(dot)]
    return [pad_token_id] * (query_length - len(tokens)) + tokens


# Copied from train_policy.py
def format_tldr_query(row: dict, tokenizer, query_length: int) -> list:
    """OAI's TL;DR query: SUBREDDIT/TITLE/POST/TL;DR, the post cut at its last newline (else its last character) until
    the query fits, then left-padded with the pad token to `query_length` tokens.

    https://github.com/openai/summarize-from-feedback/blob/700967448d10004279f138666442bf1497d0e705/summarize_from_feedback/tasks.py#L98-L165"""
    fmt = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
    post = row["post"]
    tokens = tokenizer.encode(fmt.format(subreddit=row["subreddit"], title=row["title"], post=post))
    while len(tokens) > query_length:
        if not post:
            fail(f"--query_length {query_length} is too short for the title of post {row.get('id', '?')}")
        cut = post.rfind("\n")
        post = post[:cut] if cut >= 0 else post[:-1]
        tokens = tokenizer.encode(fmt.format(subreddit=row["subreddit"], title=row["title"], post=post))
    return [tokenizer.pad_token_id] * (query_length - len(tokens)) + tokens


# Copied from train_policy.py
def format_tldr_response(summary: str, tokenizer, response_length: int) -> list:
    """SFD's reference response ' {summary}<|endoftext|>' (the upstream summary has no leading space), its text cut to
    response_length - 1 tokens so that the EOS stays, right-padded to response_length tokens.
    {SFD}/summarize_from_feedback_details/tldr_dataset.py#L186-L199"""
    tokens = tokenizer.encode(" " + summary)[: response_length - 1] + [tokenizer.eos_token_id]
    return tokens + [tokenizer.pad_token_id] * (response_length - len(tokens))


# Copied from train_policy.py
def format_problem_query(problem: str, tokenizer, query_length: int) -> list:
    """A verifiable task's query: the problem's tokens ("07+45="), left-padded with the pad token to query_length."""
    tokens = tokenizer.encode(problem)
    if len(tokens) > query_length:
        fail(f"--query_length {query_length} is too short for the problem {problem!r} ({len(tokens)} tokens)")
    return [tokenizer.pad_token_id] * (query_length - len(tokens)) + tokens


# Copied from train_policy.py
def query_batches(texts, tokenizer, query_length: int, response_length: int, batch_size: int, seed: int):
    """Endless global batches in a shuffled order that is the same on every process (each process then takes its own
    slice, as OAI shards the dataset over ranks): (queries (B, Q), reference responses (B, R)) for TL;DR rows, as
    SFD's query data carries them, and (queries (B, Q), None) for books texts and problems."""
    dot = tokenizer.convert_tokens_to_ids(".")
    gen, batch, references = torch.Generator().manual_seed(seed), [], []
    while True:
        found = False
        for i in torch.randperm(len(texts), generator=gen).tolist():
            row = texts[i]
            if isinstance(row, str):
                query = format_query(tokenizer.encode(row), dot, query_length, tokenizer.pad_token_id)
                if query is None:
                    continue
            elif "problem" in row:  # a verifiable task's problem: its answer is checked, not compared to a reference
                query = format_problem_query(row["problem"], tokenizer, query_length)
            else:
                query = format_tldr_query(row, tokenizer, query_length)
                references.append(format_tldr_response(row["summary"], tokenizer, response_length))
            found = True
            batch.append(query)
            if len(batch) == batch_size:
                yield torch.tensor(batch), (torch.tensor(references) if references else None)
                batch, references = [], []
        if not found:
            fail(f"no text of the query dataset has a '.' in its first {query_length} tokens after the first '.'")


# Copied from train_policy.py
def truncate_token_id(name: Optional[str], tokenizer) -> Optional[int]:
    """The id of --truncate_token: None, "eos" (the tokenizer's EOS, SFD's truncate_token) or a text of one token."""
    if name is None or name == "eos":
        return None if name is None else tokenizer.eos_token_id
    ids = tokenizer.encode(name)
    if len(ids) != 1:
        fail(f"--truncate_token {name!r} is not a single token")
    return ids[0]


# Copied from train_policy.py
def row_kind(row) -> str:
    """What a row of query data is: "text" (books), "tldr" (a post and its summary) or "problem" (a verifiable task)."""
    return "text" if isinstance(row, str) else "problem" if "problem" in row else "tldr"


# ---------------------------------------------------------------------------------------------------------
# Models and the optimizer
# ---------------------------------------------------------------------------------------------------------


# Copied from train_policy.py
def load_base_model(path: str, weights: bool = True, load_in_4bit: bool = False):
    """(model, tokenizer) from a hub id, a local folder or a .gguf file; with weights=False (config, tokenizer), what
    the checks of the arguments need. A .gguf file is de-quantized to fp32 as it is read (GgufConfig(dequantize=True)):
    the result is an ordinary trainable model without a quantization marker, which save_pretrained writes as a plain
    Hugging Face folder that every script loads back. (Read without it, transformers keeps the model marked as
    GGUF-quantized and refuses to save it.) load_in_4bit: the weights quantized to 4-bit NF4 (bitsandbytes, QLoRA's
    format), computing in bf16."""
    source, gguf = path, {}
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            fail(f"--base_model {path}: file not found")
        source, name = os.path.split(os.path.abspath(path))
        gguf = dict(gguf_file=name)
    elif not os.path.isdir(path) and (path.startswith((".", "/")) or path.count("/") > 1):
        fail(f"--base_model {path}: folder not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **gguf)
        if not weights:
            return AutoConfig.from_pretrained(source, **gguf), tokenizer
        quantization = dict(quantization_config=GgufConfig(dequantize=True)) if gguf else {}
        if load_in_4bit:
            quantization = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                       bnb_4bit_compute_dtype=torch.bfloat16),
                                                                       device_map={"": PartialState().device})
        return AutoModelForCausalLM.from_pretrained(source, **gguf, **quantization), tokenizer
    except OSError as e:  # hub id with no network, or a folder without a model
        fail(f"--base_model {path}: cannot be loaded ({str(e).splitlines()[0][:200]})")


# Copied from train_policy.py
def prepare_lm(model, tokenizer):
    """A dedicated pad token (never EOS: an <|endoftext|> inside a response must stay visible) and every dropout
    layer off, as OAI runs policy, reference, value and reward models without dropout.
    {OAI}/lm_human_preferences/language/model.py#L40-L59"""
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        # GPT-2's gelu_new (OAI's gelu, {OAI}/lm_human_preferences/language/model.py#L35-L37) is the tanh formula
        # as six elementwise ops; torch's gelu(approximate="tanh") is the same formula in one kernel (equal to float
        # rounding), 5% of a PPO step on CPU.
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, GELUTanh())
    # Weights read from safetensors point into the memory-mapped file at the file's own offsets (16-byte aligned for the
    # nano model); tensors PyTorch allocates are 64-byte aligned. MKL orders a matmul's floating-point sums by the
    # alignment of its inputs on Intel CPUs
    # (https://www.intel.com/content/www/us/en/developer/articles/technical/getting-reproducible-results-with-intel-mkl.html),
    # so there a loaded model and its deep copy round the same logits differently. Copied into memory of their own, the
    # weights of every model (loaded, copied, resumed) run the same kernels on every CPU.
    with torch.no_grad():
        for p in model.parameters():
            if p.device.type == "cpu":
                p.data = p.data.clone()
    return model, tokenizer


# Copied from train_policy.py
def in_chunks(fn, size: int, *tensors: torch.Tensor) -> torch.Tensor:
    """fn applied to consecutive chunks of at most `size` rows of `tensors`, the outputs concatenated: a forward pass
    over any batch in bounded memory."""
    n = len(tensors[0])
    return torch.cat([fn(*(t[i : i + size] for t in tensors)) for i in range(0, n, size)])


# Copied from train_reward.py
class RewardModel(nn.Module):
    """The language model's transformer with a scalar head read at the last real token, then gain and bias.
    Head init N(0, 1/sqrt(d_model + 1)), bias 0 ({OAI}/lm_human_preferences/language/model.py#L248-L258);
    gain and bias are parameters as in OAI (trained with the rest; set by normalization before and after
    training, {OAI}/lm_human_preferences/rewards.py#L47-L57)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        d = lm.config.hidden_size
        self.head = nn.Linear(d, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(d + 1))
        nn.init.zeros_(self.head.bias)
        # shape (1,), not (): DeepSpeed 0.19.8's ZeRO-3 cannot shard a 0-d parameter (a head file with () loads too)
        self.gain = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def scores(self, tokens: torch.Tensor, pad_token_id: int) -> torch.Tensor:
        """(b, T) fp32 head outputs (gain and bias applied) at every position of (b, T) tokens: the reward at the last
        real token, or, for a critic initialised from the reward model, the value of every state."""
        hidden = self.lm.base_model(**model_inputs(tokens, pad_token_id)).last_hidden_state  # (b, T, d)
        return (self.gain * self.head(hidden).squeeze(-1) + self.bias).float()  # fp32 even from a model kept in bf16

    def forward(self, tokens: torch.Tensor, pad_token_id: int) -> torch.Tensor:
        """(b,) rewards of (b, T) query+response tokens, read at the last real token: the EOS of a response truncated
        there (SFD reads the reward at the EOS token, {SFD}/summarize_from_feedback_details/ppo.py#L282-L300), else its
        last token. OAI reads the last position; a masked pad makes it independent of right padding.
        {OAI}/lm_human_preferences/rewards.py#L47"""
        last = (tokens != pad_token_id).long().cumsum(1).argmax(1)  # (b,): the last real token
        return self.scores(tokens, pad_token_id)[torch.arange(len(tokens), device=tokens.device), last]


# Copied from train_policy.py
def load_reward_model(folder: str):
    """(RewardModel, tokenizer) from a folder written by save_reward_model."""
    if not os.path.isfile(os.path.join(folder, "reward_head.safetensors")):
        fail(f"--reward_model {folder}: not a reward model folder (no reward_head.safetensors; train one with "
             "train_reward.py)")
    lm, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    model = RewardModel(prepare_lm(lm, tokenizer)[0])
    head = load_file(os.path.join(folder, "reward_head.safetensors"))
    with torch.no_grad():
        model.head.weight.copy_(head["head.weight"])
        model.head.bias.copy_(head["head.bias"])
        model.gain.copy_(head["gain"])
        model.bias.copy_(head["bias"])
    return model, tokenizer


# Copied from train_policy.py
def check_lora(args):
    """The LoRA and QLoRA flags, checked before anything runs."""
    if args.lora_r < 0 or (args.lora_r and args.lora_alpha <= 0) or not 0 <= args.lora_dropout < 1:
        fail(f"--lora_r {args.lora_r} must be at least 0, --lora_alpha positive, --lora_dropout in [0, 1)")
    if args.load_in_4bit and not torch.cuda.is_available():
        fail("--load_in_4bit (QLoRA) quantizes the weights with bitsandbytes on a CUDA GPU, and this machine has none; "
             "LoRA alone (--lora_r) runs on a CPU")
    if args.load_in_4bit and args.lora_r == 0:
        fail("--load_in_4bit trains LoRA adapters over frozen 4-bit weights: give --lora_r too")


# Copied from train_policy.py
def add_lora(lm, args):
    """LoRA adapters (Hu et al. 2021, through peft) on lm's layers when --lora_r > 0, injected in place: lm keeps its
    class and forward, and only the adapters of its weights train (the caller's heads train in full). Returns the
    PeftModel around lm, which turns the adapters off (disable_adapter(): the initial model, the reference of PPO and
    DPO without a second copy) or merges them into the weights (merge_and_unload(), before saving); None without
    LoRA."""
    if args.lora_r == 0:
        return None
    import peft

    if args.load_in_4bit:  # QLoRA (Dettmers et al. 2023): norms and heads of the 4-bit model kept in fp32
        lm = peft.prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    targets = "all-linear" if args.lora_target_modules == "all-linear" else args.lora_target_modules.split(",")
    transposed = any(isinstance(m, Conv1D) for m in lm.modules())  # GPT-2 stores its linear weights as (in, out)
    config = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             target_modules=targets, fan_in_fan_out=transposed)
    try:
        return peft.get_peft_model(lm, config)
    except ValueError as e:  # no such module
        fail(f"--lora_target_modules {args.lora_target_modules}: {str(e).splitlines()[0][:200]}")


# Copied from train_policy.py
def saved_lm(lm, lora):
    """The language model to save: under LoRA the adapters merged into the weights, so that the folder is a plain model
    every script (and transformers) loads as it loads any other."""
    return lm if lora is None else lora.merge_and_unload()


# Copied from train_policy.py
class AdamTensorFlowStyle(torch.optim.Optimizer):
    """Adam as TF1's AdamOptimizer computes it, which OAI used (lr 1e-5-ish, epsilon 1e-5): the bias corrections
    go into the step size and epsilon is added to sqrt(v) uncorrected ("epsilon hat"):
        lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t);  p -= lr_t * m / (sqrt(v) + eps)
    torch.optim.Adam instead adds eps to sqrt(v / (1 - beta2^t)): early in training, where 1 - beta2^t is small,
    TF's epsilon is effectively larger by 1 / sqrt(1 - beta2^t), so TF-style takes smaller steps on
    parameters with tiny gradients. {OAI}/lm_human_preferences/utils/core.py#L627"""

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"], state["m"], state["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
            if not params:
                continue
            # every parameter at once: foreach ops launch a few kernels per step, not a few per parameter
            grads = [p.grad for p in params]
            m, v = [self.state[p]["m"] for p in params], [self.state[p]["v"] for p in params]
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, grads, alpha=1 - beta1)  # m = beta1 m + (1 - beta1) g
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)  # v = beta2 v + (1 - beta2) g^2
            denom = torch._foreach_add(torch._foreach_sqrt(v), group["eps"])  # sqrt(v) + eps, uncorrected
            steps = [self.state[p]["step"] for p in params]
            lr_t = [-group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t) for t in steps]
            torch._foreach_addcdiv_(params, m, denom, lr_t)
        return None


# Copied from train_policy.py
def make_optimizer(params, name: str, lr: float, eps: float):
    """TF-style Adam, torch's Adam, or torch's AdamW (its default weight decay 0.01, as SFD ran it)."""
    if name == "adam_tf":
        return AdamTensorFlowStyle(params, lr=lr, eps=eps)
    return torch.optim.Adam(params, lr=lr, eps=eps) if name == "adam_pytorch" else torch.optim.AdamW(params, lr=lr,
                                                                                                     eps=eps)


# ---------------------------------------------------------------------------------------------------------
# Measuring: the gold labelers, the held-out evaluation, the clock
# ---------------------------------------------------------------------------------------------------------


# Copied from train_policy.py
def gold_scorer(name: str):
    """The programmatic labeler behind the embedded data, scoring decoded responses given the decoded queries they
    answer: VADER's compound score of the response alone (the sentiment labels), the summarization twin's judge of a
    summary against the post in its query, or None."""
    if name == "none":
        return None
    if name == "tldr_judge":
        return tldr_judge
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return lambda texts, queries: [analyzer.polarity_scores(t)["compound"] for t in texts]


# Copied from train_policy.py
def gold_scores(gold_fn, queries: torch.Tensor, responses: torch.Tensor, tokenizer, tldr: bool) -> tuple:
    """(the decoded responses, the gold labeler's (b,) scores of them or None). TL;DR summaries are decoded without
    their EOS, as the judge and the sample tables read them."""
    pad = tokenizer.pad_token_id
    texts = tokenizer.batch_decode([r[r != pad] for r in responses], skip_special_tokens=tldr)
    if gold_fn is None:
        return texts, None
    query_texts = tokenizer.batch_decode([q[q != pad] for q in queries])
    return texts, torch.tensor(gold_fn(texts, query_texts), device=queries.device)


# Copied from train_policy.py
def rouge(summaries: list, references: list) -> list:
    """Per pair {rouge1, rouge2, rougeL}: F1 of each summary against its reference, by rouge-score without stemming, as
    SFD's evaluate.load("rouge") computes it. {SFD}/summarize_from_feedback_details/sft.py#L37"""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    return [{k: v.fmeasure for k, v in scorer.score(ref, summary).items()} for summary,
            ref in zip(summaries, references)]


# Copied from train_policy.py
STOP_WORDS = frozenset("""a about above after again against all also am an and any are as at away back be because been
before
being below between both but by can could did do does doing down during each even ever every few for from further had
has
have having he her here hers herself him himself his how i if in into is it its itself just like me more most much my
myself
no nor not now of off on once one only onto or other our ours ourselves out over own same she should so some still such
than
that the their theirs them themselves then there these they this those through to too under until up upon us very was we
were
what when where which while who whom why will with would yet you your yours yourself yourselves""".split())


# Copied from train_policy.py
def words(text: str) -> list:
    """The lower-case words of a text (letters, with an inner apostrophe: "don't", "post's")."""
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())


# Copied from train_policy.py
def content_words(text: str) -> list:
    """Words of three letters or more that are not stop words, each cut to its Porter stem (nltk's, which rouge-score
    stems with), so that a summary may inflect the post's words: "twinkled" and "twinkling" both read "twinkl"."""
    return [porter_stem(w) for w in words(text) if len(w) > 2 and w not in STOP_WORDS]


# Copied from train_policy.py
@functools.lru_cache(maxsize=None)
def porter_stem(word: str) -> str:
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer().stem(word.removesuffix("'s"))


# Copied from train_policy.py
def judge_summary(post: str, summary: str, key_words: int = 8, max_words: int = 30, length_penalty: float = 0.02,
                  repeat_penalty: float = 1.0) -> dict:
    """The twin's stand-in for OpenAI's labelers, who read a post (and its title) and rated a summary on 7-point scales
    for accuracy, coverage, coherence and overall quality (Stiennon et al. 2020). It reads the post and the summary,
    nothing else (no reference summary; the title is no source: a copy of it would score as high as the reference).
    Returns {"score", "faithful", "coverage", "repeated", "words"}: faithful (accuracy): the share of the summary's
    content words that occur in the post (nothing made up); coverage: the share of the post's key words (its `key_words`
    most frequent content words used at least twice) that the summary mentions (its faithfulness if no word is used
    twice); repeated (coherence): the share of the summary's word bigrams that repeat an earlier one; score = (faithful
    + coverage) / 2 - repeat_penalty * repeated - length_penalty per word past max_words (concision; SmolLM2's reference
    summaries: median 25 words, 95% at most 33)."""
    said, counts = content_words(summary), collections.Counter(content_words(post))
    faithful = sum(w in counts for w in said) / len(said) if said else 0.0
    keys = [w for w, c in counts.most_common(key_words) if c >= 2]  # ties: the word used first comes first
    coverage = len(set(keys) & set(said)) / len(keys) if keys else faithful
    tokens = words(summary)
    bigrams = list(zip(tokens, tokens[1:]))
    repeated = 1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0
    n = len(summary.split())
    score = (faithful + coverage) / 2 - repeat_penalty * repeated - length_penalty * max(0, n - max_words)
    return dict(score=score, faithful=faithful, coverage=coverage, repeated=repeated, words=n)


# Copied from train_policy.py
def query_post(query: str) -> str:
    """The post read back from a decoded TL;DR query (format_tldr_query's format, pads removed): the judge reads what
    the policy was shown, a post cut to fit the query included."""
    m = re.search(r"\n\nPOST: (.*)\n\nTL;DR:", query, flags=re.S)
    if m is None:
        raise ValueError(f"not a TL;DR query (SUBREDDIT/TITLE/POST/TL;DR): {query[:80]!r}")
    return m.group(1)


# Copied from train_policy.py
def tldr_judge(summaries: list, queries: list) -> list:
    """The twin's judge (judge_summary's score) of each summary against the post of its decoded TL;DR query."""
    return [judge_summary(query_post(q), s)["score"] for s, q in zip(summaries, queries)]


# Copied from train_policy.py
@torch.no_grad()
def evaluate(sampler: "Sampler", reward_model, queries: torch.Tensor, references: torch.Tensor, tokenizer, args,
             gold_fn, accelerator, chunk: int = 64) -> dict:
    """(metrics, this process's summaries): summaries of held-out (b, Q) queries sampled at the sampler's (evaluation)
    temperature and cut at the truncate token as in training; ROUGE-1/2/L F1 against the (b, R) reference responses, the
    reward model's win rate against them and its mean score, and the gold judge's mean, as SFD evaluates
    ({SFD}/summarize_from_feedback_details/ppo.py#L371-L416). Each process takes every world-th query; the means cover
    all."""
    world, rank, pad = accelerator.num_processes, accelerator.process_index, tokenizer.pad_token_id
    queries, references = queries[rank::world], references[rank::world]
    responses = torch.cat([sampler(q, references.shape[1])[0] for q in queries.split(chunk)])
    truncate_token = truncate_token_id(args.truncate_token, tokenizer)
    truncated = responses if truncate_token is None else truncate_responses(responses, truncate_token,
                                                                         args.truncate_after, pad)
    texts = tokenizer.batch_decode([r[r != pad] for r in truncated], skip_special_tokens=True)
    ref_texts = tokenizer.batch_decode([r[r != pad] for r in references], skip_special_tokens=True)
    scores = in_chunks(lambda qr: reward_model(qr, pad), chunk, torch.cat([queries, truncated], 1))
    ref_scores = in_chunks(lambda qr: reward_model(qr, pad), chunk, torch.cat([queries, references], 1))
    per_pair = rouge(texts, ref_texts)
    sums = {f"eval/{k}": sum(r[k] for r in per_pair) for k in ("rouge1", "rouge2", "rougeL")}
    sums.update({"eval/win_rate": (scores > ref_scores).float().sum().item(), "eval/score": scores.sum().item(),
                 "eval/reference_score": ref_scores.sum().item()})
    if gold_fn:
        sums["eval/gold_score"] = sum(gold_fn(texts, tokenizer.batch_decode([q[q != pad] for q in queries])))
    names = sorted(sums)
    totals = accelerator.reduce(torch.tensor([sums[k] for k in names] + [float(len(queries))],
                                             device=accelerator.device), reduction="sum")
    return {k: (v / totals[-1]).item() for k, v in zip(names, totals)}, texts


# Copied from train_policy.py
def arithmetic_verifier(problem: str, response: str, ended: bool) -> dict:
    """{"correct", "formatted"}, each 0.0 or 1.0, of a response to an addition problem "a+b=" (data/arithmetic).
    Formatted: the response ended (its EOS was sampled within response_length; an answer cut off there is neither) and
    ends with its only "Answer:" and an integer written plainly: digits, an optional "-", no leading zero, no "+".
    Whitespace around the response and after "Answer:" is allowed; text after the answer is not. Correct: formatted,
    and the integer is a + b, computed from the problem (no stored answer is trusted)."""
    terms = re.fullmatch(r"\s*(\d+)\+(\d+)=\s*", problem)
    if terms is None:
        raise ValueError(f"not an addition problem a+b=: {problem!r}")
    text = response.strip()
    answer = re.fullmatch(r"(?s).*?Answer:[ \t]*(-?(?:0|[1-9][0-9]*))", text)
    formatted = ended and answer is not None and text.count("Answer:") == 1
    correct = formatted and int(answer.group(1)) == int(terms.group(1)) + int(terms.group(2))
    return {"correct": float(correct), "formatted": float(formatted)}


# Copied from train_policy.py
VERIFIERS = {"arithmetic": arithmetic_verifier}


# Copied from train_policy.py
def check_answers(verifier: str, queries: torch.Tensor, responses: torch.Tensor, tokenizer) -> dict:
    """{"correct", "formatted"}: (b,) checks by VERIFIERS[verifier] of (b, R) responses, truncated after their EOS, to
    (b, Q) problems; a response ended if it holds the EOS, and is read without it."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    problems = tokenizer.batch_decode([q[q != pad] for q in queries])
    texts = tokenizer.batch_decode([r[(r != pad) & (r != eos)] for r in responses])
    checks = [VERIFIERS[verifier](p, t, e) for p, t, e in zip(problems, texts, (responses == eos).any(1).tolist())]
    return {k: torch.tensor([c[k] for c in checks], device=queries.device) for k in ("correct", "formatted")}


# Copied from train_policy.py
@torch.no_grad()
def evaluate_answers(sampler: "Sampler", queries: torch.Tensor, tokenizer, args, accelerator, chunk: int = 64) -> tuple:
    """(metrics, this process's answers) of one answer per held-out (b, Q) problem, sampled at the sampler's
    (evaluation) temperature and cut after the EOS: eval/pass@1 (the share right), eval/formatted and
    eval/response_length (tokens kept, EOS included). Each process takes every world-th problem; the means cover all."""
    world, rank, pad = accelerator.num_processes, accelerator.process_index, tokenizer.pad_token_id
    queries = queries[rank::world]
    responses = torch.cat([sampler(q, args.response_length)[0] for q in queries.split(chunk)])
    truncated = truncate_responses(responses, tokenizer.eos_token_id, 0, pad)
    checks = check_answers(args.verifier, queries, truncated, tokenizer)
    sums = torch.stack([checks["correct"].sum(), checks["formatted"].sum(), (truncated != pad).sum().float(),
                        torch.tensor(float(len(queries)), device=queries.device)])
    totals = accelerator.reduce(sums, reduction="sum")
    texts = tokenizer.batch_decode([r[r != pad] for r in truncated], skip_special_tokens=True)
    return {"eval/pass@1": (totals[0] / totals[3]).item(), "eval/formatted": (totals[1] / totals[3]).item(),
            "eval/response_length": (totals[2] / totals[3]).item()}, texts


# Copied from train_policy.py
class HeldOut:
    """The evaluation on held-out TL;DR posts (--eval_dataset; otherwise it does nothing): the same posts and the same
    random draws every time (its own RNG stream), so that its changes are the policy's; summaries sampled at
    --eval_temperature, scored by evaluate() (answers to held-out problems, checked by evaluate_answers() under
    --verifier). Under ZeRO-3 the policy and the reward model are gathered, so that unequal shares of the posts need no
    lockstep."""

    def __init__(self, eval_texts, tokenizer, lm, policy, reward_model, gold_fn, args, accelerator):
        self.active, self.args, self.accelerator = eval_texts is not None, args, accelerator
        if not self.active:
            return
        self.policy, self.reward_model, self.tokenizer, self.gold_fn = policy, reward_model, tokenizer, gold_fn
        # the same held-out posts whatever the seed
        self.queries, self.references = next(query_batches(eval_texts, tokenizer, args.query_length,
                                                           args.response_length, min(args.num_eval, len(eval_texts)),
                                                           seed=0))
        self.sampler = Sampler(lm, tokenizer.pad_token_id, args.eval_temperature)

    def __call__(self) -> tuple:
        """(eval/* metrics, this process's summaries)."""
        accelerator, device = self.accelerator, self.accelerator.device
        self.policy.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), accelerator.autocast(), \
                full_weights(self.policy, accelerator), full_weights(self.reward_model, accelerator):
            torch.manual_seed(self.args.seed + accelerator.process_index * 100003)
            if self.args.verifier is not None:
                return evaluate_answers(self.sampler, self.queries.to(device), self.tokenizer, self.args, accelerator,
                                        self.args.local_rollout_forward_batch_size)
            return evaluate(self.sampler, self.reward_model, self.queries.to(device), self.references.to(device),
                            self.tokenizer, self.args, self.gold_fn, accelerator,
                            self.args.local_rollout_forward_batch_size)

    def before_training(self, run):
        """The initial policy's figures, the baseline of later evaluations, as metrics.jsonl's first line (update 0);
        not again when a run resumes."""
        if self.active and run.step == 0:
            metrics = {"update": 0, **self()[0]}
            run.write(metrics)
            if self.accelerator.is_main_process:
                print("before training: " + ", ".join(f"{k} {v:.3f}" for k,
                                                      v in metrics.items() if k.startswith("eval/")))

    def every(self, step: int, num_steps: int, metrics: dict) -> Optional[list]:
        """Every eval_every steps and after the last: the evaluation's figures added to the step's metrics; its
        summaries."""
        if not self.active or (step % self.args.eval_every and step != num_steps):
            return None
        eval_metrics, texts = self()
        metrics.update(eval_metrics)
        return texts


# Copied from train_policy.py
def now(device: torch.device) -> float:
    """Seconds on a wall clock, once the device has finished the work queued so far (CUDA kernels run asynchronously,
    so a phase's time is only known after a synchronize)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ---------------------------------------------------------------------------------------------------------
# Runs that survive: the run folder and its log, checkpoints and resume, a stop on SIGTERM/SIGINT or on a NaN
# ---------------------------------------------------------------------------------------------------------


# Copied from train_policy.py
def shared_run_dir(accelerator, run_root: str, exp_name: str, seed: int) -> Path:
    """A new folder runs/<exp_name>__<seed>__<unix time>, made by the main process, its name sent to the others. It is
    made exclusively: a run that starts in the same second with the same name gets a suffix (_2, _3, ...), so that two
    runs never share a folder."""
    name = [None]
    if accelerator.is_main_process:
        base = f"{exp_name}__{seed}__{int(time.time())}"
        for i in itertools.count(1):
            folder = Path(run_root) / (base if i == 1 else f"{base}_{i}")
            try:
                folder.mkdir(parents=True)
            except FileExistsError:
                continue
            name = [folder.name]
            break
    if accelerator.num_processes > 1:
        broadcast_object_list(name)
    return Path(run_root) / name[0]


# Copied from train_policy.py
EXIT_NONFINITE = 3  # a NaN or inf stopped the run (docs/runs.md lists every exit status: 0, 2, 3, 4, 128 + signal)


# Copied from train_policy.py
EXIT_NO_SPACE = 4  # a checkpoint could not be written: the disk is full


# Copied from train_policy.py
class Stream:
    """An iterator that counts what it has handed out: its position, which a checkpoint stores (state_dict) and a
    resumed run skips back to (load_state_dict)."""

    def __init__(self, iterator):
        self.iterator, self.position = iterator, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.position += 1
        return next(self.iterator)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict):
        while self.position < state["position"]:
            next(self)


# Copied from train_policy.py
class StopRequest:
    """SIGTERM (a scheduler's pre-emption; torchrun passes it on) or SIGINT (Ctrl-C) makes the run stop at the end of
    the current update, after a checkpoint; a second Ctrl-C stops it at once. close() puts the previous handlers
    back."""

    def __init__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = self.signum or signum

    def requested(self, accelerator) -> int:
        """The signal some process received (0: none), the same on every process so that all stop after the same
        update."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def close(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# Copied from train_policy.py
def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int, resume_command: str) -> Path:
    """run_dir/checkpoints/<step>/: accelerate's save_state (the prepared model and optimizer, or under DeepSpeed each
    engine's shards; every process's random generators; the objects registered for checkpointing) and metrics.jsonl as
    it stands. Written into a temporary folder that is then renamed, so a kill during the save leaves the earlier
    checkpoints whole; the last `keep` stay. A save that fails (a full disk) removes its temporary folder, keeps the
    earlier checkpoints and ends the run with one line: the path, the space free and the space a checkpoint takes
    (exit 4); freed, the run resumes from its last checkpoint as if it had never stopped."""
    root = run_dir / "checkpoints"
    tmp, final = root / f"tmp_{step:08d}", root / f"{step:08d}"
    failed = None
    try:
        if accelerator.is_main_process:
            if tmp.exists():  # left by a run killed while saving
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        # pickled, not safetensors: a tied embedding would be saved once, and its model would not load it back strictly
        accelerator.save_state(str(tmp), safe_serialization=False)
        if accelerator.is_main_process:
            shutil.copyfile(run_dir / "metrics.jsonl", tmp / "metrics.jsonl")
    except OSError as e:
        failed = e
    if any_process(accelerator, failed is not None):
        size = max((folder_size(p) for p in [tmp, *root.glob("[0-9]*")] if p.is_dir()), default=0)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root if root.exists() else run_dir).free
        reason = f"{failed.strerror or failed}" if failed is not None else "another process could not write its part"
        print(f"\nerror: checkpoint {final} could not be written ({reason}); {free / 1e9:.2f} GB free in {root}, a "
              f"checkpoint takes about {size / 1e9:.2f} GB: free space, then continue with: {resume_command}",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_NO_SPACE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp.rename(final)
        for old in sorted(p for p in root.iterdir() if p.name.isdigit())[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final



# Copied from train_policy.py
def any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` holds on some process, the same answer on all of them."""
    if accelerator.num_processes == 1:
        return flag
    flag = torch.tensor([float(flag)], device=accelerator.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


# Copied from train_policy.py
def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# Copied from train_policy.py
def unreadable(checkpoint: Path, rank: int) -> Optional[str]:
    """Why this process cannot resume from `checkpoint` (None if it can): a file of its that does not load (truncated,
    corrupt), a line of its metrics.jsonl that does not parse, this process's random generators missing."""
    if not (checkpoint / f"random_states_{rank}.pkl").is_file():
        return f"no random_states_{rank}.pkl (process {rank}'s random generators): it would not continue exactly"
    # the files load_state reads on this process: the model and optimizer (DeepSpeed: its shards and the model states),
    # the registered objects, its own random generators
    mine = lambda f: (f.suffix == ".bin" or f.name.startswith(("custom_checkpoint_", "mp_rank_"))
                      or f.name == f"random_states_{rank}.pkl" or f"pp_rank_{rank}_" in f.name)
    try:
        for line in open(checkpoint / "metrics.jsonl"):
            json.loads(line)
        for f in sorted(checkpoint.rglob("*")):
            if f.is_file() and mine(f):
                torch.load(f, map_location="cpu", weights_only=False)  # files this project wrote
    except Exception as e:  # whatever fails to read, the checkpoint is passed over and the reason told
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'unreadable'}"
    return None


# Copied from train_policy.py
def load_checkpoint(accelerator, run_dir: Path) -> Path:
    """Put back what run_dir's newest readable checkpoint holds (accelerate's load_state: the model, optimizer, random
    generators and the registered objects) and metrics.jsonl as it was then; its path. A checkpoint that cannot be read
    (a file truncated or corrupt, a metrics copy that does not parse, this process's random state missing: accelerate
    would only log it, and the run would silently stop being exact) is passed over for the one before it, saying which
    and why; every process takes the same one. No checkpoint at all, none readable, or one of the earlier layout
    (state.pt): one line, exit 2."""
    root = run_dir / "checkpoints"
    steps = sorted((p for p in root.iterdir() if p.name.isdigit()), reverse=True) if root.is_dir() else []
    if not steps:
        fail(f"--resume {run_dir}: it has no checkpoint (checkpoints/ is empty or missing), so there is nothing to "
             "continue from; start the run anew")
    if (steps[0] / "state.pt").is_file():
        fail(f"--resume {run_dir}: {steps[0]} was written by an earlier version of this script (state.pt), which this "
             "one cannot read; start the run anew")
    passed_over = []
    for path in steps:
        why = unreadable(path, accelerator.process_index)
        if not any_process(accelerator, why is not None):
            break
        if accelerator.is_main_process or why is not None:
            print(f"note: checkpoint {path} cannot be read ({why or 'by another process'}); trying the one before it",
                  flush=True)
        passed_over.append(path)
    else:
        fail(f"--resume {run_dir}: none of its {len(steps)} checkpoint(s) can be read")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # kept for a look, out of the way of the checkpoints the run will write again
        for bad in passed_over:
            bad.rename(bad.with_name(f"unreadable_{bad.name}"))
    accelerator.load_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.copyfile(path / "metrics.jsonl", run_dir / "metrics.jsonl")
    return path


# Copied from train_policy.py
def check_finite(metrics: dict, where: str, last_checkpoint: Optional[Path]):
    """A NaN or inf in a logged quantity (losses, scores, KL, entropy: the logits feed them) stops the run, exit status
    3; what was written stays as it was, and the last checkpoint holds the last good state. The metrics are averaged
    over processes, so every process stops at the same update."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        named = ", ".join(f"{k} = {metrics[k]}" for k in bad[:4])
        named += f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        # on a line of its own, after the progress bar
        print(f"\nerror: {where}: {named}; last good checkpoint: {last_checkpoint or 'none (none saved yet)'}",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_NONFINITE)


# Copied from train_policy.py
def resume_has_work(resume: Optional[str], world: int, stage: int) -> bool:
    """Whether the run folder given to --resume still has work: not once it finished (summary.json); an error when it
    ran with another number of processes (each process has its own random number generators) or another ZeRO stage (0:
    DDP; each keeps the weights and optimizer state in its own layout): relaunch it with the same accelerate config."""
    if resume is None:
        return True
    if (Path(resume) / "summary.json").is_file():
        print(f"{resume} has finished (summary.json): nothing to resume")
        return False
    started = json.loads((Path(resume) / "args.json").read_text())
    if started["world_size"] != world:
        fail(f"--resume {resume}: the run had {started['world_size']} process(es), not {world}")
    stage_then = started.get("zero_stage", 0)  # runs from before DeepSpeed ran under DDP
    if stage_then != stage:
        fail(f"--resume {resume}: the run had ZeRO stage {stage_then}, not {stage} (0: plain DDP); launch it as it was "
             "launched")
    return True


# Copied from train_policy.py
def write_summary(run_dir: Path, summary: dict, title: str):
    """The run's headline figures: a table on the terminal and run_dir/summary.json, whose presence marks a finished
    run."""
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


# Copied from train_policy.py
class Run:
    """A run's folder and everything it writes besides the trained model, so that train() makes one call where it would
    otherwise keep books: args.json (a fresh run's arguments, its process layout and `about`), metrics.jsonl (a resumed
    run appends to it), wandb under --track (a resumed run continues its wandb run), the rows of the sample tables
    (samples.json), the checkpoints, and summary.json with its table at the end. A checkpoint is accelerate's save_state
    with the objects registered for checkpointing: the script's (the KL controller, the position in the data) and this
    Run itself (the steps done, the seconds spent, the samples, the wandb id). Every process makes one; files are
    written by the main process (each process saves its own random generators)."""

    def __init__(self, accelerator, args, run_dir: Optional[Path], resume_command: str, step_key: str,
                 keep_samples: bool, objects: tuple = (), about: str = "", info: Optional[dict] = None,
                 unit: str = "update", stop: Optional[StopRequest] = None):
        self.accelerator, self.args, self.step_key, self.main = accelerator, args, step_key, accelerator.is_main_process
        self.unit = unit  # what a step is called in messages: an update, or SFT's step
        self.step, self.elapsed_before, self.start_time = 0, 0.0, time.time()
        self.samples, self.wandb_id, self.wandb, self.progress = [] if keep_samples else None, None, None, None
        self.dir = Path(args.resume) if args.resume else run_dir or shared_run_dir(accelerator, args.run_root,
                                                                                   args.exp_name, args.seed)
        self.resume_command = resume_command.format(run_dir=self.dir)
        accelerator.register_for_checkpointing(*objects, self)
        self.last = load_checkpoint(accelerator, self.dir) if args.resume else None
        self.stop = stop or StopRequest()  # train() makes it first thing: a signal while models load waits too
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.last is None:
                layout = {"world_size": accelerator.num_processes, "zero_stage": zero_stage(accelerator),
                          "grad_accum": accelerator.gradient_accumulation_steps}
                (self.dir / "args.json").write_text(json.dumps({**asdict(args), **layout, **(info or {})}, indent=2))
            self.file = open(self.dir / "metrics.jsonl", "a" if self.last else "w")
            if args.track:
                import wandb

                self.wandb = wandb
                self.wandb_id = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity,
                                           name=self.dir.name, config=asdict(args), dir=str(self.dir),
                                           id=self.wandb_id, resume="allow").id
            resumed = f"; resumed after {unit} {self.step} from {self.last}" if self.last else ""
            print(f"run folder {self.dir}; {about}{resumed}", flush=True)

    def state_dict(self) -> dict:
        return {"step": self.step, "elapsed_s": self.elapsed(), "samples": self.samples, "wandb_id": self.wandb_id}

    def load_state_dict(self, state: dict):
        self.step, self.elapsed_before, self.samples, self.wandb_id = (state["step"], state["elapsed_s"],
                                                                       state["samples"],
                                                                        state["wandb_id"])
        self.start_time = time.time()

    def elapsed(self) -> float:
        """Seconds of work, every resumed part of the run summed."""
        return self.elapsed_before + time.time() - self.start_time

    def steps(self, num_steps: int, desc: str, postfix: dict):
        """The steps still to run (all of them, or those after the checkpoint resumed from), with a progress bar that
        shows the metrics named in postfix (label: metrics.jsonl key) as each step ends."""
        self.postfix = postfix
        signum = self.stop.requested(self.accelerator)
        if signum and self.step == 0:  # the signal came while the run was loading: nothing to save yet
            if self.main:
                print(f"stopped by {signal.Signals(signum).name} before the first {self.unit}; nothing was saved: "
                      "start the run anew", flush=True)
            sys.exit(128 + signum)
        self.progress = tqdm(range(self.step, num_steps), initial=self.step, total=num_steps, disable=not self.main,
                             desc=desc)
        return self.progress

    def write(self, metrics: dict):
        """One line of metrics.jsonl, and a wandb step when the metrics have the step key (an evaluation before training
        without one, as PPO's and RLOO's, goes to the file only)."""
        if self.main:
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()
            if self.wandb is not None and self.step_key in metrics:
                self.wandb.log(metrics, step=metrics[self.step_key])

    def end_step(self, step: int, num_steps: int, metrics: dict):
        """At the end of step `step` of num_steps: its metrics logged; a NaN or inf ends the run (exit 3); a checkpoint
        every save_every steps (none after the last: the run then saves its models), and one when SIGTERM or SIGINT
        asked the run to stop, which it then does, exit status 128 + the signal."""
        self.step = step
        self.write(metrics)
        if self.main and self.postfix:
            self.progress.set_postfix({label: f"{metrics[key]:+.3g}" for label,
                                       key in self.postfix.items() if key in metrics})
        check_finite(metrics, f"{self.unit} {step}", self.last)
        signum = self.stop.requested(self.accelerator)
        if signum or (self.args.save_every and step % self.args.save_every == 0 and step < num_steps):
            self.last = save_checkpoint(self.accelerator, self.dir, step, self.args.keep_checkpoints,
                                        self.resume_command)
        if signum:
            if self.main:
                launch = " (launched as this run was)" if self.accelerator.num_processes > 1 else ""
                print(f"stopped by {signal.Signals(signum).name} after {self.unit} {step}; checkpoint {self.last}; "
                      f"continue with: {self.resume_command}{launch}", flush=True)
            sys.exit(128 + signum)

    def finish(self, summary_fn, title: str):
        """samples.json, the metrics file closed, summary.json from summary_fn(metrics.jsonl's path, seconds of work)
        with its table, wandb closed, the signal handlers put back."""
        self.stop.close()
        if self.main:
            if self.samples is not None:
                (self.dir / "samples.json").write_text(json.dumps(self.samples, indent=2))
            self.file.close()
            write_summary(self.dir, summary_fn(self.dir / "metrics.jsonl", self.elapsed()), f"{title}: {self.dir}")
            if self.wandb is not None:
                self.wandb.finish()
        self.accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------
# Past one GPU: plain DDP, or DeepSpeed ZeRO-2/3 when launched with one of configs/zero*.yaml
# ---------------------------------------------------------------------------------------------------------


# Copied from train_policy.py
def start_processes() -> PartialState:
    """Join the launch's processes (torchrun or accelerate launch) before anything asks for the world size. Without a
    GPU they talk over gloo: plain DDP needs cpu=True for that, while under DeepSpeed cpu=True would drop DeepSpeed and
    accelerate 1.15 leaves the group unset on a machine without a GPU, so the backend is named instead."""
    if torch.cuda.is_available():
        return PartialState()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true":
        return PartialState(backend="gloo")
    return PartialState(cpu=True)


# Copied from train_policy.py
def make_accelerator(args, micro_batch_size: int, grad_accum: int, max_grad_norm: float = 0.0,
                     compile: bool = False) -> Accelerator:
    """The run's Accelerator: DDP, or DeepSpeed ZeRO when the launch's config asks for it. DeepSpeed is handed the
    script's micro-batch, accumulation and clipping (0: none), so that an optimizer step sees the same gradient under
    both; left to accelerate, it would clip at 1.0 (as SFD's DeepSpeed runs did). SFD sets the micro-batch the same way:
    {SFD}/summarize_from_feedback_details/ppo.py#L517-L518. --compile: accelerate compiles the training forward. Called
    after start_processes (the sizes it is given depend on the world size)."""
    accelerator = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=grad_accum,
                              dynamo_backend="inductor" if compile else "no")
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        if compile:
            fail("--compile does not combine with DeepSpeed (its engine wraps the forward that would be compiled); "
                 "drop one")
        if args.load_in_4bit and plugin.zero_stage == 3:
            fail("--load_in_4bit (QLoRA) does not combine with ZeRO-3, which would shard the 4-bit weights; use "
                 "configs/zero2.yaml")
        if plugin.zero3_init_flag:
            fail("zero3_init_flag: true in the accelerate config is not supported: the scripts load whole models, then "
                 "shard them; set it false")
        # accelerate registers its DeepSpeed config with transformers whatever zero3_init_flag says, and from_pretrained
        # would then load models already sharded (zero.Init); unregistered, they load whole and prepare shards them
        unset_hf_deepspeed_config()
        # all set anew, for train_both.py's second stage shares the first one's plugin
        plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=micro_batch_size,
                                       gradient_accumulation_steps=grad_accum,
                                       train_batch_size=micro_batch_size * grad_accum * accelerator.num_processes,
                                       gradient_clipping=max_grad_norm if math.isfinite(max_grad_norm) else 0.0)
    return accelerator


# Copied from train_policy.py
def zero_stage(accelerator) -> int:
    """The ZeRO stage of the run; 0 without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return 0 if plugin is None else plugin.zero_stage


# Copied from train_policy.py
def place_frozen(model: nn.Module, accelerator, dtype: torch.dtype) -> nn.Module:
    """A frozen model (the reference, the reward model) ready for forward passes: a whole copy on every process under
    DDP and ZeRO-2; under ZeRO-3 sharded over the processes by a DeepSpeed inference engine (no optimizer), each forward
    gathering one layer at a time, with the parameter offload of the launch's config, as SFD's large runs place theirs:
    {SFD}/summarize_from_feedback_details/ppo.py#L519-L536."""
    model = model.eval().requires_grad_(False)
    if zero_stage(accelerator) < 3:
        return model.to(accelerator.device, dtype)
    import deepspeed

    config = accelerator.state.deepspeed_plugin.deepspeed_config
    offload = config["zero_optimization"].get("offload_param", {"device": "none"})
    engine, *_ = deepspeed.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": config["train_micro_batch_size_per_gpu"],
        "bf16": {"enabled": dtype == torch.bfloat16}, "prescale_gradients": False,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e4, "offload_param": offload}})
    return engine


# Copied from train_policy.py
@contextmanager
def full_weights(model, accelerator, edit: bool = False):
    """Inside, a model prepared by accelerate or a frozen one from place_frozen (any other model, or None, is left as it
    is) holds every weight whole on every process. Under ZeRO-3 its shards are gathered once (DeepSpeed's
    GatheredParameters) and the per-layer gather hooks lifted until the end, so that token-by-token sampling runs as
    fast as an unsharded model (TRL's unwrap_model_for_generation, PR #1483: about 10x), saving sees whole tensors, and
    processes with unequal shares of held-out data need not run their forwards in lockstep. Every process enters
    together; the sampler draws exactly response_length tokens everywhere (no stop at EOS), so the ranks decode in step,
    which is what synced_gpus gives generate(). Yields the bare module (a DeepSpeed engine's own `config` hides the
    model's). edit=True: weights set inside (the reward model's gain and bias) are kept: scattered back from the main
    process, and DeepSpeed's fp32 master copy of them refreshed (ZeRO-2 too). Under DDP, nothing."""
    stage = zero_stage(accelerator)
    if stage == 3 and type(model).__name__ == "DeepSpeedEngine":
        import deepspeed

        offload = getattr(model.optimizer, "parameter_offload",
                          model.optimizer)  # a trained engine's, or a frozen one's
        start_hook = offload.module._forward_pre_hooks[offload.fwd_pre_hook.id]  # on the root: steps the ranks together
        with deepspeed.zero.GatheredParameters(list(model.module.parameters()), modifier_rank=0 if edit else None):
            for p in model.module.parameters():
                p.ds_active_sub_modules.clear()
            for hook in [offload.fwd_pre_hook, *offload.forward_hooks, *offload.backward_hooks]:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield accelerator.unwrap_model(model)
            finally:  # the hooks back, in their order
                offload.fwd_pre_hook = offload.module.register_forward_pre_hook(start_hook)
                offload._register_deepspeed_module(offload.module)
    else:
        yield model if model is None else accelerator.unwrap_model(model)
    if edit and stage:
        model.optimizer.refresh_fp32_params()


# ---------------------------------------------------------------------------------------------------------
# Checks of the arguments, the update's metrics, the sample tables and the summary, saving the policy
# ---------------------------------------------------------------------------------------------------------


# The flags of every script, checked before any work by check_common: sizes and counts at least 1, counts that may be
# 0, and quantities that must be positive (the temperature divides the logits; Adam divides by epsilon) or within [0, 1]
# Copied from train_policy.py
AT_LEAST_ONE = ("total_episodes", "batch_size", "nminibatches", "noptepochs", "local_micro_batch_size",
                "local_rollout_forward_batch_size", "query_length", "response_length", "k", "num_train", "num_test",
                "normalize_samples", "rollout_batch_size", "total_steps", "block_size", "n_layer", "n_embd", "n_head",
                "n_positions", "num_eval", "eval_every", "print_sample_every", "keep_checkpoints", "kl_horizon",
                "sample_length")
# Copied from train_policy.py
AT_LEAST_ZERO = ("save_every", "truncate_after", "num_print_samples", "num_samples", "warmup_steps",
                 "sample_prompt_tokens", "kl_coef", "vf_coef", "weight_decay", "max_grad_norm", "format_reward")
# Copied from train_policy.py
POSITIVE = ("lr", "eps", "temperature", "eval_temperature", "cliprange", "cliprange_value", "kl_target",
            "tis_cap")
# Copied from train_policy.py
UNIT_INTERVAL = ("gamma", "lam", "dropout")


# Copied from train_policy.py
def check_common(args):
    """The checks every script's flags share, before anything is loaded or written: each named above in range (one line
    naming the flag and its value, exit 2), and a run root that is a folder, or can be made one, that this process may
    write in (a file or a read-only mount ends the run before any work)."""
    for f in fields(args):
        value = getattr(args, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if f.name in AT_LEAST_ONE and value < 1:
            fail(f"--{f.name} {value} must be at least 1")
        if f.name in AT_LEAST_ZERO and not value >= 0:  # (not >=: NaN fails too)
            fail(f"--{f.name} {value} must be at least 0")
        if f.name in POSITIVE and not (math.isfinite(value) and value > 0):
            fail(f"--{f.name} {value} must be a finite positive number")
        if f.name in UNIT_INTERVAL and not 0 <= value <= 1:
            fail(f"--{f.name} {value} must be within [0, 1]")
    if args.resume is None:
        root = Path(args.run_root)
        if root.exists() and not root.is_dir():
            fail(f"--run_root {args.run_root} is a file, not a folder")
        existing = next(p for p in [root, *root.absolute().parents] if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            fail(f"--run_root {args.run_root}: {existing} cannot be written (read-only or not ours)")


def check_args(args: Args) -> tuple:
    """Every check of the arguments that needs no training, run before anything is trained or written. Returns the
    number of updates and the query and evaluation texts it read."""
    check_common(args)
    world = PartialState().num_processes
    if args.k < 1 or (args.k < 2 and args.advantage == "rloo"):
        fail(f"--k {args.k}: at least 1 sample per prompt, and 2 for rloo (its baseline is the other samples' mean)")
    if args.batch_size % (args.k * world):
        fail(f"--batch_size {args.batch_size} is not divisible by --k {args.k} x {world} processes (each process takes "
             "whole prompts)")
    local_batch_size = args.batch_size // world
    if local_batch_size % args.nminibatches or (local_batch_size // args.nminibatches) % args.local_micro_batch_size:
        fail(f"--batch_size {args.batch_size} / {world} process(es) / --nminibatches {args.nminibatches} is not a "
             f"multiple of --local_micro_batch_size {args.local_micro_batch_size}")
    if args.local_micro_batch_size % args.k or args.local_rollout_forward_batch_size % args.k:
        fail(f"--local_micro_batch_size {args.local_micro_batch_size} and --local_rollout_forward_batch_size "
             f"{args.local_rollout_forward_batch_size} must be multiples of --k {args.k} "
             "(a prompt's k samples share its forward pass)")
    if args.loss_aggregation is not None and args.advantage not in ("grpo", "dr_grpo"):
        fail(f"--loss_aggregation {args.loss_aggregation} applies to grpo's and dr_grpo's token losses, not to "
             f"--advantage {args.advantage}")
    if not args.beta >= 0:
        fail(f"--beta {args.beta} must be at least 0")
    check_verifier(args)
    if args.verifier is None:  # then a reward model
        if args.reward_model is None:
            fail("--reward_model is required (a folder written by train_reward.py), or --verifier")
        if os.path.isfile(args.reward_model):
            fail(f"--reward_model {args.reward_model} is a file: give the folder train_reward.py wrote (its run's "
                 "reward_model/)")
        if not os.path.isdir(args.reward_model):
            fail(f"--reward_model {args.reward_model}: folder not found")
    check_lora(args)
    config, tokenizer = load_base_model(args.base_model, weights=False)
    if args.query_length + args.response_length > getattr(config, "n_positions",
                                                          getattr(config, "max_position_embeddings", 1 << 30)):
        fail(f"--query_length + --response_length = {args.query_length + args.response_length} exceeds the model's "
             "positions")
    truncate_token_id(args.truncate_token, tokenizer)
    texts = load_texts(args.query_dataset, args.query_split)
    if args.reference_baseline and isinstance(texts[0], str):
        fail(f"--reference_baseline needs TL;DR queries with reference summaries; --query_dataset {args.query_dataset} "
             "holds texts")
    eval_texts = None if args.eval_dataset is None else load_texts(args.eval_dataset, args.eval_split, "--eval_dataset")
    check_query_rows(args, texts, eval_texts)
    num_updates = math.ceil(args.total_episodes / args.batch_size)
    if args.total_episodes % args.batch_size and PartialState().is_main_process:
        print(f"note: --total_episodes {args.total_episodes} is not a multiple of --batch_size {args.batch_size}: "
              f"{num_updates} updates train on {num_updates * args.batch_size} episodes (rounded up)", flush=True)
    return num_updates, texts, eval_texts


# Copied from train_policy.py
def check_same_tokenizer(reward_tokenizer, tokenizer, args):
    """The reward model reads the policy's token ids: its tokenizer must be the policy's.
    {OAI}/lm_human_preferences/rewards.py#L119"""
    if len(reward_tokenizer) != len(tokenizer) or reward_tokenizer.pad_token_id != tokenizer.pad_token_id:
        fail(f"--reward_model {args.reward_model}: its tokenizer ({len(reward_tokenizer)} tokens) "
             f"differs from --base_model {args.base_model}'s ({len(tokenizer)})")


# Copied from train_policy.py
def check_verifier(args):
    """--verifier replaces the reward model: nothing that needs one may come with it."""
    if args.verifier is None:
        if args.format_reward:
            fail(f"--format_reward {args.format_reward} rewards well-formed answers, which only a --verifier checks")
        return
    clashes = {"--reward_model": args.reward_model is not None, "--reference_baseline": args.reference_baseline,
               "--value_model reward": getattr(args, "value_model", None) == "reward"}  # train_rloo.py has no critic
    for flag, given in clashes.items():
        if given:
            fail(f"--verifier {args.verifier} replaces the reward model, which {flag} needs")


# Copied from train_policy.py
def check_query_rows(args, texts, eval_texts):
    """Problems to answer under --verifier, and only there; held-out TL;DR posts, or problems under --verifier."""
    if (args.verifier is not None) != (row_kind(texts[0]) == "problem"):
        fail(f"--query_dataset {args.query_dataset}: " + ("--verifier checks answers to problems (rows with a "
                                                           "\"problem\", as data/arithmetic/)" if args.verifier else
                                                           "problems need a --verifier to check their answers"))
    kinds = {"text": "texts", "tldr": "TL;DR posts with summaries", "problem": "problems"}
    wanted = "problem" if args.verifier else "tldr"  # what the held-out evaluation reads
    if eval_texts is not None and row_kind(eval_texts[0]) != wanted:
        fail(f"--eval_dataset {args.eval_dataset}: held-out {kinds[wanted]} are needed, not "
             f"{kinds[row_kind(eval_texts[0])]}")


# Copied from train_policy.py
def logprob_mismatch(train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, valid: torch.Tensor) -> dict:
    """How far the training forward's log-probs of the sampled tokens are from the sampler's while the policy is
    still the one that sampled (before the update's first optimizer step); each (b, R). They agree up to float
    error unless the two paths compute different distributions: a temperature, a top-k / top-p truncation or a
    precision one of them misses (TRL #4159, #4772; docs/pitfalls.md). The mean and max |difference| over the valid
    tokens, and the mean over responses of the whole response's ratio pi_train / pi_sampler."""
    diff = (train_logprobs - sampler_logprobs).masked_fill(~valid, 0.0)
    return {"mismatch/logprob_diff_mean": diff.abs().sum() / valid.sum(), "mismatch/logprob_diff_max": diff.abs().max(),
            "mismatch/response_ratio": diff.sum(1).exp().mean()}


def rloo_metrics(accelerator, update: int, num_updates: int, args, rollout_stats: dict, minibatch_stats: list,
                 times: tuple) -> dict:
    """The update's line of metrics.jsonl: the statistics of the rollouts and of the minibatches (their mean), each
    averaged over the processes; the learning rate, each phase's seconds and episodes per second."""
    t0, t_gen, t_score, t_update = times
    local = {name: torch.stack([s[name] for s in minibatch_stats]).mean() for name in minibatch_stats[0]}
    local.update(rollout_stats)
    names = sorted(local)
    means = accelerator.reduce(torch.stack([local[name].float() for name in names]), reduction="mean").tolist()
    metrics = {"episode": (update + 1) * args.batch_size, "update": update + 1, **dict(zip(names, means)),
               "lr": args.lr * (1 - update / num_updates), "timing/generation_s": t_gen - t0,
               "timing/scoring_s": t_score - t_gen, "timing/update_s": t_update - t_score,
               "throughput/episodes_per_s": args.batch_size / (now(accelerator.device) - t0)}
    if accelerator.device.type == "cuda":
        metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 1e9
    return metrics


# Copied from train_policy.py
def summarize(metrics_path: Path, wall_s: float) -> dict:
    """Headline figures of a PPO or RLOO run: score, gold and KL at the first update and over the last tenth of updates
    (as docs/ppo.md and docs/rloo.md report them), the held-out evaluation before and after, episodes/s, wall time
    (every resumed part summed)."""
    metrics = [json.loads(line) for line in open(metrics_path)]
    updates = [m for m in metrics if "objective/scores" in m]
    evals = [m for m in metrics if "eval/win_rate" in m or "eval/pass@1" in m]
    tenth = updates[-max(1, len(updates) // 10) :]
    summary = {"updates": len(updates), "episodes": updates[-1]["episode"]}
    for key, name in (("objective/scores", "score"), ("objective/gold_score", "gold"), ("objective/kl", "kl")):
        if key in updates[0]:
            summary[f"{name}/first_update"] = updates[0][key]
            summary[f"{name}/last_tenth"] = sum(m[key] for m in tenth) / len(tenth)
    for key in ("eval/rougeL", "eval/gold_score", "eval/win_rate", "eval/pass@1"):
        if evals and key in evals[0]:
            summary[f"{key}/before"], summary[f"{key}/after"] = evals[0][key], evals[-1][key]
    summary["episodes_per_s"] = sum(m["throughput/episodes_per_s"] for m in updates) / len(updates)
    summary["wall_s"] = wall_s
    return summary


# Copied from train_policy.py
def print_samples(rows: list, update: int):
    table = Table(title=f"samples at update {update}", show_lines=True)
    for column, width in [("query", 50), ("response", 50), ("score", 7), ("gold", 7), ("kl", 6)]:
        table.add_column(column, max_width=width)
    for r in rows:
        gold = "" if r["gold_score"] is None else f"{r['gold_score']:+.2f}"
        table.add_row(r["query"], r["response"], f"{r['score']:+.2f}", gold, f"{r['kl']:+.2f}")
    Console().print(table)


# Copied from train_policy.py
def sample_rows(update: int, queries: torch.Tensor, texts: list, scores: torch.Tensor, gold: Optional[torch.Tensor],
                kl: torch.Tensor, n: int, tokenizer) -> list:
    """The first n episodes of a batch as rows of the sample table: query, response, score, gold score, KL."""
    pad = tokenizer.pad_token_id
    return [{"update": update, "query": tokenizer.decode(queries[i][queries[i] != pad]), "response": texts[i],
             "score": scores[i].item(), "gold_score": gold[i].item() if gold is not None else None,
             "kl": kl[i].item()} for i in range(n)]


# Copied from train_policy.py
def show_samples(run, update: int, num_updates: int, rows: list, eval_texts: Optional[list], args):
    """Every print_sample_every updates and after the last, the sample table printed and its rows kept for samples.json,
    with the first held-out summaries of an evaluation."""
    if not run.main:
        return
    if update % args.print_sample_every == 0 or update + 1 == num_updates:
        print_samples(rows, update + 1)
        run.samples.extend(rows)
    if eval_texts is not None:
        run.samples.append({"update": update + 1, "eval_summaries": eval_texts[: args.num_print_samples]})


# Copied from train_policy.py
def write_model_folder(accelerator, lm, lora, tokenizer, folder: Path):
    """The trained language model (adapters merged under LoRA) and its tokenizer as a plain model folder, written by the
    main process; under ZeRO-3 called inside full_weights, which every process enters."""
    if accelerator.is_main_process:
        saved_lm(lm, lora).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        print(f"policy saved to {folder}")


def save_rloo_policy(accelerator, policy, unwrapped, lora, tokenizer, run_dir: Path):
    """The trained policy as a plain model folder, run_dir/policy (adapters merged under LoRA). Under ZeRO-3 every
    process gathers the weights; the main one writes them."""
    with full_weights(policy, accelerator):
        write_model_folder(accelerator, unwrapped, lora, tokenizer, run_dir / "policy")


if __name__ == "__main__":
    train(cli(Args, PRESETS, __doc__))

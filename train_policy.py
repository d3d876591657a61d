"""PPO against a learned reward model, as OpenAI's lm-human-preferences trained GPT-2 (Ziegler et al. 2019).

    python train_policy.py --reward_model runs/<reward run>/reward_model     # the embedded world (CPU, minutes)
    python train_both.py                                                     # reward model, then this, in one go
    accelerate launch --num_processes 8 train_policy.py sentiment --reward_model ...   # OAI's sentiment run

A first positional word picks a preset (`sentiment` or `descriptiveness`): OAI's launch.py values, overridable by any
flag after it. Every implementation detail that matters is written out below, with a link to the OAI line it reproduces
({OAI} stands for https://github.com/openai/lm-human-preferences/blob/cbfd210bb8b08f6bc5c26878c10984b90f516c66, {SFD}
for https://github.com/vwxyzjn/summarize_from_feedback_details/blob/ee77a9abc31f5338365ee087945c5bcafac7f1ca);
docs/ppo.md lists them with their tests. Tensor shapes: b = episodes on this process, Q = query_length, R =
response_length.
"""

import collections
import copy
import functools
import itertools
import gzip
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
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GgufConfig, StaticCache
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.integrations import unset_hf_deepspeed_config
from transformers.pytorch_utils import Conv1D


@dataclass
class Args:
    # ---- task and data (OAI's TaskHParams) ----
    base_model: str = "data/nano"
    """initial policy and reference model: hub id, local folder or .gguf file"""
    reward_model: Optional[str] = None
    """folder written by train_reward.py (its run folder's reward_model/); train_both.py fills it in"""
    verifier: Optional[Literal["arithmetic"]] = None
    """instead of a reward model, a program that checks each answer (RL with verifiable rewards): arithmetic scores 1
    for the right sum of a data/arithmetic problem and 0 otherwise (arithmetic_verifier); queries are problems"""
    format_reward: float = 0.0
    """with --verifier: added to the score of every well-formed answer (one "Answer: N" at the end), right or wrong"""
    query_dataset: str = "data/corpus.jsonl.gz"
    """queries: books texts (a .jsonl(.gz) of JSON strings as OAI's book_passages, or of {"text": ...}, or a hub dataset
    with a text column), TL;DR posts with reference summaries (a .jsonl(.gz) of {subreddit, title, post, summary}, or
    a hub dataset), or a verifiable task's problems (a .jsonl(.gz) of {"problem": ...}, data/arithmetic/)"""
    query_split: str = "train"
    """split of a hub query dataset"""
    query_length: int = 32
    """query tokens, left-padded. Books: the text after its first '.', cut to this length, then after its last '.';
    TL;DR: SUBREDDIT/TITLE/POST/TL;DR with the post cut at its last newline until it fits"""
    response_length: int = 24
    """tokens sampled per response (always all of them: no stop at EOS)"""
    truncate_token: Optional[str] = None
    """cut each response after the first occurrence of this token at or after truncate_after before scoring (OAI: '.';
    SFD: "eos", the tokenizer's EOS); None keeps it whole"""
    truncate_after: int = 16
    """responses are cut no earlier than this index; one with no truncate_token from here on scores
    penalty_reward_value"""
    penalty_reward_value: float = -1.0
    """score of a response that has no truncate_token at or after truncate_after"""

    # ---- sampling ----
    temperature: float = 0.7
    """sampling temperature; every log-probability is computed from logits divided by it"""

    # ---- PPO (OAI's PpoHParams) ----
    total_episodes: int = 2560
    """episodes (query, response pairs) in all; updates = total_episodes / batch_size"""
    batch_size: int = 64
    """episodes per update, summed over all processes"""
    nminibatches: int = 2
    """minibatches per PPO epoch (each one optimizer step)"""
    noptepochs: int = 4
    """PPO epochs over each batch, reshuffled every epoch"""
    local_micro_batch_size: int = 32
    """episodes per forward/backward on one process; gradient accumulation makes up a minibatch"""
    lr: float = 5e-5
    """Adam learning rate at the first update, annealed linearly to 0 at the last"""
    eps: float = 1e-5
    """Adam epsilon (OAI: 1e-5)"""
    optimizer: Literal["adam_tf", "adam_pytorch", "adamw"] = "adam_tf"
    """adam_tf: TF1's Adam (epsilon-hat, as OAI ran); adam_pytorch: torch.optim.Adam; adamw: torch.optim.AdamW (SFD)"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    cliprange: float = 0.2
    """PPO ratio clip"""
    cliprange_value: float = 0.2
    """value prediction clip around the rollout's values"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    whiten_rewards: bool = True
    """whiten rewards (without shifting their mean) per minibatch before GAE (SFD: no)"""
    mask_after_truncate: bool = False
    """SFD: what follows the truncate token leaves the losses and the KL (values one token later), and the score goes
    right after the truncate token; OAI trains on whole responses, the score at the last token"""
    value_model: Literal["shared", "reward", "base"] = "shared"
    """shared: a value head on the policy's transformer (OAI); reward: a separate critic initialised from the reward
    model (SFD); base: a separate critic initialised from the base model with a fresh head (TRL's PPOTrainer)"""
    reference_baseline: bool = False
    """trlX: the score is r(query, response) - r(query, reference summary) (TL;DR queries, which carry references)"""
    tis_cap: Optional[float] = None
    """truncated importance sampling (Yao et al. 2025): the ratio's old log-probs come from a training forward of the
    batch before the update, and each token's policy loss is weighted by min(pi_train / pi_sampler, tis_cap), detached:
    a correction for a sampler that computes another distribution (bf16, other kernels); None: off (OAI)"""

    # ---- KL penalty (OAI's RewardHParams) ----
    kl_coef: float = 0.15
    """initial coefficient of the per-token KL penalty"""
    adaptive_kl: bool = True
    """adapt kl_coef towards kl_target (OAI's AdaptiveKLController); False keeps it fixed"""
    kl_target: float = 4.0
    """target of the mean summed KL per response (nats)"""
    kl_horizon: int = 256
    """adaptive KL horizon in episodes (OAI: 10000 for 1M episodes)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """per-token KL estimate from the sampled token, d = logp - logp_ref: k1 = d (OAI), k2 = d^2 / 2, k3 = exp(-d) + d
    - 1 (GRPO's); see kl_estimate"""
    kl_in: Literal["reward", "loss"] = "reward"
    """where the KL penalty goes: the per-token reward (OAI), or a loss term kl_coef x the mean over responses of the
    summed estimate, differentiated (GRPO's place); the controller adapts kl_coef either way"""

    # ---- experiment ----
    exp_name: str = "policy"
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
    """run folder to continue from its last checkpoint, with the arguments it started with (its args.json); no other
    flag"""

    # ---- logging and evaluation ----
    gold_labeler: Literal["vader", "tldr_judge", "none"] = "vader"
    """programmatic labeler whose score of every sample is logged as objective/gold_score: VADER (the sentiment world's
    labeler) or the summarization twin's judge (how faithful, covering, unrepeated and short a summary is, read against
    the post and title of its query)"""
    eval_dataset: Optional[str] = None
    """held-out TL;DR posts (a .jsonl(.gz) or a hub dataset): ROUGE, win rate against the reference and gold every
    eval_every updates; with --verifier, held-out problems: pass@1, the share of right answers"""
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
    peak_flops: Optional[float] = None
    """this machine's matmul peak in FLOP/s per process (benchmark/matmul_peak.py measures it); logs the update phase's
    share of it"""

    # ---- LoRA (peft) ----
    lora_r: int = 0
    """rank of the LoRA adapters put on the language model's layers (0: no LoRA, every weight trains); heads train in
    full"""
    lora_alpha: float = 16.0
    """LoRA's scale numerator: the adapters' update is multiplied by lora_alpha / lora_r"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input (OAI and SFD train without dropout)"""
    lora_target_modules: str = "all-linear"
    """layers that get adapters: comma-separated module names (GPT-2: c_attn,c_proj,c_fc; Llama:
    q_proj,k_proj,v_proj,o_proj,...) or all-linear (every linear layer but the output projection)"""
    load_in_4bit: bool = False
    """QLoRA: the frozen base weights quantized to 4-bit NF4 by bitsandbytes, adapters on top (a CUDA GPU only; needs
    --lora_r)"""

    # ---- speed (the same function, computed faster; for GPUs) ----
    mixed_precision: Literal["no", "bf16"] = "no"
    """bf16: every forward (sampling, value, reference, reward, training) multiplies in bf16, the frozen reference and
    reward models are kept in bf16; softmax, log-probs, losses and Adam's state stay fp32. On an AVX2-only CPU it is
    much slower"""
    compile: bool = False
    """torch.compile the sampler's decoding step (a CUDA graph on a GPU) and the training forward; the first update pays
    the compilation (minutes)"""
    local_rollout_forward_batch_size: int = 64
    """episodes per forward pass of the reference and reward models on one process (their memory is bounded by it, not
    by the batch)"""


# ---------------------------------------------------------------------------------------------------------
# The policy and its value, sampling, log-probs at the temperature, the frozen reference
# ---------------------------------------------------------------------------------------------------------


class PolicyAndValue(nn.Module):
    """The policy's language model and its value function: a head on the policy's own last hidden state (one shared
    transformer, as OAI's Policy with scalar head 'value'; init 0, {OAI}/lm_human_preferences/language/model.py#L368),
    or a separate critic initialised from the reward model (SFD, {SFD}/summarize_from_feedback_details/ppo.py#L478-L488)
    or from the base model with a fresh head (TRL's PPOTrainer, whose value model is a second copy of the base)."""

    def __init__(self, lm, critic: Optional["RewardModel"] = None):
        super().__init__()
        self.lm, self.critic = lm, critic
        if critic is None:
            self.value_head = nn.Linear(lm.config.hidden_size, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def critic_values(self, tokens: torch.Tensor, pad_token_id: int, response_length: int) -> torch.Tensor:
        """(b, R) values of the separate critic at the R positions Q-1 .. Q+R-2 (the state before each response
        token)."""
        return self.critic.scores(tokens, pad_token_id)[:, -response_length - 1 : -1]

    def forward(self, tokens: torch.Tensor, pad_token_id: int, response_length: int) -> tuple:
        """(logits (b, R, V), values (b, R)) at the R positions Q-1 .. Q+R-2 of (b, Q+R) query+response tokens:
        position Q-1+t predicts response token t and holds the state before it."""
        shared = self.critic is None
        out = self.lm(**model_inputs(tokens, pad_token_id), output_hidden_states=shared,
                      logits_to_keep=response_length + 1)
        if shared:
            # after the final layer norm
            values = self.value_head(out.hidden_states[-1][:, -response_length - 1 : -1]).squeeze(-1)
        else:
            values = self.critic_values(tokens, pad_token_id, response_length)
        return out.logits[:, :-1], values


def model_inputs(tokens: torch.Tensor, pad_token_id: int) -> dict:
    """Pads are masked out and each real token's position counts only the real tokens before it, so that padding (left
    or right) never changes a real token's output. {OAI}/lm_human_preferences/language/model.py#L265-L269"""
    mask = tokens != pad_token_id
    return dict(input_ids=tokens, attention_mask=mask.long(), position_ids=(mask.cumsum(1) - 1).clamp(min=0))


def sampling_logits(logits: torch.Tensor, temperature: float, pad_token_id: int) -> torch.Tensor:
    """Logits divided by the temperature, in sampling and in every later log-prob, and the pad token made
    impossible (OAI slices its special tokens off the logits). {OAI}/lm_human_preferences/policy.py#L58-L59"""
    logits = logits.float() / temperature  # a new tensor, so the pad's column is filled in place (no (b, R, V) copy)
    return logits.index_fill_(-1, torch.tensor([pad_token_id], device=logits.device), -1e9)


def sample_token(probs: torch.Tensor) -> torch.Tensor:
    """(b, 1) token ids drawn from (b, V) probabilities by inverting the CDF with one uniform per row. The same
    distribution as torch.multinomial(probs, 1), which draws V exponentials per row instead (7 of the 35 ms of a
    64 x 4096 sampling step on two CPU cores). A zero-probability token (the pad) is never drawn."""
    cdf = probs.cumsum(-1)  # (b, V)
    u = torch.rand(len(probs), 1, device=probs.device) * cdf[:, -1:]  # (b, 1), uniform on [0, total mass)
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1)


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


def response_logits(lm, tokens: torch.Tensor, pad_token_id: int, response_length: int) -> torch.Tensor:
    """(b, R, V) logits that predict the R response tokens of (b, Q+R) query+response tokens. The output projection
    (d x V, the largest matmul of a small model) runs on these R positions only, not on the Q query positions."""
    return lm(**model_inputs(tokens, pad_token_id), logits_to_keep=response_length + 1).logits[:, :-1]


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


# ---------------------------------------------------------------------------------------------------------
# Truncation, rewards with the KL penalty, KL control
# ---------------------------------------------------------------------------------------------------------


def truncate_responses(responses: torch.Tensor, truncate_token: int, truncate_after: int,
                       pad_token_id: int) -> torch.Tensor:
    """Replace every token after the first truncate_token at or after index truncate_after with the pad token.
    {OAI}/lm_human_preferences/lm_tasks.py#L39-L50"""
    hit = responses == truncate_token
    hit[:, :truncate_after] = False
    after = (hit.long().cumsum(1) - hit.long()).bool()  # strictly after the first hit
    return responses.masked_fill(after, pad_token_id)


def penalize(scores: torch.Tensor, responses: torch.Tensor, truncate_token: int, truncate_after: int,
             penalty: float) -> torch.Tensor:
    """A response with no truncate_token at or after truncate_after gets `penalty` instead of its score.
    {OAI}/lm_human_preferences/lm_tasks.py#L58-L65 and {OAI}/lm_human_preferences/train_policy.py#L384-L390"""
    valid = (responses[:, truncate_after:] == truncate_token).any(1)
    return torch.where(valid, scores, torch.full_like(scores, penalty))


INVALID_LOGPROB = 1.0  # SFD's log-prob of a masked token: the same in the policy and the reference, so no KL


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


def compute_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, score_index: torch.Tensor) -> tuple:
    """Per-token rewards (b, R): -kl_coef * kl at every token (kl: the per-token estimate, OAI's k1 = logp - logp_ref;
    zeros when the KL is a loss term), plus the score at score_index (OAI: the last token).
    {OAI}/lm_human_preferences/train_policy.py#L149-L154"""
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(scores), device=scores.device), score_index] += scores
    return rewards, non_score_reward


class FixedKLController:
    """{OAI}/lm_human_preferences/train_policy.py#L107-L112"""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current: float, n_steps: int):
        pass

    def state_dict(self) -> dict:  # a checkpoint keeps the coefficient
        return {"value": self.value}

    def load_state_dict(self, state: dict):
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon, with the target in nats per response and the
    horizon in episodes. {OAI}/lm_human_preferences/train_policy.py#L115-L124"""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current: float, n_steps: int):
        proportional_error = min(max(current / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


# ---------------------------------------------------------------------------------------------------------
# The PPO update: whitening, GAE, the clipped losses, TF1's Adam
# ---------------------------------------------------------------------------------------------------------


def whiten(values: torch.Tensor, shift_mean: bool = True, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over all (or the valid) elements with the biased variance (tf.nn.moments); with
    shift_mean=False the mean is added back (rewards keep their mean).
    {OAI}/lm_human_preferences/utils/core.py#L336-L341, masked as
    {SFD}/summarize_from_feedback_details/ppo.py#L235-L241"""
    valid = torch.ones_like(values, dtype=torch.bool) if valid is None else valid
    mean = masked_mean(values, valid)
    var = masked_mean((values - mean) ** 2, valid)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid elements. {SFD}/summarize_from_feedback_details/ppo.py#L208-L213"""
    return (values * valid).sum() / valid.sum()


def compute_gae(values: torch.Tensor, rewards: torch.Tensor, gamma: float, lam: float) -> tuple:
    """(advantages, returns), each (b, R): generalized advantage estimation backwards over the response tokens,
    the value after the last token being 0. {OAI}/lm_human_preferences/train_policy.py#L327-L336"""
    lastgaelam, reversed_advantages = 0.0, []
    R = rewards.shape[1]
    for t in reversed(range(R)):
        nextvalues = values[:, t + 1] if t < R - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_advantages.append(lastgaelam)
    advantages = torch.stack(reversed_advantages[::-1], 1)
    return advantages, advantages + values


def ppo_loss(logprobs, values, old_logprobs, old_values, advantages, returns, valid, value_valid, token_count,
             value_token_count, cliprange: float, cliprange_value: float, vf_coef: float, weights=None) -> tuple:
    """Clipped policy loss + vf_coef * clipped value loss (the max of clipped and unclipped squared errors) of a
    micro-batch; each tensor (b, R). Each loss is a sum over the valid tokens (all of them, unless SFD's mask after the
    truncate token is on) divided by token_count (value_token_count): the minibatch's valid tokens, counted over all
    its micro-batches and processes, divided by their number. Accumulated (accelerate divides by the micro-batches,
    DDP averages the processes), the update is the mean over the minibatch's valid tokens, whatever the micro-batch
    size; a mean per micro-batch (SFD's masked_mean) weights a token by its micro-batch's count instead. weights:
    (b, R) detached per-token weights of the policy loss (truncated importance sampling), or None.
    {OAI}/lm_human_preferences/train_policy.py#L343-L357, {SFD}/summarize_from_feedback_details/ppo.py#L740-L755"""
    vpredclipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_losses1, vf_losses2 = (values - returns) ** 2, (vpredclipped - returns) ** 2
    vf_loss = 0.5 * (torch.max(vf_losses1, vf_losses2) * value_valid).sum() / value_token_count
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses, pg_losses2 = -advantages * ratio, -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    pg_token_losses = torch.max(pg_losses, pg_losses2)
    if weights is not None:
        pg_token_losses = pg_token_losses * weights
    pg_loss = (pg_token_losses * valid).sum() / token_count
    stats = {
        "ppo/loss/policy": pg_loss, "ppo/loss/value": vf_loss,
        "ppo/policy/approxkl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, valid),
        "ppo/policy/clipfrac": masked_mean((pg_losses2 > pg_losses).float(), valid),
        "ppo/val/vpred": masked_mean(values, value_valid),
        "ppo/val/error": masked_mean((values - returns) ** 2, value_valid),
        "ppo/val/clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), value_valid),
    }
    return pg_loss + vf_coef * vf_loss, stats


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


def make_optimizer(params, name: str, lr: float, eps: float):
    """TF-style Adam, torch's Adam, or torch's AdamW (its default weight decay 0.01, as SFD ran it)."""
    if name == "adam_tf":
        return AdamTensorFlowStyle(params, lr=lr, eps=eps)
    return torch.optim.Adam(params, lr=lr, eps=eps) if name == "adam_pytorch" else torch.optim.AdamW(params, lr=lr,
                                                                                                     eps=eps)


def train(args: Args, run_dir: Optional[Path] = None, resume_command: Optional[str] = None) -> Path:
    """PPO. run_dir: the run folder (train_both.py gives its stage folder; --resume the folder to continue);
    resume_command: what the message of a run stopped by a signal tells the user to type."""
    stop = StopRequest()  # from here on SIGTERM or SIGINT stops the run after a checkpoint, not in the middle
    world = start_processes().num_processes
    num_updates, texts, eval_texts = check_args(args)
    local_batch_size = args.batch_size // world
    local_minibatch_size = local_batch_size // args.nminibatches
    grad_accum = local_minibatch_size // args.local_micro_batch_size
    accelerator = make_accelerator(args, args.local_micro_batch_size, grad_accum, compile=args.compile)
    rank, device = accelerator.process_index, accelerator.device
    if not resume_has_work(args.resume, world, zero_stage(accelerator)):
        return Path(args.resume)

    # 1. Models: policy with its value function (a head, or a critic copied from the reward or base model), frozen
    #    reference policy, frozen reward model. Same init on every process. The frozen ones are sharded under ZeRO-3
    #    (place_frozen) and kept in bf16 under --mixed_precision bf16; the policy's weights stay fp32 (autocast).
    torch.manual_seed(args.seed)
    lm, tokenizer = prepare_lm(*load_base_model(args.base_model, load_in_4bit=args.load_in_4bit))
    reward_model = None  # with --verifier a program checks each answer instead (step 4)
    if args.verifier is None:
        reward_model, reward_tokenizer = load_reward_model(args.reward_model)
        check_same_tokenizer(reward_tokenizer, tokenizer, args)
    truncate_token = truncate_token_id(args.truncate_token, tokenizer)
    gold_fn = gold_scorer(args.gold_labeler)
    frozen_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    base_critic = RewardModel(copy.deepcopy(lm)) if args.value_model == "base" else None  # copied before LoRA wraps lm
    lora = add_lora(lm, args)  # under LoRA only the adapters of lm train; the value head (or critic) trains in full
    reference = FrozenReference(lm, lora, accelerator, frozen_dtype)
    policy = PolicyAndValue(lm, copy.deepcopy(reward_model) if args.value_model == "reward" else base_critic)
    if reward_model is not None:
        reward_model = place_frozen(reward_model, accelerator, frozen_dtype)
    trained = [p for p in policy.parameters() if p.requires_grad]
    # counted before ZeRO-3 shards the weights
    num_trained, update_flops = sum(p.numel() for p in trained), ppo_update_flops(lm, args, local_batch_size)
    optimizer = make_optimizer(trained, args.optimizer, args.lr, args.eps)
    policy, optimizer = accelerator.prepare(policy, optimizer)  # DDP, or a DeepSpeed engine with its ZeRO optimizer
    unwrapped = accelerator.unwrap_model(policy, keep_torch_compile=False)
    pad = tokenizer.pad_token_id
    sampler = Sampler(unwrapped.lm, pad, args.temperature, compile=args.compile)

    # 2. Queries (TL;DR ones with their reference summaries), the same on every process, each taking its share; the KL
    #    controller; a seed per process for sampling and minibatch shuffles.
    #    {OAI}/lm_human_preferences/utils/core.py#L108-L113
    # a Stream counts the batches drawn: a checkpoint keeps the position
    batches = Stream(query_batches(texts, tokenizer, args.query_length, args.response_length, args.batch_size,
                                   args.seed))
    kl_ctl = (AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon) if args.adaptive_kl
              else FixedKLController(args.kl_coef))
    torch.manual_seed(args.seed + rank * 100003)

    # The run folder, its log and checkpoints (a resumed run takes back the weights, optimizer, KL coefficient, query
    # position, random generators and metrics of its last checkpoint); the held-out evaluation of the initial policy.
    run = Run(accelerator, args, run_dir, resume_command or "python train_policy.py --resume {run_dir}", "episode",
              keep_samples=True, objects=(kl_ctl, batches), stop=stop,
              about=f"{num_updates} updates of {args.batch_size} episodes "
              f"({world} process(es) x {args.nminibatches} minibatch(es) x {grad_accum} micro-batch(es) of "
              f"{args.local_micro_batch_size}); {num_trained:,} trained policy and value parameters")
    held_out = HeldOut(eval_texts, tokenizer, unwrapped.lm, policy, reward_model, gold_fn, args, accelerator)
    held_out.before_training(run)
    for update in run.steps(num_updates, "ppo", {"score": "objective/scores", "kl": "objective/kl",
                                                 "gold": "objective/gold_score", "rougeL": "eval/rougeL"}):
        t0 = now(device)
        # lr annealed linearly to 0, constant within an update. {OAI}/lm_human_preferences/train_policy.py#L172-L173
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (1 - update / num_updates)

        # 3. Rollouts: sample with the policy, keeping the log-probs (and the shared head's values) of the samples from
        #    the sampling pass itself, as OAI's respond_op ({OAI}/lm_human_preferences/policy.py#L97-L112); then, in
        #    chunks of local_rollout_forward_batch_size episodes, the separate critic's values and the reference's
        #    log-probs. Under ZeRO-3 the policy's weights are gathered for the whole rollout (full_weights).
        queries, references = next(batches)
        queries = queries[rank * local_batch_size : (rank + 1) * local_batch_size].to(device)  # (b, Q)
        if references is not None:  # (b, R) TL;DR reference summaries
            references = references[rank * local_batch_size : (rank + 1) * local_batch_size].to(device)
        policy.eval()
        chunk = args.local_rollout_forward_batch_size
        with torch.no_grad(), accelerator.autocast(), full_weights(policy, accelerator):
            value_head = unwrapped.value_head if unwrapped.critic is None else None
            responses, logprobs, entropies, values = sampler(queries, args.response_length, value_head)  # (b, R) each
            query_responses = torch.cat([queries, responses], 1)  # (b, Q+R)
            if unwrapped.critic is not None:  # {SFD}/summarize_from_feedback_details/ppo.py#L637-L640
                values = in_chunks(lambda qr: unwrapped.critic_values(qr, pad, args.response_length), chunk,
                                   query_responses)
            t_gen = now(device)

            def reference_logprobs(query_responses: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:  # (b, R)
                return response_logprobs(reference(query_responses, pad, args.response_length), responses,
                                         args.temperature, pad, entropy=False)[0]

            ref_logprobs = in_chunks(reference_logprobs, chunk, query_responses, responses)

            # 4. Scores of the truncated responses by the reward model, less the reference summary's with trlX's
            #    baseline, or by --verifier's program; the penalty for no truncate token; the gold labeler's score. OAI
            #    trains on whole responses and only the score sees the truncated ones; SFD masks what follows the
            #    truncate token.
            truncated = responses
            if truncate_token is not None:
                truncated = truncate_responses(responses, truncate_token, args.truncate_after, pad)
            if args.verifier is None:
                scores = in_chunks(lambda qr: reward_model(qr, pad), chunk, torch.cat([queries, truncated], 1))  # (b,)
            else:  # 1 for a right answer, plus format_reward for a well-formed one: (b,) each
                checks = check_answers(args.verifier, queries, truncated, tokenizer)
                scores = checks["correct"] + args.format_reward * checks["formatted"]
            if args.reference_baseline:  # trlX's reward_fn: r(post + sample) - r(post + reference summary)
                # https://github.com/CarperAI/trlx/blob/7c8f1aad17de6f89dabd20ddf51dbe5e76fa09a1/examples/summarize_rlhf/trlx_gptj_text_summarization.py
                scores = scores - in_chunks(lambda qr: reward_model(qr, pad), chunk,
                                            torch.cat([queries, references], 1))
            if truncate_token is not None:
                scores = penalize(scores, truncated, truncate_token, args.truncate_after, args.penalty_reward_value)
            response_texts, gold = gold_scores(gold_fn, queries, truncated, tokenizer, references is not None)
            # valid, value_valid (b, R); score_index (b,)
            valid, value_valid, score_index = response_masks(truncated, pad, args.mask_after_truncate)
            # SFD: masked log-probs take one constant value, so they add no KL.
            # {SFD}/summarize_from_feedback_details/ppo.py#L673-L677
            logprobs = logprobs.masked_fill(~valid, INVALID_LOGPROB)
            ref_logprobs = ref_logprobs.masked_fill(~valid, INVALID_LOGPROB)
            values = values.masked_fill(~value_valid, 0.0)
            # the KL penalty in the reward (OAI), or none there when it is a loss term (step 5)
            kl_in_reward = (kl_estimate(logprobs, ref_logprobs, args.kl_estimator) if args.kl_in == "reward"
                            else torch.zeros_like(logprobs))
            rewards, non_score_reward = compute_rewards(scores, kl_in_reward, kl_ctl.value, score_index)

            # Truncated importance sampling (--tis_cap; Yao et al. 2025): the training forward's log-probs of the
            # samples before any step become the ratio's old ones, and min(pi_train / pi_sampler, cap) weights each
            # token's policy loss. Off, the sampler's log-probs are the old ones, as OAI's.
            old_logprobs, tis_weights = logprobs, None
            if args.tis_cap is not None:
                old_logprobs = in_chunks(lambda qr, r: response_logprobs(policy(qr, pad, args.response_length)[0], r,
                                                                         args.temperature, pad, entropy=False)[0],
                                         chunk, query_responses, responses).masked_fill(~valid, INVALID_LOGPROB)
                tis_weights = (old_logprobs - logprobs).exp().clamp(max=args.tis_cap)  # (b, R)
        t_score = now(device)

        # 5. PPO: noptepochs passes over the batch, reshuffled each time; per minibatch the rewards are whitened
        #    (mean kept), GAE computed and advantages whitened, as inside OAI's loss; micro-batches accumulate
        #    gradients (accelerator.accumulate divides each loss by grad_accum), and DDP averages them across processes
        #    at the last one (DeepSpeed: reduces them and steps there; optimizer.step() is then a no-op).
        policy.train()
        minibatch_stats, first_step = [], []  # first_step: (training, sampler log-probs, valid) before any step
        for _ in range(args.noptepochs):
            order = torch.randperm(local_batch_size, device=device)
            for start in range(0, local_batch_size, local_minibatch_size):
                minibatch = order[start : start + local_minibatch_size]
                mb_rewards = rewards[minibatch]
                if args.whiten_rewards:
                    mb_rewards = whiten(mb_rewards, shift_mean=False, valid=value_valid[minibatch])
                    mb_rewards = mb_rewards.masked_fill(~value_valid[minibatch], 0.0)
                advantages, returns = compute_gae(values[minibatch], mb_rewards, args.gamma, args.lam)
                advantages = whiten(advantages, valid=valid[minibatch]).masked_fill(~valid[minibatch], 0.0)
                stats = {"ppo/returns/mean": returns.mean(), "ppo/returns/var": returns.var(unbiased=False),
                         "ppo/val/mean": values[minibatch].mean(), "ppo/val/var": values[minibatch].var(unbiased=False)}
                # each micro-batch's share of the minibatch's valid tokens over every process: the loss is the mean
                # over the minibatch's tokens, not a mean of per-micro-batch means (equal when all tokens are valid)
                shares = grad_accum * world
                token_count = accelerator.reduce(valid[minibatch].sum(), "sum") / shares
                value_token_count = accelerator.reduce(value_valid[minibatch].sum(), "sum") / shares
                for micro_start in range(0, local_minibatch_size, args.local_micro_batch_size):
                    rows = slice(micro_start, micro_start + args.local_micro_batch_size)  # of the minibatch
                    episodes = minibatch[rows]  # of the batch
                    with accelerator.accumulate(policy):
                        new_logits, new_values = policy(query_responses[episodes], pad, args.response_length)
                        new_logprobs, entropy = response_logprobs(new_logits, responses[episodes], args.temperature,
                                                                  pad)
                        new_logprobs = new_logprobs.masked_fill(~valid[episodes], INVALID_LOGPROB)
                        if not minibatch_stats:  # no step yet: the policy is the sampler's
                            first_step.append((new_logprobs.detach(), logprobs[episodes], valid[episodes]))
                        new_values = new_values.masked_fill(~value_valid[episodes], 0.0)
                        loss, micro_stats = ppo_loss(new_logprobs, new_values, old_logprobs[episodes],
                                                     values[episodes], advantages[rows], returns[rows],
                                                     valid[episodes], value_valid[episodes], token_count,
                                                     value_token_count, args.cliprange, args.cliprange_value,
                                                     args.vf_coef,
                                                     None if tis_weights is None else tis_weights[episodes])
                        if args.kl_in == "loss":  # kl_coef x the mean over responses of the summed KL estimate
                            kl = kl_estimate(new_logprobs, ref_logprobs[episodes], args.kl_estimator)
                            micro_stats["ppo/loss/kl"] = (kl * valid[episodes]).sum(1).mean()
                            loss = loss + kl_ctl.value * micro_stats["ppo/loss/kl"]
                        accelerator.backward(loss)
                    micro_stats.update({"ppo/loss/total": loss,
                                        "ppo/policy/entropy": masked_mean(entropy, valid[episodes])})
                    for name, value in micro_stats.items():
                        stats[name] = stats.get(name, 0) + value.detach() / grad_accum
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                minibatch_stats.append(stats)
        t_update = now(device)

        # 6. OAI's statistics of the rollouts ({OAI}/lm_human_preferences/train_policy.py#L217-L261), averaged over
        #    processes with the minibatches' (ppo_metrics); the held-out evaluation every eval_every updates; then the
        #    KL controller steps on the batch's KL. {OAI}/lm_human_preferences/train_policy.py#L305
        kl = (logprobs - ref_logprobs).sum(1)  # (b,)
        rollout_stats = {
            "objective/kl": kl.mean(), "objective/entropy": (-logprobs * valid).sum(1).mean(),
            "objective/scores": scores.mean(), "objective/score_total": scores.mean() + non_score_reward.sum(1).mean(),
            "objective/entropy_exact": (entropies * valid).sum(1).mean(),  # the same quantity without sampling noise
        }
        if truncate_token is not None:  # the responses that ended early, and the tokens responses keep
            rollout_stats["objective/truncated_fraction"] = (truncated == pad).any(1).float().mean()
            rollout_stats["objective/response_length"] = (truncated != pad).sum(1).float().mean()
        if gold is not None:
            rollout_stats["objective/gold_score"] = gold.mean()
        if args.verifier is not None:  # the share of right answers, and of well-formed ones
            rollout_stats.update({"objective/correct": checks["correct"].mean(),
                                  "objective/formatted": checks["formatted"].mean()})
        rollout_stats.update(logprob_mismatch(*map(torch.cat, zip(*first_step))))
        if tis_weights is not None:  # the weights over valid tokens, and the share the cap cut
            rollout_stats.update({"tis/weight_mean": masked_mean(tis_weights, valid),
                                  "tis/capped_fraction": masked_mean((tis_weights >= args.tis_cap).float(), valid)})
        metrics = ppo_metrics(accelerator, update, num_updates, args, rollout_stats, minibatch_stats, kl_ctl.value,
                              (t0, t_gen, t_score, t_update), update_flops)
        eval_texts_out = held_out.every(update + 1, num_updates, metrics)
        kl_ctl.update(metrics["objective/kl"], args.batch_size)

        # The samples shown and kept, the metrics logged; a NaN or inf stops the run (exit 3); a checkpoint every
        # save_every updates, and when SIGTERM or SIGINT asked the run to stop, which it then does (exit 128 + signal).
        rows = sample_rows(update + 1, queries, response_texts, scores, gold, kl,
                           min(args.num_print_samples, local_batch_size), tokenizer)
        show_samples(run, update, num_updates, rows, eval_texts_out, args)
        run.end_step(update + 1, num_updates, metrics)

    # The policy (language model + value head, or the critic as a reward-model folder), the sample tables and the
    # summary of the run. Under ZeRO-3 every process gathers the weights; the main one writes them.
    save_policy(accelerator, policy, unwrapped, lora, tokenizer, run.dir)
    run.finish(summarize, "PPO")
    return run.dir


# =========================================================================================================
# Plumbing. Everything below serves train() above and is not the algorithm: the command line and the presets, reading
# the data, loading the models, LoRA, measuring, the run folder, checkpoints and resume, signals, DeepSpeed, the checks
# of the arguments, the metrics and the summary. The `# Copied from` blocks are shared with the other scripts and kept
# identical by tests/test_pipeline.py.
# =========================================================================================================


# ---------------------------------------------------------------------------------------------------------
# The command line and the presets (OAI's launch.py, SFD's recipe, the twin)
# ---------------------------------------------------------------------------------------------------------


FLAG_PREFIX = "--"  # how messages spell a flag: train_both.py sets "--reward." / "--policy." while a stage runs


def fail(message: str):
    """Bad input: one line on stderr naming the flag as the user typed it, exit status 2, before anything is written."""
    message = re.sub(r"(?<![\w.-])--(?=[a-z])", FLAG_PREFIX, message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


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
    # OAI's launch.py: books_task + get_experiments()['sentiment'|'descriptiveness']
    # https://github.com/openai/lm-human-preferences/blob/cbfd210bb8b08f6bc5c26878c10984b90f516c66/launch.py#L8-L19
    # https://github.com/openai/lm-human-preferences/blob/cbfd210bb8b08f6bc5c26878c10984b90f516c66/launch.py#L116-L152
    "sentiment": dict(
        exp_name="sentiment", base_model="gpt2", query_dataset="bookcorpus", query_length=64, response_length=24,
        truncate_token=".", truncate_after=16, penalty_reward_value=-1.0, temperature=0.7,
        total_episodes=1_000_000, batch_size=512, nminibatches=1, noptepochs=4, local_micro_batch_size=16, lr=1e-5,
        vf_coef=0.1, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95, whiten_rewards=True,
        kl_coef=0.15, adaptive_kl=True, kl_target=6.0, kl_horizon=10000, gold_labeler="vader",
    ),
}


# the same task and hyperparameters; only the labels (hence the reward model) differ. VADER is no judge of it.
PRESETS["descriptiveness"] = {**PRESETS["sentiment"], "exp_name": "descriptiveness", "gold_labeler": "none"}


# SFD's 1B PPO recipe on its TL;DR data: {SFD}/summarize_from_feedback_details/ppo.py#L41-L157, sbatches/ppo.sbatch
# (pythia-1b-deduped: 8 GPUs x micro-batch 16 x 4 accumulation = 512). base_model is the tldr SFT run's model.
PRESETS["tldr"] = dict(
    exp_name="tldr", base_model="models/sft_tldr",
    query_dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144",
    query_length=512, response_length=53, truncate_token="eos", truncate_after=0, penalty_reward_value=-1.0,
    temperature=0.7, total_episodes=1_000_000, batch_size=512, nminibatches=1, noptepochs=4, local_micro_batch_size=16,
    local_rollout_forward_batch_size=64, lr=3e-6, eps=1e-5, optimizer="adamw", vf_coef=0.1, cliprange=0.2,
    cliprange_value=0.2, gamma=1.0, lam=0.95, whiten_rewards=False, mask_after_truncate=True, value_model="reward",
    kl_coef=0.05, adaptive_kl=False, gold_labeler="none",
    eval_dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144",
    eval_split="validation", eval_temperature=0.01,
)


# the summarization twin: SFD's details on the nano SFT model and data/tldr/, sized for two CPU cores (2 PPO epochs at
# lr 3e-5 instead of 4 at 3e-6: the same judge gain as 4 epochs at 2e-5 in 60% of the time)
PRESETS["tldr_twin"] = {**PRESETS["tldr"], **dict(
    exp_name="policy", base_model="runs/tldr_twin/sft_model", query_dataset="data/tldr/train.jsonl.gz",
    query_length=160, response_length=48, total_episodes=1024, batch_size=64, local_micro_batch_size=32,
    local_rollout_forward_batch_size=64, noptepochs=2, lr=3e-5, kl_coef=0.05, reference_baseline=True,
    gold_labeler="tldr_judge", eval_dataset="data/tldr/validation.jsonl.gz",
    # the nano model loops when decoding near-greedily
    num_eval=256, eval_every=4, eval_temperature=0.7, print_sample_every=8,
)}


# RL with verifiable rewards on data/arithmetic: PPO against arithmetic_verifier from train_sft.py's arithmetic model,
# on the episodes, lengths and learning rate of train_rloo.py's arithmetic preset (GRPO); SFD's details for a response
# that ends at its EOS (the mask after it, no reward whitening), the value head on the policy as OAI's, a fixed KL
# coefficient. Held-out pass@1 on validation at the sampling temperature.
PRESETS["arithmetic"] = dict(
    exp_name="ppo_arithmetic", base_model="runs/arithmetic/sft_model", verifier="arithmetic",
    query_dataset="data/arithmetic/train.jsonl.gz", eval_dataset="data/arithmetic/validation.jsonl.gz",
    query_length=6, response_length=32, truncate_token="eos", truncate_after=0, penalty_reward_value=0.0,
    mask_after_truncate=True, whiten_rewards=False, temperature=0.7, total_episodes=16384, batch_size=256,
    nminibatches=4, noptepochs=1, local_micro_batch_size=64, local_rollout_forward_batch_size=256, lr=2e-4,
    kl_coef=0.01, adaptive_kl=False, gold_labeler="none", num_eval=512, eval_every=8, eval_temperature=0.7,
    print_sample_every=16,
)


# ---------------------------------------------------------------------------------------------------------
# Data: queries
# ---------------------------------------------------------------------------------------------------------


TLDR_KEYS = ("subreddit", "title", "post", "summary")


def row_kind(row) -> str:
    """What a row of query data is: "text" (books), "tldr" (a post and its summary) or "problem" (a verifiable task)."""
    return "text" if isinstance(row, str) else "problem" if "problem" in row else "tldr"


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


def format_tldr_response(summary: str, tokenizer, response_length: int) -> list:
    """SFD's reference response ' {summary}<|endoftext|>' (the upstream summary has no leading space), its text cut to
    response_length - 1 tokens so that the EOS stays, right-padded to response_length tokens.
    {SFD}/summarize_from_feedback_details/tldr_dataset.py#L186-L199"""
    tokens = tokenizer.encode(" " + summary)[: response_length - 1] + [tokenizer.eos_token_id]
    return tokens + [tokenizer.pad_token_id] * (response_length - len(tokens))


def format_problem_query(problem: str, tokenizer, query_length: int) -> list:
    """A verifiable task's query: the problem's tokens ("07+45="), left-padded with the pad token to query_length."""
    tokens = tokenizer.encode(problem)
    if len(tokens) > query_length:
        fail(f"--query_length {query_length} is too short for the problem {problem!r} ({len(tokens)} tokens)")
    return [tokenizer.pad_token_id] * (query_length - len(tokens)) + tokens


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


def truncate_token_id(name: Optional[str], tokenizer) -> Optional[int]:
    """The id of --truncate_token: None, "eos" (the tokenizer's EOS, SFD's truncate_token) or a text of one token."""
    if name is None or name == "eos":
        return None if name is None else tokenizer.eos_token_id
    ids = tokenizer.encode(name)
    if len(ids) != 1:
        fail(f"--truncate_token {name!r} is not a single token")
    return ids[0]


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


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


def save_reward_model(model: RewardModel, tokenizer, folder: Path):
    """A Hugging Face folder of the language model (backbone) plus reward_head.safetensors (head, gain, bias)."""
    tmp = folder.with_name(folder.name + ".tmp")
    model.lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    head = {"head.weight": model.head.weight, "head.bias": model.head.bias, "gain": model.gain, "bias": model.bias}
    save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, tmp / "reward_head.safetensors")
    swap_in(tmp, folder)


def swap_in(tmp: Path, folder: Path):
    """Replace `folder` by the fully written `tmp`, so a failure never leaves a half-written checkpoint."""
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        folder.rename(old)
        tmp.rename(folder)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(folder)


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


def check_lora(args):
    """The LoRA and QLoRA flags, checked before anything runs."""
    if args.lora_r < 0 or (args.lora_r and args.lora_alpha <= 0) or not 0 <= args.lora_dropout < 1:
        fail(f"--lora_r {args.lora_r} must be at least 0, --lora_alpha positive, --lora_dropout in [0, 1)")
    if args.load_in_4bit and not torch.cuda.is_available():
        fail("--load_in_4bit (QLoRA) quantizes the weights with bitsandbytes on a CUDA GPU, and this machine has none; "
             "LoRA alone (--lora_r) runs on a CPU")
    if args.load_in_4bit and args.lora_r == 0:
        fail("--load_in_4bit trains LoRA adapters over frozen 4-bit weights: give --lora_r too")


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


def saved_lm(lm, lora):
    """The language model to save: under LoRA the adapters merged into the weights, so that the folder is a plain model
    every script (and transformers) loads as it loads any other."""
    return lm if lora is None else lora.merge_and_unload()


# ---------------------------------------------------------------------------------------------------------
# Measuring: FLOPs, the gold labelers, the held-out evaluation, the clock
# ---------------------------------------------------------------------------------------------------------


def forward_flops(lm, seq_len: int, logit_positions: int) -> float:
    """Matmul FLOPs of one forward pass over a sequence whose output projection runs on its last logit_positions
    positions: 2 per weight per token for every transformer weight that multiplies (embedding lookups do not), the
    same for the output projection's weight per logit position, plus attention's two (T x T x d) products per
    layer. The backward pass costs twice the forward, so a training step costs 3x this."""
    body = lm.base_model
    embeddings = sum(m.weight.numel() for m in body.modules() if isinstance(m, nn.Embedding))
    weights = sum(p.numel() for p in body.parameters()) - embeddings
    attention = 2 * 2 * lm.config.num_hidden_layers * seq_len * seq_len * lm.config.hidden_size
    return 2.0 * weights * seq_len + 2.0 * lm.get_output_embeddings().weight.numel() * logit_positions + attention


def ppo_update_flops(lm, args, local_batch_size: int) -> float:
    """FLOPs of one PPO update on this process: noptepochs passes of forward + backward (3x a forward) over its share of
    the batch, through the policy and, when it is separate, the critic."""
    seq_len = args.query_length + args.response_length
    flops = args.noptepochs * local_batch_size * 3 * forward_flops(lm, seq_len, args.response_length + 1)
    if args.value_model != "shared":
        flops += args.noptepochs * local_batch_size * 3 * forward_flops(lm, seq_len, 0)
    return flops


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


def gold_scores(gold_fn, queries: torch.Tensor, responses: torch.Tensor, tokenizer, tldr: bool) -> tuple:
    """(the decoded responses, the gold labeler's (b,) scores of them or None). TL;DR summaries are decoded without
    their EOS, as the judge and the sample tables read them."""
    pad = tokenizer.pad_token_id
    texts = tokenizer.batch_decode([r[r != pad] for r in responses], skip_special_tokens=tldr)
    if gold_fn is None:
        return texts, None
    query_texts = tokenizer.batch_decode([q[q != pad] for q in queries])
    return texts, torch.tensor(gold_fn(texts, query_texts), device=queries.device)


def rouge(summaries: list, references: list) -> list:
    """Per pair {rouge1, rouge2, rougeL}: F1 of each summary against its reference, by rouge-score without stemming, as
    SFD's evaluate.load("rouge") computes it. {SFD}/summarize_from_feedback_details/sft.py#L37"""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    return [{k: v.fmeasure for k, v in scorer.score(ref, summary).items()} for summary,
            ref in zip(summaries, references)]


# The summarization twin's judge: the labeler of its comparisons and the gold score of its runs (data/README.md).
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


def words(text: str) -> list:
    """The lower-case words of a text (letters, with an inner apostrophe: "don't", "post's")."""
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())


def content_words(text: str) -> list:
    """Words of three letters or more that are not stop words, each cut to its Porter stem (nltk's, which rouge-score
    stems with), so that a summary may inflect the post's words: "twinkled" and "twinkling" both read "twinkl"."""
    return [porter_stem(w) for w in words(text) if len(w) > 2 and w not in STOP_WORDS]


@functools.lru_cache(maxsize=None)
def porter_stem(word: str) -> str:
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer().stem(word.removesuffix("'s"))


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


def query_post(query: str) -> str:
    """The post read back from a decoded TL;DR query (format_tldr_query's format, pads removed): the judge reads what
    the policy was shown, a post cut to fit the query included."""
    m = re.search(r"\n\nPOST: (.*)\n\nTL;DR:", query, flags=re.S)
    if m is None:
        raise ValueError(f"not a TL;DR query (SUBREDDIT/TITLE/POST/TL;DR): {query[:80]!r}")
    return m.group(1)


def tldr_judge(summaries: list, queries: list) -> list:
    """The twin's judge (judge_summary's score) of each summary against the post of its decoded TL;DR query."""
    return [judge_summary(query_post(q), s)["score"] for s, q in zip(summaries, queries)]


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


# ---------------------------------------------------------------------------------------------------------
# RL with verifiable rewards: a program checks each answer (--verifier), on problems such as data/arithmetic's
# ---------------------------------------------------------------------------------------------------------


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


VERIFIERS = {"arithmetic": arithmetic_verifier}


def check_answers(verifier: str, queries: torch.Tensor, responses: torch.Tensor, tokenizer) -> dict:
    """{"correct", "formatted"}: (b,) checks by VERIFIERS[verifier] of (b, R) responses, truncated after their EOS, to
    (b, Q) problems; a response ended if it holds the EOS, and is read without it."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    problems = tokenizer.batch_decode([q[q != pad] for q in queries])
    texts = tokenizer.batch_decode([r[(r != pad) & (r != eos)] for r in responses])
    checks = [VERIFIERS[verifier](p, t, e) for p, t, e in zip(problems, texts, (responses == eos).any(1).tolist())]
    return {k: torch.tensor([c[k] for c in checks], device=queries.device) for k in ("correct", "formatted")}


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


def now(device: torch.device) -> float:
    """Seconds on a wall clock, once the device has finished the work queued so far (CUDA kernels run asynchronously,
    so a phase's time is only known after a synchronize)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ---------------------------------------------------------------------------------------------------------
# Runs that survive: the run folder and its log, checkpoints and resume, a stop on SIGTERM/SIGINT or on a NaN
# ---------------------------------------------------------------------------------------------------------


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


EXIT_NONFINITE = 3  # a NaN or inf stopped the run (docs/runs.md lists every exit status: 0, 2, 3, 4, 128 + signal)


EXIT_NO_SPACE = 4  # a checkpoint could not be written: the disk is full


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


def any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` holds on some process, the same answer on all of them."""
    if accelerator.num_processes == 1:
        return flag
    flag = torch.tensor([float(flag)], device=accelerator.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


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


def start_processes() -> PartialState:
    """Join the launch's processes (torchrun or accelerate launch) before anything asks for the world size. Without a
    GPU they talk over gloo: plain DDP needs cpu=True for that, while under DeepSpeed cpu=True would drop DeepSpeed and
    accelerate 1.15 leaves the group unset on a machine without a GPU, so the backend is named instead."""
    if torch.cuda.is_available():
        return PartialState()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true":
        return PartialState(backend="gloo")
    return PartialState(cpu=True)


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


def zero_stage(accelerator) -> int:
    """The ZeRO stage of the run; 0 without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return 0 if plugin is None else plugin.zero_stage


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
AT_LEAST_ONE = ("total_episodes", "batch_size", "nminibatches", "noptepochs", "local_micro_batch_size",
                "local_rollout_forward_batch_size", "query_length", "response_length", "k", "num_train", "num_test",
                "normalize_samples", "rollout_batch_size", "total_steps", "block_size", "n_layer", "n_embd", "n_head",
                "n_positions", "num_eval", "eval_every", "print_sample_every", "keep_checkpoints", "kl_horizon",
                "sample_length")
AT_LEAST_ZERO = ("save_every", "truncate_after", "num_print_samples", "num_samples", "warmup_steps",
                 "sample_prompt_tokens", "kl_coef", "vf_coef", "weight_decay", "max_grad_norm", "format_reward")
POSITIVE = ("lr", "eps", "temperature", "eval_temperature", "cliprange", "cliprange_value", "kl_target",
            "tis_cap")
UNIT_INTERVAL = ("gamma", "lam", "dropout")


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


def check_args(args: Args, reward_model_follows: bool = False) -> tuple:
    """Every check of the arguments that needs no training (sizes, paths, the data, the truncate token), run before
    anything is trained or written; train_both.py runs it before its reward stage. Returns the number of updates and the
    query and evaluation texts it read."""
    check_common(args)
    world = PartialState().num_processes
    if args.batch_size % world:
        fail(f"--batch_size {args.batch_size} is not divisible by {world} processes")
    local_batch_size = args.batch_size // world
    if local_batch_size % args.nminibatches:
        fail(f"--batch_size {args.batch_size} / {world} processes is not divisible by --nminibatches "
             f"{args.nminibatches}")
    local_minibatch_size = local_batch_size // args.nminibatches
    if local_minibatch_size % args.local_micro_batch_size:
        fail(f"--batch_size {args.batch_size} / {world} process(es) / --nminibatches {args.nminibatches} = "
             f"{local_minibatch_size} "
             f"episodes per minibatch, not divisible by --local_micro_batch_size {args.local_micro_batch_size}")
    if args.whiten_rewards and local_minibatch_size < 8:  # {OAI}/lm_human_preferences/train_policy.py#L459-L462
        fail(f"--batch_size {args.batch_size} / {world} process(es) / --nminibatches {args.nminibatches} = "
             f"{local_minibatch_size} "
             "episodes per minibatch, too few to whiten rewards (at least 8)")
    check_verifier(args)
    if args.verifier is None and not reward_model_follows:  # then a reward model, unless train_both.py trains it
        if args.reward_model is None:
            fail("--reward_model is required (a folder written by train_reward.py; train_both.py trains one first), "
                 "or --verifier")
        if os.path.isfile(args.reward_model):
            fail(f"--reward_model {args.reward_model} is a file: give the folder train_reward.py wrote (its run's "
                 "reward_model/)")
        if not os.path.isdir(args.reward_model):
            fail(f"--reward_model {args.reward_model}: folder not found")
    check_lora(args)
    if args.value_model == "base" and args.load_in_4bit:
        fail("--value_model base copies the base model into a critic that trains in full, which a 4-bit (QLoRA) base "
             "cannot; use --value_model shared or reward")
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
    # OAI's nupdates rounds up ({OAI}/lm_human_preferences/train_policy.py#L23-L24); said first, not done silently
    num_updates = math.ceil(args.total_episodes / args.batch_size)
    if args.total_episodes % args.batch_size and PartialState().is_main_process:
        print(f"note: --total_episodes {args.total_episodes} is not a multiple of --batch_size {args.batch_size}: "
              f"{num_updates} updates train on {num_updates * args.batch_size} episodes (rounded up, as OAI)",
              flush=True)
    return num_updates, texts, eval_texts


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


def check_same_tokenizer(reward_tokenizer, tokenizer, args):
    """The reward model reads the policy's token ids: its tokenizer must be the policy's.
    {OAI}/lm_human_preferences/rewards.py#L119"""
    if len(reward_tokenizer) != len(tokenizer) or reward_tokenizer.pad_token_id != tokenizer.pad_token_id:
        fail(f"--reward_model {args.reward_model}: its tokenizer ({len(reward_tokenizer)} tokens) "
             f"differs from --base_model {args.base_model}'s ({len(tokenizer)})")


def logprob_mismatch(train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, valid: torch.Tensor) -> dict:
    """How far the training forward's log-probs of the sampled tokens are from the sampler's while the policy is
    still the one that sampled (before the update's first optimizer step); each (b, R). They agree up to float
    error unless the two paths compute different distributions: a temperature, a top-k / top-p truncation or a
    precision one of them misses (TRL #4159, #4772; docs/pitfalls.md). The mean and max |difference| over the valid
    tokens, and the mean over responses of the whole response's ratio pi_train / pi_sampler."""
    diff = (train_logprobs - sampler_logprobs).masked_fill(~valid, 0.0)
    return {"mismatch/logprob_diff_mean": diff.abs().sum() / valid.sum(), "mismatch/logprob_diff_max": diff.abs().max(),
            "mismatch/response_ratio": diff.sum(1).exp().mean()}


def ppo_metrics(accelerator, update: int, num_updates: int, args, rollout_stats: dict, minibatch_stats: list,
                kl_coef: float, times: tuple, update_flops: float) -> dict:
    """The update's line of metrics.jsonl: OAI's statistics of the rollouts and of the minibatches (their mean), each
    averaged over the processes; the KL coefficient the rewards used, the value function's explained variance, the
    learning rate, each phase's seconds, episodes per second and the update's FLOP/s (and its share of --peak_flops)."""
    t0, t_gen, t_score, t_update = times
    local = {k: torch.stack([s[k] for s in minibatch_stats]).mean() for k in minibatch_stats[0]}
    local.update(rollout_stats)
    names = sorted(local)
    means = accelerator.reduce(torch.stack([local[k].float() for k in names]), reduction="mean").tolist()
    metrics = {"episode": (update + 1) * args.batch_size, "update": update + 1, **dict(zip(names, means))}
    metrics["objective/kl_coef"] = kl_coef
    metrics["ppo/val/var_explained"] = 1 - metrics["ppo/val/error"] / max(metrics["ppo/returns/var"], 1e-8)
    metrics["lr"] = args.lr * (1 - update / num_updates)
    metrics.update({"timing/generation_s": t_gen - t0, "timing/scoring_s": t_score - t_gen,
                    "timing/update_s": t_update - t_score,
                    "throughput/episodes_per_s": args.batch_size / (now(accelerator.device) - t0),
                    "throughput/update_flops_per_s": update_flops / (t_update - t_score)})  # per process
    if args.peak_flops:
        metrics["throughput/update_peak_fraction"] = metrics["throughput/update_flops_per_s"] / args.peak_flops
    if accelerator.device.type == "cuda":
        metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 1e9
    return metrics


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


def print_samples(rows: list, update: int):
    table = Table(title=f"samples at update {update}", show_lines=True)
    for column, width in [("query", 50), ("response", 50), ("score", 7), ("gold", 7), ("kl", 6)]:
        table.add_column(column, max_width=width)
    for r in rows:
        gold = "" if r["gold_score"] is None else f"{r['gold_score']:+.2f}"
        table.add_row(r["query"], r["response"], f"{r['score']:+.2f}", gold, f"{r['kl']:+.2f}")
    Console().print(table)


def sample_rows(update: int, queries: torch.Tensor, texts: list, scores: torch.Tensor, gold: Optional[torch.Tensor],
                kl: torch.Tensor, n: int, tokenizer) -> list:
    """The first n episodes of a batch as rows of the sample table: query, response, score, gold score, KL."""
    pad = tokenizer.pad_token_id
    return [{"update": update, "query": tokenizer.decode(queries[i][queries[i] != pad]), "response": texts[i],
             "score": scores[i].item(), "gold_score": gold[i].item() if gold is not None else None,
             "kl": kl[i].item()} for i in range(n)]


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


def write_model_folder(accelerator, lm, lora, tokenizer, folder: Path):
    """The trained language model (adapters merged under LoRA) and its tokenizer as a plain model folder, written by the
    main process; under ZeRO-3 called inside full_weights, which every process enters."""
    if accelerator.is_main_process:
        saved_lm(lm, lora).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        print(f"policy saved to {folder}")


def save_policy(accelerator, policy, unwrapped, lora, tokenizer, run_dir: Path):
    """PPO's trained models: the policy's language model in run_dir/policy with its value head beside it
    (value_head.safetensors), or a separate critic as a reward-model folder (run_dir/critic). Under ZeRO-3 every process
    gathers the weights; the main one writes them."""
    with full_weights(policy, accelerator):
        write_model_folder(accelerator, unwrapped.lm, lora, tokenizer, run_dir / "policy")
        if accelerator.is_main_process:
            if unwrapped.critic is None:
                value_head = {k: v.detach().cpu().contiguous() for k, v in unwrapped.value_head.state_dict().items()}
                save_file(value_head, run_dir / "policy" / "value_head.safetensors")
            else:
                save_reward_model(unwrapped.critic, tokenizer, run_dir / "critic")


if __name__ == "__main__":
    train(cli(Args, PRESETS, __doc__))

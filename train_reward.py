"""A reward model learned from preference labels, as OpenAI's lm-human-preferences trained it (Ziegler et al. 2019).

    python train_reward.py                                     # the embedded world: best-of-4 labels by VADER (CPU)
    python train_both.py                                       # this, then PPO against it, in one go
    accelerate launch --num_processes 8 train_reward.py sentiment    # OAI's sentiment reward model (gpt2, hub labels)

The reward model is the base language model with a scalar head read at the last token. Two kinds of labels:
  * OAI's best-of-n: {"query": [ids], "sample0": [ids], ..., "sample{n-1}": [ids], "best": i}, with a
    softmax cross-entropy over the n rewards (k-way choice loss);
  * pairwise, with -log sigmoid(r_chosen - r_rejected), in any of these formats (told apart by their keys):
    {"query", "chosen", "rejected"} (token ids or text); OpenAI's summarize-from-feedback comparisons {"info",
    "summaries", "choice", ...}; {"prompt", "chosen", "rejected"} texts (TRL, CarperAI/openai_summarize_comparisons);
    {"chosen", "rejected"} conversations with an implicit prompt (Anthropic HH-RLHF); {"prompt", "answer1", "answer2"}
    with answer1 preferred. Texts get EOS appended to their responses.
Token ids belong to the tokenizer that made the labels (--label_tokenizer); when the base model's tokenizer differs,
they are decoded and re-encoded. As OAI, gain and bias are set before and after training so that the rewards of the
base policy's samples have mean 0 and std 1 (--normalize_before, --normalize_after); the tldr presets turn both off and,
as SFD, shift the bias after training so that reference summaries score 0 on average (--reference_bias). One epoch, the
learning rate annealed to 0 linearly (OAI) or by a cosine (--lr_schedule cosine, SFD and the tldr presets). A first
positional word picks a preset (`sentiment`, `descriptiveness`, `tldr`, `tldr_twin`). Links write {OAI} for
https://github.com/openai/lm-human-preferences/blob/cbfd210bb8b08f6bc5c26878c10984b90f516c66, {SFD} for
https://github.com/vwxyzjn/summarize_from_feedback_details/blob/ee77a9abc31f5338365ee087945c5bcafac7f1ca. Tensor shapes:
b = labels on this process, n = samples per label, Q = query_length, R = response_length.
"""

import copy
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
from contextlib import contextmanager
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
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GgufConfig, StaticCache
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.integrations import unset_hf_deepspeed_config
from transformers.pytorch_utils import Conv1D


@dataclass
class Args:
    # ---- model ----
    base_model: str = "data/nano"
    """language model under the reward head, and the policy whose samples set the normalization: hub id, folder,
    .gguf file"""

    # ---- labels ----
    label_dataset: str = "data/labels/sentiment_offline_5k.json"
    """labels: a local .json (a list, OAI's format) or .jsonl, <hub user>/<dataset>/<file> in a hub dataset repository,
    or a hub dataset id <user>/<dataset> (e.g. openai/summarize_from_feedback with --label_config comparisons)"""
    label_config: Optional[str] = None
    """configuration of a hub label dataset"""
    label_split: str = "train"
    """split of a hub label dataset"""
    label_tokenizer: Optional[str] = None
    """tokenizer whose ids the labels hold; None reads "tokenizer" from <labels>.meta.json, else takes the base model's
    tokenizer"""
    label_pad_token_id: Optional[int] = None
    """pad id inside the labels, dropped on reading (OAI's: 50259); None reads <labels>.meta.json, else the label
    tokenizer's pad"""
    num_train: int = 2048
    """labels trained on, from the start of the file (OAI: 4992); one epoch"""
    num_test: int = 512
    """held-out labels for test/accuracy: the last ones of the file (of label_split), or the first ones of test_split"""
    test_split: Optional[str] = None
    """split of a hub label dataset that holds the held-out labels (SFD: validation); None takes them from the end of
    label_split"""

    # ---- task (train_both.py's PPO stage must share it) ----
    query_length: int = 32
    """query tokens (label queries are cut to their last query_length tokens, left-padded)"""
    response_length: int = 24
    """response tokens (label samples are cut to their first response_length tokens, right-padded)"""
    query_dataset: str = "data/corpus.jsonl.gz"
    """queries of the normalization samples (and TL;DR posts with the reference summaries of --reference_bias): as
    train_policy.py's --query_dataset"""
    query_split: str = "train"
    """split of a hub query dataset"""
    temperature: float = 0.7
    """temperature of the base policy's normalization samples"""

    # ---- optimisation ----
    batch_size: int = 16
    """labels per update, summed over all processes (OAI: 32 for gpt2; the nano model learns more from more and
    smaller steps)"""
    local_micro_batch_size: int = 16
    """labels per forward/backward on one process (each label is n sequences); accumulation makes up the rest"""
    lr: float = 1e-3
    """Adam learning rate at the first update, annealed to 0 over the epoch (OAI: 5e-5 for gpt2)"""
    lr_schedule: Literal["linear", "cosine"] = "linear"
    """annealing of the learning rate: linear (OAI) or cosine without warm-up (SFD)"""
    eps: float = 1e-5
    """Adam epsilon (OAI: 1e-5)"""
    optimizer: Literal["adam_tf", "adam_pytorch", "adamw"] = "adam_tf"
    """adam_tf: TF1's Adam (epsilon-hat, as OAI ran); adam_pytorch: torch.optim.Adam; adamw: torch.optim.AdamW (SFD)"""

    # ---- reward normalization ----
    normalize_before: bool = True
    """before training, set gain and bias so that rewards of base-policy samples have mean 0 and std 1"""
    normalize_after: bool = True
    """the same after training, so that the KL coefficient keeps its meaning"""
    normalize_samples: int = 256
    """base-policy samples that estimate the rewards' mean and std"""
    rollout_batch_size: int = 64
    """samples drawn at once for the normalization, summed over all processes"""
    reference_bias: bool = False
    """after training (and normalize_after), shift the bias so that the reference summaries of --query_dataset's TL;DR
    posts score 0 on average over normalize_samples of them (SFD)"""

    # ---- experiment ----
    exp_name: str = "reward"
    """name of the experiment; the run folder is runs/<exp_name>__<seed>__<unix time>"""
    seed: int = 1
    """seed of the head's init and the label order (the same on every process); sampling uses seed + rank * 100003"""
    track: bool = False
    """log to Weights & Biases (set WANDB_MODE=offline to log without a network)"""
    wandb_project_name: str = "lm-human-preferences-torch"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team); None uses your default"""
    run_root: str = "runs"
    """folder that holds the run folders"""
    save_every: int = 50
    """write a checkpoint every this many updates (0: only when SIGTERM or SIGINT stops the run)"""
    keep_checkpoints: int = 2
    """checkpoints kept in <run folder>/checkpoints; older ones are deleted"""
    resume: Optional[str] = None
    """run folder to continue from its last checkpoint, with the arguments it started with (its args.json); no other
    flag"""

    # ---- evaluation ----
    eval_every: int = 64
    """held-out accuracy every this many updates (and before and after training)"""

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
    """bf16: every forward multiplies in bf16 (the reward model by autocast, the frozen sampler of the normalization
    kept in bf16); losses and Adam's state stay fp32. For GPUs; on an AVX2-only CPU it is much slower"""


# ---------------------------------------------------------------------------------------------------------
# The reward model, its losses, the learning rate
# ---------------------------------------------------------------------------------------------------------


# Copied from train_policy.py
def model_inputs(tokens: torch.Tensor, pad_token_id: int) -> dict:
    """Pads are masked out and each real token's position counts only the real tokens before it, so that padding (left
    or right) never changes a real token's output. {OAI}/lm_human_preferences/language/model.py#L265-L269"""
    mask = tokens != pad_token_id
    return dict(input_ids=tokens, attention_mask=mask.long(), position_ids=(mask.cumsum(1) - 1).clamp(min=0))


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


def label_rewards(reward_model, queries: torch.Tensor, samples: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """(b, n) rewards of each label's n samples, each read with its query: (b, Q) and (b, n, R) tokens."""
    b, n, _ = samples.shape
    tokens = torch.cat([queries.unsqueeze(1).expand(b, n, -1), samples], 2).reshape(b * n, -1)  # (b*n, Q+R)
    return reward_model(tokens, pad_token_id).view(b, n)


def choice_loss(rewards: torch.Tensor, best: torch.Tensor, label_kind: str) -> tuple:
    """(loss, accuracy) of (b, n) rewards against the (b,) preferred samples `best`. best_of_n: softmax cross-entropy
    of the n rewards against `best` ({OAI}/lm_human_preferences/label_types.py#L44-L49); pairwise (column 0 chosen, 1
    rejected): -log sigmoid(r_chosen - r_rejected), the same thing for n = 2."""
    if label_kind == "pairwise":
        loss = -nn.functional.logsigmoid(rewards[:, 0] - rewards[:, 1]).mean()
    else:
        loss = nn.functional.cross_entropy(rewards, best)
    return loss, predicted(rewards, best).float().mean()


def predicted(rewards: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """(b,) whether the preferred sample's reward is above every other's. A tie counts as wrong: argmax would give it to
    the first column, which in pairwise labels is always the chosen one."""
    preferred = rewards.gather(1, best[:, None])  # (b, 1)
    others = rewards.masked_fill(nn.functional.one_hot(best, rewards.shape[1]).bool(), -float("inf"))
    return preferred.squeeze(1) > others.max(1).values


def annealed_lr(lr: float, schedule: str, done: float) -> float:
    """The learning rate once the fraction `done` of the epoch's labels has been trained on: lr annealed to 0, linearly
    (OAI) or by a cosine without warm-up (SFD). A function of the update alone: a checkpoint needs to keep nothing."""
    return lr * (1 - done if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * done)))


# ---------------------------------------------------------------------------------------------------------
# The labels as tensors
# ---------------------------------------------------------------------------------------------------------


def load_labels(args: Args, tokenizer) -> tuple:
    """Train and held-out label tensors, the label kind, and each held-out label's metadata (label_meta)."""
    items, local = read_label_file(args.label_dataset, args.label_config, args.label_split)
    kind, fmt = label_format(items, args.label_dataset)
    if args.num_train + args.num_test > len(items):
        fail(f"--label_dataset {args.label_dataset}: {len(items)} labels, fewer than --num_train {args.num_train} + "
             f"--num_test {args.num_test}")
    meta_path = Path(local).with_suffix(".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    label_tokenizer = tokenizer
    name = args.label_tokenizer or meta.get("tokenizer")
    if name is not None:
        try:
            label_tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as e:
            fail(f"--label_tokenizer {name}: cannot be loaded ({str(e).splitlines()[0][:200]})")
    label_pad = args.label_pad_token_id
    if label_pad is None:
        label_pad = meta.get("pad_token_id", label_tokenizer.pad_token_id)
    test_items = items if args.test_split is None else read_label_file(args.label_dataset, args.label_config,
                                                                       args.test_split)[0]
    test = list(range(len(items) - args.num_test,
                      len(items))) if args.test_split is None else list(range(min(args.num_test, len(test_items))))
    train = label_tensors(items, list(range(args.num_train)), kind, fmt, args.label_dataset, tokenizer,
                          label_tokenizer, label_pad, args)
    held_out = label_tensors(test_items, test, kind, fmt, args.label_dataset, tokenizer, label_tokenizer, label_pad,
                             args)
    for name, (labels, indices) in {"training": (train, range(args.num_train)), "held-out": (held_out, test)}.items():
        ties = tied_labels(*labels)
        if ties:  # a tie no model can learn, which argmax-based accuracy would count as right
            fail(f"--label_dataset {args.label_dataset}: {len(ties)} {name} label(s) prefer a response equal to one "
                 f"they reject (the first: item {list(indices)[ties[0]]}); leave such labels out of the file")
    return train, held_out, kind, [label_meta(test_items[i]) for i in test]


def tied_labels(queries: torch.Tensor, samples: torch.Tensor, best: torch.Tensor) -> list:
    """The rows whose preferred (N, n, R) sample equals, token for token, another of its samples."""
    preferred = samples[torch.arange(len(best)), best]  # (N, R)
    same = (samples == preferred[:, None]).all(-1)  # (N, n): the preferred sample itself included
    return (same.sum(1) > 1).nonzero().flatten().tolist()


def label_tensors(items: list, indices: list, kind: tuple, fmt: str, path: str, tokenizer, label_tokenizer,
                  label_pad: int, args: Args) -> tuple:
    """(queries (N, Q), samples (N, n, R), best (N,)) of items[indices] in the base model's tokens. Token ids: label
    pads are dropped, ids are checked against the label tokenizer's vocabulary and, with a different tokenizer, decoded
    and re-encoded; text is tokenized. The text formats (text_pair) end each response with EOS. Queries keep their
    last Q tokens (left-padded), samples their first R (right-padded): a response cut short loses its EOS."""
    same = label_tokenizer is tokenizer or label_tokenizer.get_vocab() == tokenizer.get_vocab()
    pad, vocab = tokenizer.pad_token_id, len(label_tokenizer)

    def tokens(value, i: int, key: str) -> list:
        if isinstance(value, str):
            return tokenizer.encode(value)
        if not isinstance(value, list) or not all(isinstance(t, int) for t in value):
            fail(f"--label_dataset {path}: item {i} key {key} is neither a list of token ids nor a text")
        ids = [t for t in value if t != label_pad]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            fail(f"--label_dataset {path}: item {i} key {key} has token id {bad[0]} outside the label tokenizer's "
                 f"vocabulary of {vocab}")
        return ids if same else tokenizer.encode(label_tokenizer.decode(ids))

    names = ["chosen", "rejected"] if kind[0] == "pairwise" else [f"sample{j}" for j in range(kind[1])]
    queries, samples = [], []
    for i in indices:
        if fmt in ("best_of_n", "pairwise"):
            q = tokens(items[i]["query"], i, "query")[-args.query_length :]
            queries.append([pad] * (args.query_length - len(q)) + q)
            rs = [tokens(items[i][k], i, k)[: args.response_length] for k in names]
        else:
            query, texts = text_pair(items[i], fmt, f"--label_dataset {path}: item {i}", tokenizer, args.query_length)
            queries.append(query)
            rs = [(tokenizer.encode(t) + [tokenizer.eos_token_id])[: args.response_length] for t in texts]
        samples.append([r + [pad] * (args.response_length - len(r)) for r in rs])
    best = [0] * len(indices) if kind[0] == "pairwise" else [items[i]["best"] for i in indices]
    return torch.tensor(queries), torch.tensor(samples), torch.tensor(best)


# ---------------------------------------------------------------------------------------------------------
# The normalization of the rewards, the held-out accuracy
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reward_stats(reward_model, policy_lm, batches, args: Args, accelerator, pad_token_id: int) -> tuple:
    """(mean, std) of the rewards of normalize_samples base-policy responses (full length, unprocessed, as OAI),
    summed over processes. {OAI}/lm_human_preferences/train_reward.py#L162-L168"""
    world, rank = accelerator.num_processes, accelerator.process_index
    local = args.rollout_batch_size // world
    sums = torch.zeros(3, device=accelerator.device)  # [sum r, sum r^2, count]
    sampler = Sampler(policy_lm, pad_token_id, args.temperature)
    for _ in range(math.ceil(args.normalize_samples / args.rollout_batch_size)):
        queries = next(batches)[0][rank * local : (rank + 1) * local].to(accelerator.device)
        responses = sampler(queries, args.response_length)[0]
        r = reward_model(torch.cat([queries, responses], 1), pad_token_id).float()
        sums += torch.stack([r.sum(), (r**2).sum(), torch.tensor(float(len(r)), device=r.device)])
    sums = accelerator.reduce(sums, reduction="sum")
    mean = (sums[0] / sums[2]).item()
    return mean, math.sqrt(max((sums[1] / sums[2]).item() - mean**2, 0.0))


def normalize(reward_model, stats_fn, target_mean: float = 0.0, target_std: float = 1.0) -> tuple:
    """Reset gain/bias to 1/0, measure the rewards' (mean, std), then set gain = target_std / std and
    bias = target_mean - gain * mean. Returns the measured (mean, std). {OAI}/lm_human_preferences/rewards.py#L73-L89"""
    with torch.no_grad():
        reward_model.gain.fill_(1.0)
        reward_model.bias.fill_(0.0)
        mean, std = stats_fn()
        gain = target_std / std
        reward_model.gain.fill_(gain)
        reward_model.bias.fill_(target_mean - gain * mean)
    return mean, std


@torch.no_grad()
def reference_reward_mean(reward_model, batches, args: Args, accelerator, pad_token_id: int) -> float:
    """Mean reward of normalize_samples reference summaries (query + ' {summary}<|endoftext|>') of TL;DR posts, over
    processes: SFD's bias, so that reference summaries score 0 on average.
    {SFD}/summarize_from_feedback_details/reward.py#L456-L520"""
    world, rank = accelerator.num_processes, accelerator.process_index
    local = args.rollout_batch_size // world
    sums = torch.zeros(2, device=accelerator.device)  # [sum r, count]
    for _ in range(math.ceil(args.normalize_samples / args.rollout_batch_size)):
        queries, references = (t[rank * local : (rank + 1) * local].to(accelerator.device) for t in next(batches))
        r = reward_model(torch.cat([queries, references], 1), pad_token_id)
        sums += torch.stack([r.sum(), torch.tensor(float(len(r)), device=r.device)])
    sums = accelerator.reduce(sums, reduction="sum")
    return (sums[0] / sums[1]).item()


@torch.no_grad()
def accuracy(reward_model, data: tuple, label_kind: str, args: Args, accelerator, pad_token_id: int) -> tuple:
    """(held-out accuracy, loss, whether each held-out label was predicted right), each process scoring a shard; sums
    reduced over processes. Under ZeRO-3 on gathered weights (full_weights), so that unequal shards need no lockstep."""
    queries, samples, best = data
    device = accelerator.device
    # [loss sum, count]; per label
    total, correct = torch.zeros(2, device=device), torch.zeros(len(queries), device=device)
    shard = range(accelerator.process_index, len(queries), accelerator.num_processes)
    idx = torch.tensor(list(shard), dtype=torch.long)
    with full_weights(reward_model, accelerator) as model:
        model.eval()
        for i in range(0, len(idx), args.local_micro_batch_size):
            j = idx[i : i + args.local_micro_batch_size]
            rewards = label_rewards(model, queries[j].to(device), samples[j].to(device), pad_token_id)  # (b, n)
            loss, _ = choice_loss(rewards, best[j].to(device), label_kind)
            correct[j.to(device)] = predicted(rewards, best[j].to(device)).float()
            total += torch.stack([loss * len(j), torch.tensor(float(len(j)), device=device)])
        model.train()
    total, correct = accelerator.reduce(total, reduction="sum"), accelerator.reduce(correct, reduction="sum")
    return correct.mean().item(), (total[0] / total[1]).item(), correct.bool().tolist()


def train(args: Args, run_dir: Optional[Path] = None, resume_command: Optional[str] = None) -> Path:
    """The reward model. run_dir: the run folder (train_both.py gives its stage folder; --resume the folder to
    continue); resume_command: what the message of a run stopped by a signal tells the user to type."""
    stop = StopRequest()  # from here on SIGTERM or SIGINT stops the run after a checkpoint, not in the middle
    world = start_processes().num_processes
    check_args(args)
    grad_accum = args.batch_size // (world * args.local_micro_batch_size)
    accelerator = make_accelerator(args, args.local_micro_batch_size, grad_accum)
    rank, device = accelerator.process_index, accelerator.device
    if not resume_has_work(args.resume, world, zero_stage(accelerator)):
        return Path(args.resume)

    # 1. Models: the reward model (base LM + head, gain, bias) and the frozen base policy that samples for the
    #    normalization (sharded under ZeRO-3: place_frozen; kept in bf16 under --mixed_precision bf16, while the trained
    #    reward model multiplies in bf16 by autocast). The seed is the same on every process, so every copy of the head
    #    starts identical.
    torch.manual_seed(args.seed)
    lm, tokenizer = prepare_lm(*load_base_model(args.base_model, load_in_4bit=args.load_in_4bit))
    if args.load_in_4bit:  # a 4-bit model is neither copied nor moved: the sampler is a second 4-bit load
        policy_lm = prepare_lm(*load_base_model(args.base_model, load_in_4bit=True))[0].eval().requires_grad_(False)
    else:
        policy_lm = place_frozen(copy.deepcopy(lm), accelerator,
                                 torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32)
    lora = add_lora(lm, args)  # under LoRA only the adapters of lm train; the head, gain and bias train in full
    reward_model = RewardModel(lm)
    pad = tokenizer.pad_token_id

    # 2. Labels (checked before anything is written): (queries, samples, best) of the training and held-out ones, all
    #    of one kind, best-of-n (n samples, `best` the preferred one) or pairwise (n = 2, the chosen one first); the
    #    queries of the normalization samples (a Stream: a checkpoint keeps its position); the optimizer, and
    #    accelerator.prepare (DDP, or a DeepSpeed engine with its ZeRO optimizer); then a seed per process for sampling.
    #    {OAI}/lm_human_preferences/utils/core.py#L108-L113
    train_data, test_data, (label_kind, num_choices), test_meta = load_labels(args, tokenizer)
    texts = load_texts(args.query_dataset, args.query_split)
    batches = Stream(query_batches(texts, tokenizer, args.query_length, args.response_length, args.rollout_batch_size,
                                   args.seed))
    optimizer = make_optimizer([p for p in reward_model.parameters() if p.requires_grad], args.optimizer, args.lr,
                               args.eps)
    reward_model, optimizer = accelerator.prepare(reward_model, optimizer)
    unwrapped = accelerator.unwrap_model(reward_model)
    torch.manual_seed(args.seed + rank * 100003)

    # The run folder, its log and checkpoints (a resumed run takes back the weights, optimizer, query position, random
    # generators and metrics of its last checkpoint).
    run = Run(accelerator, args, run_dir, resume_command or "python train_reward.py --resume {run_dir}", "update",
              keep_samples=False, stop=stop, objects=(batches,), info={"label_kind": label_kind},
              about=f"{len(train_data[0]):,} training and {len(test_data[0]):,} held-out {label_kind} labels "
              f"(n = {num_choices}); {world} process(es) x {grad_accum} micro-batch(es) of "
              f"{args.local_micro_batch_size}")

    # 3. Normalize before training: base-policy rewards to mean 0, std 1 (best-of-n labels carry no scale of their
    #    own), {OAI}/lm_human_preferences/train_reward.py#L232-L234; the held-out accuracy of the untrained model.
    #    Under DeepSpeed gain and bias are set whole and the optimizer's fp32 copy follows (full_weights(edit=True)). A
    #    resumed run did this before its checkpoint.
    def stats_fn():
        with full_weights(policy_lm, accelerator) as sampler_lm:  # ZeRO-3: the frozen sampler gathered while it samples
            return reward_stats(unwrapped, sampler_lm, batches, args, accelerator, pad)

    if run.last is None:
        before = {"update": 0, "label": 0}
        if args.normalize_before:
            with full_weights(reward_model, accelerator, edit=True):
                before["normalize/before_training/mean"], before["normalize/before_training/std"] = normalize(
                    unwrapped, stats_fn)
        if len(test_data[0]):
            before["test/accuracy"], before["test/loss"], _ = accuracy(reward_model, test_data, label_kind, args,
                                                                       accelerator, pad)
        run.write(before)

    # 4. One epoch over the labels in an order shared by all processes; each process takes every world-th label of a
    #    batch; lr annealed to 0, linearly (OAI) or by a cosine (SFD); micro-batches accumulate gradients
    #    (accelerator.accumulate divides each loss by grad_accum; DDP averages them across processes at the last one,
    #    DeepSpeed reduces them and steps there). {OAI}/lm_human_preferences/train_reward.py#L236-L250
    order = torch.randperm(args.num_train, generator=torch.Generator().manual_seed(args.seed))
    num_updates = args.num_train // args.batch_size
    reward_model.train()
    for update in run.steps(num_updates, "reward", {"loss": "train/loss", "test_acc": "test/accuracy"}):
        start = update * args.batch_size
        lr = annealed_lr(args.lr, args.lr_schedule, start / args.num_train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ours = order[start : start + args.batch_size][rank::world]
        sums = torch.zeros(2, device=device)  # [loss, accuracy], averaged over the micro-batches
        for micro in range(grad_accum):
            idx = ours[micro * args.local_micro_batch_size : (micro + 1) * args.local_micro_batch_size]
            queries, samples, best = (t[idx].to(device) for t in train_data)  # (b, Q), (b, n, R), (b,)
            with accelerator.accumulate(reward_model):
                loss, acc = choice_loss(label_rewards(reward_model, queries, samples, pad), best, label_kind)
                accelerator.backward(loss)
            sums += torch.stack([loss.detach(), acc]) / grad_accum
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss, train_acc = accelerator.reduce(sums, reduction="mean").tolist()
        metrics = {"update": update + 1, "label": start + args.batch_size, "train/loss": train_loss,
                   "train/accuracy": train_acc, "train/lr": lr}

        # 5. The held-out accuracy every eval_every updates and after the last, then also by the labels' split, batch
        #    and confidence where they carry them (SFD).
        if len(test_data[0]) and ((update + 1) % args.eval_every == 0 or update + 1 == num_updates):
            metrics["test/accuracy"], metrics["test/loss"], correct = accuracy(reward_model, test_data, label_kind,
                                                                               args, accelerator, pad)
            if update + 1 == num_updates:
                metrics.update(accuracy_breakdown(correct, test_meta))

        # The metrics logged; a NaN or inf stops the run (exit 3); a checkpoint every save_every updates, and when
        # SIGTERM or SIGINT asked the run to stop, which it then does (exit 128 + signal).
        run.end_step(update + 1, num_updates, metrics)

    # 6. Normalize after training (so that the policy's KL coefficient keeps its meaning),
    #    {OAI}/lm_human_preferences/train_reward.py#L252-L254; then SFD's reference bias: the reference summaries score
    #    0 on average. Under ZeRO-3 all of it on the gathered weights; the main process writes them.
    final = {"update": num_updates, "label": args.num_train}
    with full_weights(reward_model, accelerator):
        if args.normalize_after:
            final["normalize/after_training/mean"], final["normalize/after_training/std"] = normalize(unwrapped,
                                                                                                      stats_fn)
        if args.reference_bias:
            final["normalize/reference_mean"] = reference_reward_mean(unwrapped, batches, args, accelerator, pad)
            with torch.no_grad():
                unwrapped.bias -= final["normalize/reference_mean"]
        final["reward/gain"], final["reward/bias"] = unwrapped.gain.item(), unwrapped.bias.item()

        # The last line of metrics.jsonl; the reward model (adapters merged under LoRA) and its tokenizer.
        run.write(final)
        write_reward_model(accelerator, unwrapped, lora, tokenizer, run.dir / "reward_model")

    # The summary of the run.
    run.finish(summarize, "reward model")
    return run.dir


# =========================================================================================================
# Plumbing. Everything below serves train() above and is not the algorithm: the command line and the presets, reading
# the label files and the query data, loading the models, sampling, LoRA, the run folder, checkpoints and resume,
# signals, DeepSpeed, the checks of the arguments, the summary, saving. The `# Copied from` blocks are shared with the
# other scripts and kept identical by tests/test_pipeline.py.
# =========================================================================================================


# ---------------------------------------------------------------------------------------------------------
# The command line and the presets (OAI's launch.py, SFD's recipe, the twin)
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
    # OAI's launch.py: books_task + get_train_reward_experiments()['sentiment'|'descriptiveness']
    # https://github.com/openai/lm-human-preferences/blob/cbfd210bb8b08f6bc5c26878c10984b90f516c66/launch.py#L49-L81
    "sentiment": dict(
        exp_name="sentiment_reward", base_model="gpt2",
        label_dataset="vwxyzjn/lm-human-preferences/sentiment/offline_5k.json", label_tokenizer="gpt2",
        label_pad_token_id=50259, num_train=4992, num_test=0, query_length=64, response_length=24,
        query_dataset="bookcorpus", temperature=0.7, batch_size=32, local_micro_batch_size=4, lr=5e-5,
        normalize_before=True, normalize_after=True, normalize_samples=256, rollout_batch_size=512,
    ),
}


PRESETS["descriptiveness"] = {**PRESETS["sentiment"], "exp_name": "descriptiveness_reward",
                              "label_dataset": "vwxyzjn/lm-human-preferences/descriptiveness/offline_5k.json"}


# SFD's 1B reward model: {SFD}/summarize_from_feedback_details/reward.py#L40-L124 and sbatches/reward.sbatch (8 GPUs x
# micro-batch 1 x 8 accumulation = 64; one epoch of 92,832 comparisons; AdamW, lr 3e-6 cosine; responses up to 169
# tokens, tldr_dataset.py's max_rm_response_length; the reference summaries' mean reward as the bias, no gain/bias
# normalization)
PRESETS["tldr"] = dict(
    exp_name="tldr_reward", base_model="models/sft_tldr",
    label_dataset="vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144", label_split="train",
    test_split="validation", num_train=92832, num_test=6400, query_length=512, response_length=169,
    query_dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144", temperature=0.7,
    batch_size=64, local_micro_batch_size=8, lr=3e-6, lr_schedule="cosine", eps=1e-5, optimizer="adamw",
    normalize_before=False, normalize_after=False, normalize_samples=4096, rollout_batch_size=512, reference_bias=True,
)


# the summarization twin: trained as SFD trains, on the judge's comparisons of the twin's SFT samples
# (data/tldr/comparisons.jsonl.gz)
PRESETS["tldr_twin"] = dict(
    exp_name="reward", base_model="runs/tldr_twin/sft_model", label_dataset="data/tldr/comparisons.jsonl.gz",
    num_train=3072, num_test=685, query_length=160, response_length=48, query_dataset="data/tldr/train.jsonl.gz",
    batch_size=16, local_micro_batch_size=16, lr=3e-4, lr_schedule="cosine", optimizer="adamw", normalize_before=False,
    normalize_after=False, normalize_samples=512, rollout_batch_size=64, reference_bias=True, eval_every=192,
)


# ---------------------------------------------------------------------------------------------------------
# Data: label files and their formats, queries
# ---------------------------------------------------------------------------------------------------------


def read_label_file(path: str, config: Optional[str], split: str) -> tuple:
    """(items, local path): a list of JSON objects from a local .json/.jsonl file, a file of a hub dataset repo
    (<user>/<dataset>/<file>), or the rows of a hub dataset (<user>/<dataset>, its `config` and `split`)."""
    local = path
    hub = not os.path.exists(path) and not path.startswith((".", "/"))
    if hub and path.count("/") == 1 and not path.endswith((".json", ".jsonl", ".gz")):
        import datasets

        try:
            rows = datasets.load_dataset(path, config, split=split)
        except Exception as e:  # offline, unknown id, config or split: one line, exit 2
            fail(f"--label_dataset {path}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        known = {k for _, keys in PAIR_FORMATS.values() for k in keys} | {"best", "split", "batch", "extra"}
        items = rows.select_columns([c for c in rows.column_names if c in known or c.startswith("sample")]).to_list()
        if not items:
            fail(f"--label_dataset {path}: no labels in split {split}")
        return items, path
    if hub and path.count("/") >= 2:
        from huggingface_hub import hf_hub_download

        repo, filename = "/".join(path.split("/")[:2]), "/".join(path.split("/")[2:])
        try:
            local = hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset")
        except Exception as e:  # offline or unknown: one line, exit 2
            fail(f"--label_dataset {path}: cannot be downloaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    if not os.path.isfile(local):
        fail(f"--label_dataset {path}: file not found")
    try:
        with (gzip.open(local, "rt", encoding="utf-8") if local.endswith(".gz") else open(local,
                                                                                          encoding="utf-8")) as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        fail(f"--label_dataset {path}: cannot be read ({e})")
    if not text.strip():
        fail(f"--label_dataset {path}: the file is empty")
    try:
        lines = [line for line in text.splitlines() if line.strip()]
        items = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in lines]
    except json.JSONDecodeError as e:
        fail(f"--label_dataset {path}: not valid JSON ({e.msg}, line {e.lineno})")
    if not items:
        fail(f"--label_dataset {path}: no labels in the file")
    return items, local


# Pairwise label formats, told apart by a key only they have: format -> (that key, the keys every record needs).
PAIR_FORMATS = {
    "comparisons": ("summaries", ["info", "summaries", "choice"]),  # OpenAI's summarize-from-feedback
    "prompt_answers": ("answer1", ["prompt", "answer1", "answer2"]),  # answer1 preferred
    "prompt_pairs": ("prompt", ["prompt", "chosen", "rejected"]),  # TRL, CarperAI/openai_summarize_comparisons
    "pairwise": ("query", ["query", "chosen", "rejected"]),  # token ids or text
    "conversations": ("chosen", ["chosen", "rejected"]),  # Anthropic HH-RLHF
}


ASSISTANT = "\n\nAssistant:"


def label_format(items: list, path: str) -> tuple:
    """(kind, format) told apart by the first item's keys: kind ("best_of_n", n) for OAI's best-of-n labels (format
    "best_of_n"), ("pairwise", 2) for the formats of PAIR_FORMATS; checks every item's keys."""
    first = items[0] if isinstance(items[0], dict) else {}
    if "best" in first:
        n = sum(1 for k in first if k.startswith("sample"))
        keys, kind, fmt = ["query", "best"] + [f"sample{i}" for i in range(n)], ("best_of_n", n), "best_of_n"
    else:
        fmt = next((f for f, (key, _) in PAIR_FORMATS.items() if key in first), None)
        if fmt is None:
            fail(f"--label_dataset {path}: item 0 is in no known label format (keys: {', '.join(first) or 'none'}); "
                 f"one of best, {', '.join(key for key, _ in PAIR_FORMATS.values())} tells the format")
        keys, kind = PAIR_FORMATS[fmt][1], ("pairwise", 2)
    for i, item in enumerate(items):
        missing = [k for k in keys if not isinstance(item, dict) or k not in item]
        if missing:
            fail(f"--label_dataset {path}: item {i} lacks the key(s) {', '.join(missing)}")
        best = item["best"] if kind[0] == "best_of_n" else 0
        if isinstance(best, bool) or not isinstance(best, int) or not 0 <= best < kind[1]:  # true is no index
            fail(f"--label_dataset {path}: item {i} has best = {best!r}, not an integer in 0..{kind[1] - 1}")
    if kind[0] == "best_of_n" and kind[1] < 2:
        fail(f"--label_dataset {path}: best-of-n labels need at least sample0 and sample1")
    return kind, fmt


def cut_prompt(prompt: str, tokenizer, query_length: int) -> list:
    """A text prompt's tokens, left-padded to query_length. A prompt too long loses its start and keeps its end (which
    holds "TL;DR:" or "Assistant:"): first its leading lines while they lie wholly in the part that must go (as
    format_tldr_query cuts the post at a newline, from the other side), then tokens."""
    tokens = tokenizer.encode(prompt)
    while len(tokens) > query_length and "\n" in prompt:
        rest = prompt[prompt.index("\n") + 1 :]
        rest_tokens = tokenizer.encode(rest)
        if len(rest_tokens) < query_length:
            break  # the first line reaches into the part that stays
        prompt, tokens = rest, rest_tokens
    tokens = tokens[-query_length:]
    return [tokenizer.pad_token_id] * (query_length - len(tokens)) + tokens


def text_pair(item: dict, fmt: str, where: str, tokenizer, query_length: int) -> tuple:
    """(query tokens left-padded to query_length, [chosen text, rejected text]) of a record of a text format:
      * comparisons, OpenAI's {"info": {id, post, title, subreddit}, "summaries": [two {text, policy, note}], "choice",
        "worker", "batch", "split", "extra"}: the TL;DR query of info; summaries[choice] is chosen; summary texts keep
        their leading space, as SFD reads them ({SFD}/summarize_from_feedback_details/tldr_dataset.py#L261-L283).
        CNN/DM records (an article, no post) are refused. The format:
        https://github.com/openai/summarize-from-feedback/blob/700967448d10004279f138666442bf1497d0e705/README.md#comparisons
      * prompt_pairs, prompt_answers: the prompt as is. CarperAI/openai_summarize_comparisons's summaries are
        "TL;DR: " + OAI's text and its prompts lack "TL;DR:", so "\\nTL;DR:" ends the query and the summary keeps one
        leading space, as in SFD's data (trlX reads prompt + "\\n" + chosen:
        https://github.com/CarperAI/trlx/blob/adb3be224769cf7d85bc3e28b4068ab68bc4f101/examples/summarize_rlhf/reward_model/train_reward_model_gptj.py#L11-L26)
      * conversations, Anthropic HH-RLHF's "\\n\\nHuman: ... \\n\\nAssistant: ...": the prompt is what chosen and
        rejected share up to their last common "\\n\\nAssistant:", the responses the rest
        (https://huggingface.co/datasets/Anthropic/hh-rlhf)."""

    def text(value, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            fail(f"{where} {key} is {'an empty text' if isinstance(value, str) else 'not a text'}")
        return value

    if fmt == "comparisons":
        info, summaries, choice = item["info"], item["summaries"], item["choice"]
        if not isinstance(info, dict):
            fail(f"{where} info is not an object")
        if info.get("post") is None and info.get("article") is not None:
            fail(f"{where} is a CNN/DM comparison (info has an article, no post); only TL;DR posts are read")
        for k in ("subreddit", "title", "post"):
            text(info.get(k), f"info.{k}")
        if not (isinstance(summaries, list) and len(summaries) == 2 and all(isinstance(s, dict) for s in summaries)):
            fail(f"{where} summaries is not a list of two summaries")
        if type(choice) is not int or choice not in (0, 1):
            fail(f"{where} has choice = {choice!r}, not 0 or 1")
        texts = [text(summaries[j].get("text"), f"summaries[{j}].text") for j in (choice, 1 - choice)]
        return format_tldr_query(info, tokenizer, query_length), texts
    keys = ["answer1", "answer2"] if fmt == "prompt_answers" else ["chosen", "rejected"]
    if fmt == "conversations":
        chosen, rejected = text(item["chosen"], "chosen"), text(item["rejected"], "rejected")
        end = os.path.commonprefix([chosen, rejected]).rfind(ASSISTANT)
        if end < 0:
            fail(f"{where} chosen and rejected share no prompt ending in {ASSISTANT!r}")
        prompt, texts = chosen[: end + len(ASSISTANT)], [chosen[end + len(ASSISTANT) :],
                                                         rejected[end + len(ASSISTANT) :]]
    else:
        prompt, texts = text(item["prompt"], "prompt"), [text(item[k], k) for k in keys]
        if all(t.startswith("TL;DR:") for t in texts):  # CarperAI/openai_summarize_comparisons
            prompt, texts = prompt + "\nTL;DR:", [" " + t[len("TL;DR:") :].lstrip() for t in texts]
    for key, t in zip(keys, texts):
        if not t.strip():
            fail(f"{where} has an empty {key} response")
    return cut_prompt(prompt, tokenizer, query_length), texts


def label_meta(item: dict) -> dict:
    """A label's split, batch and confidence where its record has them, as OpenAI's comparisons do ("split",
    "batch", "extra": {"confidence"})."""
    extra = item.get("extra") if isinstance(item.get("extra"), dict) else {}
    meta = {"split": item.get("split"), "batch": item.get("batch"), "confidence": extra.get("confidence")}
    return {k: v for k, v in meta.items() if v is not None}


def accuracy_breakdown(correct: list, meta: list) -> dict:
    """Accuracy per split, batch and confidence of the labels (label_meta); a label without a value is left out of
    that breakdown. SFD logs the same as eval/rm/{split}/accuracy/{split|batch|confidence}/{value}
    ({SFD}/summarize_from_feedback_details/reward.py#L437-L445); here test/accuracy/{key}/{value}."""
    groups = {}
    for ok, m in zip(correct, meta):
        for key, value in m.items():
            groups.setdefault(f"test/accuracy/{key}/{value}", []).append(float(ok))
    return {name: sum(oks) / len(oks) for name, oks in sorted(groups.items())}


# Copied from train_policy.py
TLDR_KEYS = ("subreddit", "title", "post", "summary")


# Copied from train_policy.py
def row_kind(row) -> str:
    """What a row of query data is: "text" (books), "tldr" (a post and its summary) or "problem" (a verifiable task)."""
    return "text" if isinstance(row, str) else "problem" if "problem" in row else "tldr"


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


# ---------------------------------------------------------------------------------------------------------
# Models, sampling, the optimizer
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
def save_reward_model(model: RewardModel, tokenizer, folder: Path):
    """A Hugging Face folder of the language model (backbone) plus reward_head.safetensors (head, gain, bias)."""
    tmp = folder.with_name(folder.name + ".tmp")
    model.lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    head = {"head.weight": model.head.weight, "head.bias": model.head.bias, "gain": model.gain, "bias": model.bias}
    save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, tmp / "reward_head.safetensors")
    swap_in(tmp, folder)


# Copied from train_policy.py
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
# Checks of the arguments, the run's summary, saving the reward model
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


def check_args(args: Args):
    """The checks of the arguments that need no training (sizes, the base model, the label file, the query data), run
    before anything is trained or written; train_both.py runs them before either stage."""
    check_common(args)
    world = PartialState().num_processes
    if args.batch_size % (world * args.local_micro_batch_size):
        fail(f"--batch_size {args.batch_size} is not divisible by --local_micro_batch_size "
             f"{args.local_micro_batch_size} x {world} processes")
    if args.num_train % args.batch_size or args.num_train == 0:  # {OAI}/lm_human_preferences/train_reward.py#L56-L58
        fail(f"--num_train {args.num_train} is not a positive multiple of --batch_size {args.batch_size}")
    if args.rollout_batch_size % world:
        fail(f"--rollout_batch_size {args.rollout_batch_size} is not divisible by {world} processes")
    check_lora(args)
    config, _ = load_base_model(args.base_model, weights=False)
    positions = getattr(config, "n_positions", getattr(config, "max_position_embeddings", 1 << 30))
    if args.query_length + args.response_length > positions:
        fail(f"--query_length + --response_length = {args.query_length + args.response_length} exceeds the model's "
             f"{positions} positions")
    read_label_file(args.label_dataset, args.label_config, args.label_split)
    if args.reference_bias and isinstance(load_texts(args.query_dataset, args.query_split)[0], str):
        fail(f"--reference_bias needs TL;DR posts with reference summaries; --query_dataset {args.query_dataset} holds "
             "texts")


def summarize(metrics_path: Path, wall_s: float) -> dict:
    """Headline figures of a reward run: held-out accuracy before and after training (after training also by the labels'
    batch, where they name one: the twin's sample-vs-sample, -reference and -lead comparisons), training accuracy over
    the last tenth of updates, the normalization, wall time (every resumed part summed)."""
    metrics = [json.loads(line) for line in open(metrics_path)]
    updates, tests = [m for m in metrics if "train/loss" in m], [m for m in metrics if "test/accuracy" in m]
    tenth = updates[-max(1, len(updates) // 10) :]
    summary = {"labels": updates[-1]["label"]}
    if tests:
        summary["test/accuracy/before"] = tests[0]["test/accuracy"]
        summary["test/accuracy/after"] = tests[-1]["test/accuracy"]
        summary.update({k: v for k, v in tests[-1].items() if k.startswith("test/accuracy/batch/")})
    summary["train/accuracy/last_tenth"] = sum(m["train/accuracy"] for m in tenth) / len(tenth)
    summary.update({k: v for k, v in metrics[-1].items() if k.startswith(("reward/", "normalize/"))})
    summary["wall_s"] = wall_s
    return summary


def write_reward_model(accelerator, model: "RewardModel", lora, tokenizer, folder: Path):
    """The trained reward model (under LoRA its adapters merged into the language model) and its tokenizer as a
    reward-model folder (save_reward_model), written by the main process; under ZeRO-3 called inside full_weights,
    which every process enters."""
    model.lm = saved_lm(model.lm, lora)
    if accelerator.is_main_process:
        save_reward_model(model, tokenizer, folder)
        print(f"reward model saved to {folder}")


if __name__ == "__main__":
    train(cli(Args, PRESETS, __doc__))

"""Supervised fine-tuning (SFT) of a causal language model, in one readable file.

Two jobs, one loop:
  * `--task corpus` (the default): pretrain the embedded nano GPT-2 from scratch on the embedded corpus of
    English passages (data/corpus.jsonl.gz) with the byte-level BPE tokenizer in data/nano. Passages are
    joined with <|endoftext|> and cut into blocks of `block_size` tokens; the loss covers every token.
  * `--task tldr`: fine-tune any `--base_model` (hub id, local folder or .gguf file) on the TL;DR data
    published with OpenAI's summarize-from-feedback (jsonl with subreddit, title, post, summary). Queries
    follow OAI's format and are left-padded to `query_length`; the loss covers the summary tokens only.
  * `--task problems`: fine-tune on a verifiable task's problems and worked solutions (jsonl with problem, solution;
    data/arithmetic/), the loss on the solution; at the end a program checks answers to held-out problems (pass@1).

    python train_sft.py                                  # nano pretraining on the embedded corpus (CPU, minutes)
    python train_sft.py --task tldr --base_model gpt2 --dataset tldr_3_filtered/train.jsonl
    python train_sft.py arithmetic                       # the nano model learns data/arithmetic's worked solutions
    accelerate launch --num_processes 8 train_sft.py ...  # the global batch stays `batch_size`

Links write {OAI} for https://github.com/openai/lm-human-preferences/blob/cbfd210bb8b08f6bc5c26878c10984b90f516c66 and
{SFD} for https://github.com/vwxyzjn/summarize_from_feedback_details/blob/ee77a9abc31f5338365ee087945c5bcafac7f1ca.
"""

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
from tqdm.auto import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GgufConfig, GPT2Config,
                          GPT2LMHeadModel, StaticCache)
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.integrations import unset_hf_deepspeed_config
from transformers.pytorch_utils import Conv1D


@dataclass
class Args:
    # ---- task and data ----
    task: Literal["corpus", "tldr", "problems"] = "corpus"
    """corpus: language modelling on passages; tldr: summaries of Reddit posts, loss on the summary only; problems:
    worked solutions of a verifiable task's problems, loss on the solution only"""
    dataset: str = "data/corpus.jsonl.gz"
    """corpus: a .jsonl(.gz) of {"text": ...}; tldr: a .jsonl(.gz) in the upstream TL;DR format or a hub dataset id;
    problems: a .jsonl(.gz) of {"problem": ..., "solution": ...}"""
    dataset_split: str = "train"
    """split to train on when `dataset` is a hub dataset"""
    eval_split: Optional[str] = None
    """held-out split of a hub dataset (e.g. validation); None holds out every (1/eval_fraction)-th example"""
    eval_fraction: float = 0.02
    """fraction of examples held out for the held-out loss when no eval_split is given"""
    block_size: int = 128
    """corpus: tokens per training sequence"""
    query_length: int = 512
    """tldr: query tokens (OAI: 512); the post is cut at its last newline until the query fits, then left-padded;
    problems: the problem's tokens, left-padded"""
    response_length: int = 53
    """tldr: summary tokens including <|endoftext|> (summarize_from_feedback_details: 53); problems: solution tokens"""
    verifier: Optional[Literal["arithmetic"]] = None
    """problems: the program that checks the answers sampled for held-out problems at the end (eval/pass@1)"""
    train_on_query: bool = False
    """tldr: the loss also covers the query tokens, as SFD's SFT loss covers query and summary (OAI's covers the
    summary)"""

    # ---- model (a fresh nano GPT-2 to pretrain, or a base model to fine-tune) ----
    base_model: Optional[str] = None
    """hub id, local folder or .gguf file to start from; None builds a fresh nano GPT-2 on `tokenizer`"""
    tokenizer: str = "data/nano"
    """tokenizer of a fresh nano GPT-2 (used when base_model is None)"""
    n_layer: int = 4
    """fresh nano GPT-2: transformer layers"""
    n_embd: int = 256
    """fresh nano GPT-2: width"""
    n_head: int = 4
    """fresh nano GPT-2: attention heads"""
    n_positions: int = 256
    """fresh nano GPT-2: longest sequence (query + response of the RL stages must fit)"""
    dropout: float = 0.0
    """probability of every dropout layer of the model (OAI trains its policies without dropout)"""

    # ---- optimization (AdamW) and the learning-rate schedule ----
    total_steps: int = 320
    """optimizer updates"""
    batch_size: int = 32
    """sequences per update, summed over all processes (the same whatever --num_processes is)"""
    local_micro_batch_size: int = 16
    """sequences per forward pass on one process; gradient accumulation makes up the rest"""
    lr: float = 2e-3
    """peak learning rate of AdamW"""
    warmup_steps: int = 40
    """updates of linear warm-up from 0 to lr"""
    lr_schedule: Literal["cosine", "linear"] = "cosine"
    """decay from lr to 0 after the warm-up"""
    weight_decay: float = 0.1
    """AdamW weight decay (on matrices only, not on biases and norms)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""

    # ---- experiment ----
    exp_name: str = "sft"
    """name of the experiment; the run folder is runs/<exp_name>__<seed>__<unix time>"""
    seed: int = 1
    """seed of model initialisation and data order (identical on every process)"""
    track: bool = False
    """log to Weights & Biases (set WANDB_MODE=offline to log without a network)"""
    wandb_project_name: str = "lm-human-preferences-torch"
    """wandb project"""
    wandb_entity: Optional[str] = None
    """wandb entity (team); None uses your default"""
    run_root: str = "runs"
    """folder that holds the run folders"""
    save_every: int = 100
    """write a checkpoint every this many updates (0: only when SIGTERM or SIGINT stops the run)"""
    keep_checkpoints: int = 2
    """checkpoints kept in <run folder>/checkpoints; older ones are deleted"""
    resume: Optional[str] = None
    """run folder to continue from its last checkpoint, with the arguments it started with (its args.json); no other
    flag"""
    output_dir: Optional[str] = None
    """also save the final model and tokenizer here (replaced only once training has succeeded)"""

    # ---- logging and evaluation ----
    eval_every: int = 100
    """compute the held-out loss and perplexity every this many updates (and at the end)"""
    num_eval: int = 64
    """tldr: held-out posts summarized at the end for ROUGE-1/2/L against their reference summaries; problems: held-out
    problems answered at the end for pass@1"""
    eval_temperature: float = 0.01
    """tldr: sampling temperature of those summaries (SFD: 0.01); problems: of those answers"""
    num_samples: int = 4
    """samples printed (and saved) at the end, continuing held-out prompts"""
    sample_prompt_tokens: int = 16
    """corpus: prompt tokens taken from a held-out passage for each sample"""
    sample_length: int = 48
    """tokens generated per sample"""
    temperature: float = 0.7
    """sampling temperature for the samples (top_k 0, top_p 1, as OAI samples)"""

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
    """bf16 autocast for GPUs (the weights stay fp32); on a CPU without bf16 units (AVX2 only) it is much slower"""


# ---------------------------------------------------------------------------------------------------------
# SFT's pieces: the nano model, packing the corpus, TL;DR examples, the shuffled batches, the loss on labelled tokens,
# the learning-rate schedule, the held-out loss
# ---------------------------------------------------------------------------------------------------------


def new_nano_model(args: Args, tokenizer) -> GPT2LMHeadModel:
    """A fresh GPT-2 of --n_layer layers, --n_embd wide with --n_head heads and --n_positions positions on the
    tokenizer's vocabulary, its dropout at --dropout, initialised from torch's generator (seeded by train())."""
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=args.n_positions, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, resid_pdrop=args.dropout, embd_pdrop=args.dropout,
        attn_pdrop=args.dropout, summary_first_dropout=args.dropout,
    )
    return GPT2LMHeadModel(config)


def pack_corpus(texts: list, tokenizer, block_size: int) -> torch.Tensor:
    """Join passages with <|endoftext|> and cut the stream into (n_blocks, block_size) token ids."""
    ids = []
    for ids_ in tokenizer(texts)["input_ids"]:
        ids.extend(ids_ + [tokenizer.eos_token_id])
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def tldr_examples(rows: list, tokenizer, query_length: int, response_length: int) -> torch.Tensor:
    """(n, query_length + response_length) token ids: left-padded query, then ' {summary}<|endoftext|>' right-padded."""
    out = [format_tldr_query(row, tokenizer, query_length) + format_tldr_response(row["summary"], tokenizer,
                                                                                  response_length) for row in rows]
    return torch.tensor(out, dtype=torch.long)


def problem_examples(rows: list, tokenizer, query_length: int, response_length: int) -> torch.Tensor:
    """(n, query_length + response_length) token ids: the left-padded problem, then ' {solution}<|endoftext|>'
    right-padded."""
    out = [format_problem_query(row["problem"], tokenizer, query_length) + format_tldr_response(
        row["solution"], tokenizer, response_length) for row in rows]
    return torch.tensor(out, dtype=torch.long)


def shuffled_batches(num_rows: int, batch_size: int, seed: int):
    """(epoch, the row indices of a global batch), without end: each epoch a new permutation of the rows, drawn from a
    generator of its own (the same on every process), cut into batches of batch_size; a remainder shorter than a batch
    is left out of that epoch."""
    generator = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        order = torch.randperm(num_rows, generator=generator)
        for start in range(0, num_rows - batch_size + 1, batch_size):
            yield epoch, order[start : start + batch_size]
        epoch += 1


# Copied from train_policy.py
def model_inputs(tokens: torch.Tensor, pad_token_id: int) -> dict:
    """Pads are masked out and each real token's position counts only the real tokens before it, so that padding (left
    or right) never changes a real token's output. {OAI}/lm_human_preferences/language/model.py#L265-L269"""
    mask = tokens != pad_token_id
    return dict(input_ids=tokens, attention_mask=mask.long(), position_ids=(mask.cumsum(1) - 1).clamp(min=0))


def inputs_and_labels(batch: torch.Tensor, pad_token_id: int, query_length: int) -> dict:
    """Model inputs for a batch of token ids (b, t). Pads are masked out and positions count only real tokens
    (left padding with explicit position ids, as OAI). Labels are -100 on pads and, if query_length > 0, on
    the query, so that the loss covers only the response."""
    inputs = model_inputs(batch, pad_token_id)
    labels = batch.masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, :query_length] = -100
    return dict(**inputs, labels=labels)


def lm_loss(model, batch: dict) -> tuple:
    """(mean next-token cross-entropy over labelled tokens, number of labelled tokens): the logits at position
    t predict the token at t + 1."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    targets = batch["labels"][:, 1:]  # (b, t-1)
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    return loss, (targets != -100).sum()


def lr_lambda(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then linear or cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, micro_batch_size: int, pad_token_id: int, query_length: int,
                 accelerator) -> float:
    """Mean token loss over the held-out blocks; each process takes a shard and the sums are reduced."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)  # [sum of token losses, number of tokens]
    shard = blocks[accelerator.process_index :: accelerator.num_processes]
    for i in range(0, len(shard), micro_batch_size):
        batch = inputs_and_labels(shard[i : i + micro_batch_size].to(accelerator.device), pad_token_id, query_length)
        loss, n_tokens = lm_loss(model, batch)
        total += torch.stack([loss * n_tokens, n_tokens.float()])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1]).item()


def train(args: Args) -> Path:
    """Supervised fine-tuning (or pretraining from scratch) on a corpus or TL;DR; returns the run folder."""
    stop = StopRequest()  # from here on SIGTERM or SIGINT stops the run after a checkpoint, not in the middle
    world = start_processes().num_processes
    train_rows, eval_rows = check_args(args)
    local_batch_size = args.batch_size // world
    grad_accum = local_batch_size // args.local_micro_batch_size
    # gradient clipping at max_grad_norm: by accelerate under DDP, inside the optimizer step under DeepSpeed
    accelerator = make_accelerator(args, args.local_micro_batch_size, grad_accum, args.max_grad_norm)
    rank, device = accelerator.process_index, accelerator.device
    if not resume_has_work(args.resume, world, zero_stage(accelerator)):
        return Path(args.resume)

    # 1. The model: a fresh nano GPT-2 on --tokenizer (pretraining) or --base_model (fine-tuning), the same on every
    #    process (one seed); a dedicated pad token, every dropout at --dropout; under LoRA only the adapters train.
    torch.manual_seed(args.seed)
    if args.base_model is None:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        model = new_nano_model(args, tokenizer)
    else:
        model, tokenizer = load_base_model(args.base_model, load_in_4bit=args.load_in_4bit)
    model, tokenizer = prepare_lm(model, tokenizer)  # a dedicated pad token (not EOS); dropout is set next
    set_dropout(model, args.dropout)
    lora = add_lora(model, args)  # under LoRA only the adapters train (--dropout still sets the model's own dropout)

    # 2. Data: rows of token ids (n, T) whose first query_length tokens carry no loss. Corpus: the passages joined by
    #    <|endoftext|> and cut into blocks, every token labelled; TL;DR: the left-padded query, then the reference
    #    summary, which alone is labelled (query and summary under --train_on_query); problems: the left-padded
    #    problem, then its worked solution, alike. Every process draws the same
    #    shuffled global batches; a Stream counts them, so that a checkpoint keeps the position.
    if args.task == "corpus":
        train_data = pack_corpus([r["text"] for r in train_rows], tokenizer, args.block_size)
        eval_data = pack_corpus([r["text"] for r in eval_rows], tokenizer, args.block_size)
        query_length = 0
    else:  # TL;DR posts and summaries, or problems and worked solutions
        examples = tldr_examples if args.task == "tldr" else problem_examples
        train_data = examples(train_rows, tokenizer, args.query_length, args.response_length)
        eval_data = examples(eval_rows, tokenizer, args.query_length, args.response_length)
        query_length = 0 if args.train_on_query else args.query_length
    check_data(args, train_data, model)
    batches = Stream(shuffled_batches(len(train_data), args.batch_size, args.seed))

    # 3. Optimizer: AdamW with weight decay on matrices only; the learning rate warms up linearly, then decays to 0
    #    (lr_lambda).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, args.warmup_steps, args.total_steps, args.lr_schedule))
    num_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)  # counted before ZeRO-3 shards them
    # DDP, or a DeepSpeed engine (its optimizer keeps the scheduler's groups)
    model, optimizer = accelerator.prepare(model, optimizer)

    # The run folder, its log and checkpoints (a resumed run takes back the weights, optimizer, schedule, data position,
    # random generators and metrics of its last checkpoint).
    run = Run(accelerator, args, None, "python train_sft.py --resume {run_dir}", "step", keep_samples=True,
              stop=stop, objects=(scheduler, batches), unit="step",
              about=f"{num_trained:,} trained parameters; {len(train_data):,} training and {len(eval_data):,} held-out "
              f"sequences of {train_data.shape[1]} tokens; {world} process(es) x {grad_accum} micro-batch(es) of "
              f"{args.local_micro_batch_size}")
    model.train()
    for step in run.steps(args.total_steps, "sft", {"loss": "train/loss", "eval_ppl": "eval/perplexity"}):
        t0 = time.time()

        # 4. The next global batch; this process takes its share, in micro-batches, each loss the mean next-token loss
        #    over its labelled tokens. accelerator.accumulate divides each loss by grad_accum; DDP averages the
        #    gradients across processes at the last micro-batch (under DeepSpeed the engine steps there).
        epoch, rows = next(batches)
        rows = rows[rank * local_batch_size : (rank + 1) * local_batch_size]
        loss_sum = torch.zeros((), device=device)
        for start in range(0, local_batch_size, args.local_micro_batch_size):
            micro_rows = rows[start : start + args.local_micro_batch_size]
            batch = inputs_and_labels(train_data[micro_rows].to(device), tokenizer.pad_token_id, query_length)
            with accelerator.accumulate(model):
                loss, _ = lm_loss(model, batch)
                accelerator.backward(loss)
            loss_sum += loss.detach().float()

        # 5. The update: the gradient's global norm clipped at max_grad_norm, an AdamW step at the schedule's learning
        #    rate, then the schedule moves on.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 6. Statistics: the training loss averaged over processes; every eval_every steps and after the last, the
        #    held-out loss and perplexity (with ROUGE of held-out summaries at the end of a TL;DR run). Under ZeRO-3 the
        #    weights are gathered on every process, so that unequal shards of held-out data (and the main process
        #    sampling alone) need no lockstep.
        train_loss = accelerator.reduce(loss_sum / grad_accum, reduction="mean").item()
        step_s = time.time() - t0
        metrics = {"step": step + 1, "epoch": epoch, "train/loss": train_loss, "train/lr": lr,
                   "train/grad_norm": float(grad_norm), "timing/step_s": step_s,
                   "throughput/tokens_per_s": args.batch_size * train_data.shape[1] / step_s}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.total_steps:
            with full_weights(model, accelerator) as bare:
                metrics["eval/loss"] = heldout_loss(bare, eval_data, args.local_micro_batch_size,
                                                    tokenizer.pad_token_id, query_length, accelerator)
                if args.task == "tldr" and step + 1 == args.total_steps and accelerator.is_main_process:
                    metrics.update(tldr_rouge(bare, tokenizer, eval_data, args, device))
                if args.task == "problems" and step + 1 == args.total_steps:  # each process answers its share
                    bare.eval()
                    metrics.update(evaluate_answers(Sampler(bare, tokenizer.pad_token_id, args.eval_temperature),
                                                    eval_data[: args.num_eval, : args.query_length].to(device),
                                                    tokenizer, args, accelerator, chunk=args.num_eval)[0])
            model.train()
            metrics["eval/perplexity"] = math.exp(metrics["eval/loss"])

        # The metrics logged; a NaN or inf stops the run (exit 3); a checkpoint every save_every steps, and when SIGTERM
        # or SIGINT asked the run to stop, which it then does (exit 128 + signal).
        run.end_step(step + 1, args.total_steps, metrics)

    # Samples continuing held-out prompts (samples.json), the model (adapters merged under LoRA) in the run folder's
    # model/ and --output_dir, the summary. Under ZeRO-3 every process gathers the weights; the main one writes them.
    save_samples_and_model(run, model, lora, tokenizer, eval_data, args)
    run.finish(lambda path, wall_s: print_closing_line(summarize(path, wall_s), run.dir, args.output_dir), "SFT")
    return run.dir


# =========================================================================================================
# Plumbing. Everything below serves train() above and is not the algorithm: the command line and the presets, reading
# the data, loading and saving the models, LoRA, the run folder, checkpoints and resume, signals, DeepSpeed, the checks
# of the arguments, sampling and ROUGE for the evaluation, the summary. The `# Copied from` blocks are shared with the
# other scripts and kept identical by tests/test_pipeline.py.
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
    # SFD's SFT of pythia-1b-deduped on its TL;DR data: {SFD}/summarize_from_feedback_details/sft.py#L41-L127 and
    # sbatches/sft.sbatch (8 GPUs x micro-batch 1 x 16 accumulation = 128; one epoch of 116,722 posts = 911 updates;
    # AdamW, lr 3e-6 cosine without warm-up; no gradient clipping; loss on query and summary; ROUGE at temperature 0.01)
    "tldr": dict(
        exp_name="sft_tldr", task="tldr", base_model="EleutherAI/pythia-1b-deduped", output_dir="models/sft_tldr",
        dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144", dataset_split="train",
        eval_split="validation", query_length=512, response_length=53, train_on_query=True, total_steps=911,
        batch_size=128, local_micro_batch_size=16, lr=3e-6, warmup_steps=0, lr_schedule="cosine", weight_decay=0.01,
        max_grad_norm=float("inf"), num_eval=512, eval_temperature=0.01,
    ),
    # the summarization twin (data/tldr/, made by data/build.py): the nano model fine-tuned on post -> reference
    # summary, one epoch in 240 updates of 16 at lr 2e-3 (at 120 updates of 32 and lr 5e-4 its samples scored 0.03 by
    # the judge and ROUGE-L 0.220, here 0.06 and 0.234, in the same time)
    "tldr_twin": dict(
        exp_name="sft_tldr_twin", task="tldr", base_model="data/nano", output_dir="runs/tldr_twin/sft_model",
        dataset="data/tldr/train.jsonl.gz", query_length=160, response_length=48, total_steps=240, batch_size=16,
        local_micro_batch_size=16, lr=2e-3, warmup_steps=10, lr_schedule="cosine", eval_every=80, num_eval=256,
        # as train_policy.py's tldr_twin evaluation: the nano model loops when decoding near-greedily
        eval_temperature=0.7,
    ),
    # the verifiable task (data/arithmetic, made by data/build.py): the nano model taught the worked solutions of a
    # teacher that slips, until it answers about a third of held-out problems right at temperature 0.7, for
    # train_rloo.py's and train_policy.py's arithmetic presets. 320 updates (~2.6 epochs): at 240 the seeds landed 7
    # points apart (validation pass@1 0.20-0.26 at GRPO's update 0) and GRPO from the weakest gained half as much
    "arithmetic": dict(
        exp_name="sft_arithmetic", task="problems", base_model="data/nano", output_dir="runs/arithmetic/sft_model",
        dataset="data/arithmetic/train.jsonl.gz", verifier="arithmetic", query_length=6, response_length=32,
        total_steps=320, batch_size=64, local_micro_batch_size=64, lr=2e-3, warmup_steps=10, lr_schedule="cosine",
        eval_every=50, num_eval=160, eval_temperature=0.7,  # every held-out problem (every 50th of 8,000)
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Data: corpus passages and TL;DR posts
# ---------------------------------------------------------------------------------------------------------


def read_jsonl(path: str, required_keys: tuple) -> list:
    """Rows of a .jsonl or .jsonl.gz file; any problem is reported with the file name and line."""
    if not os.path.isfile(path):
        fail(f"{path}: file not found")
    rows = []
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    fail(f"{path}: line {n} is not valid JSON ({e.msg})")
                missing = [k for k in required_keys if not isinstance(row, dict) or not isinstance(row.get(k), str)]
                if missing:
                    fail(f"{path}: line {n} lacks the string field(s) {', '.join(missing)}")
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        fail(f"{path}: cannot be read ({e})")
    if not rows:
        fail(f"{path}: no examples in the file")
    return rows


# Copied from train_policy.py
TLDR_KEYS = ("subreddit", "title", "post", "summary")


def load_rows(args: Args, required_keys: tuple) -> tuple:
    """(train rows, held-out rows) from a local file or, for TL;DR, a hub dataset. Without a held-out split,
    every (1/eval_fraction)-th row is held out: the same rows whatever the seed."""
    heldout = None
    if args.task == "corpus" or os.path.exists(args.dataset) or args.dataset.endswith((".json", ".jsonl", ".gz")):
        rows = read_jsonl(args.dataset, required_keys)
    else:
        import datasets

        try:
            rows = list(datasets.load_dataset(args.dataset, split=args.dataset_split))
            if args.eval_split is not None:
                heldout = list(datasets.load_dataset(args.dataset, split=args.eval_split))
        except Exception as e:  # offline, unknown id or split: one line, exit 2
            fail(f"--dataset {args.dataset}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        missing = [k for k in required_keys if rows and k not in rows[0]]
        if not rows or missing:
            fail(f"--dataset {args.dataset}: split {args.dataset_split} is empty or lacks the column(s) "
                 f"{', '.join(missing)}")
    if heldout is None:
        every = max(2, round(1 / args.eval_fraction))
        rows, heldout = [r for i, r in enumerate(rows) if i % every], [r for i, r in enumerate(rows) if i % every == 0]
    return rows, heldout


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


# ---------------------------------------------------------------------------------------------------------
# The models: loading, dropout, LoRA, saving
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


def set_dropout(model: nn.Module, p: float):
    """Set every dropout layer's probability (works for any architecture; the config would not be enough
    for a model that has already been built)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


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


def save_model(model, tokenizer, folder: Path):
    """save_pretrained into a temporary folder, then swap it in."""
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
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
# Checks of the arguments; sampling, ROUGE and the closing samples; saving; the summary
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
    """Every check of the arguments that needs no model (sizes, checkpoints, LoRA, the tokenizer of a fresh model), run
    before anything is trained or written, and the data read (any problem with it is one line too). Returns the
    training and held-out rows."""
    check_common(args)
    world = PartialState().num_processes
    if args.batch_size % (world * args.local_micro_batch_size):
        fail(f"--batch_size {args.batch_size} is not divisible by --local_micro_batch_size "
             f"{args.local_micro_batch_size} x {world} processes")
    check_lora(args)
    if args.load_in_4bit and args.base_model is None:
        fail("--load_in_4bit quantizes a pretrained --base_model; a fresh nano model has nothing to quantize")
    if args.base_model is None and not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        fail(f"--tokenizer {args.tokenizer}: no tokenizer.json there (build it with: python data/build.py tokenizer)")
    positions = args.n_positions
    if args.base_model is not None:
        config = load_base_model(args.base_model, weights=False)[0]
        positions = getattr(config, "n_positions", getattr(config, "max_position_embeddings", 1 << 30))
    if args.task == "corpus" and args.block_size > positions:
        fail(f"--block_size {args.block_size} exceeds the model's {positions} positions")
    if args.task != "corpus" and args.query_length + args.response_length > positions:
        fail(f"--query_length + --response_length = {args.query_length + args.response_length} exceeds the model's "
             f"{positions} positions")
    if args.task == "problems" and args.verifier is None:
        fail("--task problems needs a --verifier to check the held-out answers (e.g. --verifier arithmetic)")
    return load_rows(args, {"corpus": ("text",), "tldr": TLDR_KEYS, "problems": ("problem", "solution")}[args.task])


def check_data(args: Args, train_data: torch.Tensor, model):
    """At least a batch of training sequences, and token ids within the model's vocabulary."""
    if len(train_data) < args.batch_size:
        fail(f"--dataset {args.dataset}: {len(train_data)} training sequences, fewer than --batch_size "
             f"{args.batch_size}")
    if train_data.max() >= model.get_input_embeddings().num_embeddings:
        fail(f"--dataset {args.dataset}: token ids beyond the model's vocabulary (tokenizer and model do not match)")


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


@torch.no_grad()
def sample(model, tokenizer, eval_data: torch.Tensor, query_length: int, args: Args, device) -> list:
    """Continue the first `num_samples` held-out prompts for `sample_length` tokens."""
    model.eval()
    n_prompt = query_length if query_length else args.sample_prompt_tokens
    prompts = eval_data[: args.num_samples, :n_prompt].to(device)
    continuations = Sampler(model, tokenizer.pad_token_id, args.temperature)(prompts, args.sample_length)[0]
    return [
        {"prompt": tokenizer.decode(p[p != tokenizer.pad_token_id]), "continuation": tokenizer.decode(c)}
        for p, c in zip(prompts, continuations)
    ]


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
def rouge(summaries: list, references: list) -> list:
    """Per pair {rouge1, rouge2, rougeL}: F1 of each summary against its reference, by rouge-score without stemming, as
    SFD's evaluate.load("rouge") computes it. {SFD}/summarize_from_feedback_details/sft.py#L37"""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    return [{k: v.fmeasure for k, v in scorer.score(ref, summary).items()} for summary,
            ref in zip(summaries, references)]


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


@torch.no_grad()
def tldr_rouge(model, tokenizer, eval_data: torch.Tensor, args: Args, device) -> dict:
    """ROUGE-1/2/L F1 of summaries of the first num_eval held-out posts, sampled at eval_temperature (SFD: 0.01) and cut
    after the first EOS, against their reference summaries. {SFD}/summarize_from_feedback_details/sft.py#L215-L281"""
    model.eval()
    data = eval_data[: args.num_eval].to(device)
    queries, references = data[:, : args.query_length], data[:, args.query_length :]
    responses = Sampler(model, tokenizer.pad_token_id, args.eval_temperature)(queries, args.response_length)[0]
    responses = truncate_responses(responses, tokenizer.eos_token_id, 0, tokenizer.pad_token_id)
    texts, ref_texts = (tokenizer.batch_decode([r[r != tokenizer.pad_token_id] for r in x], skip_special_tokens=True)
                        for x in (responses, references))
    per_pair = rouge(texts, ref_texts)
    return {f"eval/{k}": sum(r[k] for r in per_pair) / len(per_pair) for k in ("rouge1", "rouge2", "rougeL")}


def print_continuations(samples: list, temperature: float):
    """The closing samples: held-out prompts and their continuations."""
    table = Table(title=f"samples (temperature {temperature})", show_lines=True)
    table.add_column("prompt", max_width=60)
    table.add_column("continuation", max_width=80)
    for s in samples:
        table.add_row(s["prompt"], s["continuation"])
    Console().print(table)


def save_samples_and_model(run, model, lora, tokenizer, eval_data: torch.Tensor, args: Args):
    """The closing samples, continuations of the first num_samples held-out prompts (printed, and kept for
    samples.json), and the trained model (adapters merged under LoRA) with its tokenizer in the run folder's model/ and
    in --output_dir. Under ZeRO-3 every process gathers the weights; the main one samples and writes them."""
    accelerator = run.accelerator
    with full_weights(model, accelerator) as unwrapped:
        if accelerator.is_main_process:
            samples = sample(unwrapped, tokenizer, eval_data, args.query_length if args.task != "corpus" else 0, args,
                             accelerator.device)
            print_continuations(samples, args.temperature)
            run.samples.extend(samples)
            unwrapped = saved_lm(unwrapped, lora)  # adapters merged under LoRA
            save_model(unwrapped, tokenizer, run.dir / "model")
            if args.output_dir is not None:
                save_model(unwrapped, tokenizer, Path(args.output_dir))


def summarize(metrics_path: Path, wall_s: float) -> dict:
    """Headline figures of an SFT run: the held-out loss and perplexity first and last (ROUGE of TL;DR), tokens/s, wall
    time (every resumed part summed)."""
    metrics = [json.loads(line) for line in open(metrics_path)]
    evals = [m for m in metrics if "eval/loss" in m]
    summary = {"steps": metrics[-1]["step"], "eval/perplexity/first": evals[0]["eval/perplexity"],
               "eval/perplexity/last": evals[-1]["eval/perplexity"]}
    summary.update({k: v for k, v in evals[-1].items() if k.startswith(("eval/rouge", "eval/pass@1"))})
    summary["tokens_per_s"] = sum(m["throughput/tokens_per_s"] for m in metrics) / len(metrics)
    summary["wall_s"] = wall_s
    return summary


def print_closing_line(summary: dict, run_dir: Path, output_dir: Optional[str]) -> dict:
    """Prints the run's closing line (the held-out perplexity, ROUGE on TL;DR, where the model was saved) before the
    summary table; returns the summary unchanged."""
    rouge_scores = "".join(f", {k[5:]} {summary[k]:.3f}" for k in ("eval/rouge1", "eval/rouge2",
                                                                   "eval/rougeL", "eval/pass@1") if k in summary)
    print(f"held-out perplexity {summary['eval/perplexity/last']:.2f}{rouge_scores}; model saved to {run_dir / 'model'}"
          + (f" and {output_dir}" if output_dir else ""))
    return summary


if __name__ == "__main__":
    train(cli(Args, PRESETS, __doc__))

"""Our critic-free RL, DPO and reward training side by side with TRL 1.16 on the CPU: train_rloo.py --advantage rloo /
grpo against RLOOTrainer / GRPOTrainer (benchmark/trl_critic_free.py), train_dpo.py against DPOTrainer
(benchmark/trl_dpo.py), train_reward.py on pairwise labels against RewardTrainer (benchmark/trl_reward.py), and
train_rloo.py's arithmetic preset (GRPO against a verifier, docs/verifiable.md) against GRPOTrainer with the same
verifier as its reward function. TRL runs in
its own virtual environment; for each method and seed, ours runs first, then TRL, so that both see the same machine
state. Reports episodes (or pairs) per second of training (loading excluded), peak resident memory, and the end result:
the gold score (VADER) and the KL to the initial policy of each final policy on the same held-out queries (rloo, grpo,
dpo), the held-out pairwise accuracy (reward), pass@1 on held-out problems (verifiable).

    python3 -m venv benchmark/.trl116-venv && benchmark/.trl116-venv/bin/pip install -r
    benchmark/trl116-requirements.txt
    python benchmark/side_by_side_trl116.py --reward_model runs/<reward run>/reward_model --seeds 1 2 3
    python benchmark/side_by_side_trl116.py --reward_model ... --methods rloo --episodes 128 --seeds 1   # a smoke test
    python benchmark/side_by_side_trl116.py --methods verifiable --arithmetic_model runs/arithmetic/sft_model \
        --seeds 1 2 3

Same for ours and TRL:
  * rloo, grpo: the nano base model (policy and reference), our reward model (for TRL a GPT2ForSequenceClassification
    with the same head, scoring our exact query + response token ids), the same training prompts in the same order (our
    train_rloo.py --seed s draws them: the first episodes / k of query_batches(seed=s), batch_size / k per update; TRL
    gets their token ids), k samples each, 64 episodes per update, 2 minibatches of 32, 2 epochs, response 24 tokens
    always (no stop at EOS), query 32, temperature 0.7 in sampling and in every log-prob, the pad token never sampled,
    lr 5e-5 annealed linearly to 0, Adam epsilon 1e-5, no gradient clipping, beta 0.05, clip 0.2, fp32, no gradient
    checkpointing. rloo: the KL (sum over the response of log pi - log ref) in the reward, the leave-one-out baseline,
    the sequence-level clipped ratio, the mean over responses. grpo: (reward - group mean) / (group std + 1e-4), the
    token-level clipped loss plus beta x the k3 KL per token, averaged over each response then over responses
    (TRL: loss_type="grpo", use_bias_correction_kl=False).
  * dpo: our pairs (the first 2048 best-of-4 labels, each its best sample against each other one: 6,144 pairs) as token
    ids, in our order, 64 pairs per step (2 x 32), one pass, beta 0.1, sigmoid loss, AdamW lr 1e-4 cosine to 0 without
    warm-up, epsilon 1e-5, weight decay 0.01, no gradient clipping, the reference's log-probs computed on the fly.
  * reward: the same pairwise label file, written here from the best-of-4 labels (train_reward.py has no pairwise mode
  of
    its own but reads pairwise {"query", "chosen", "rejected"} labels with -log sigmoid(r_chosen - r_rejected)): the
    first 2048 labels' 6,144 pairs for training, in our order, 16 per step, lr 1e-3 annealed linearly, Adam epsilon
    1e-5, no clipping; the last 512 labels' 1,536 pairs held out, accuracy computed the same way.
  * verifiable: train_sft.py arithmetic's model (policy and reference), the reward 1 for a right answer and 0
    otherwise from our own check_answers (TRL's reward function calls it on the problem's query ids and the completion
    ids), the same training problems in the same order as token ids (the first episodes / k of query_batches(seed=s)
    over data/arithmetic/train), and train_rloo.py's arithmetic preset for both: k 8, 256 episodes per update (32
    problems) as 4 minibatches of 64, 1 epoch, 16,384 episodes (64 updates), query 6 tokens, response at most 32
    tokens, stopped at EOS (the tokens after it masked), temperature 0.7, lr 2e-4 annealed linearly to 0, Adam epsilon
    1e-5, no clipping of gradients (both clip with --max_grad_norm), beta 0.01 with the k3 KL per token in the loss,
    clip 0.2, the GRPO advantage and loss as for grpo above, fp32, the pad token impossible in sampling and in every
    log-prob (TRL: a -1e9 bias on its logit, benchmark/trl_critic_free.py's forbid_token). Each final policy's pass@1:
    8 answers to each of the 512 validation problems at temperature 0.7 (the same draws for every policy), the share
    right; the initial model's too, once.

What differs (TRL 1.16 cannot be set to ours):
  * rloo, grpo: TRL computes every training log-prob (old, new, reference) without position ids, so a left-padded
    prompt's tokens sit at positions shifted by its padding, while the samples were drawn (by transformers' generate)
    with the right positions: for the nano model's learned absolute positions the training log-probs differ from the
    sampling ones (about 0.17 nats per token, 1.2 per response on these prompts), which changes the gradient and the KL
    TRL penalizes; the final policies are measured here with the right positions. TRL splits each batch into its 2
    minibatches once and reuses that split in the second epoch (ours reshuffles). TRL anneals the lr at every optimizer
    step (ours once per update of 4 steps). TRL's optimizer is torch's AdamW without weight decay (ours: TF1-style Adam,
    epsilon added to the uncorrected sqrt(v)). TRL recomputes the old log-probs with a forward pass after sampling (ours
    keeps the sampler's). TRL's stop at EOS is turned off by making the never-sampled pad token its only stop token.
  * verifiable: the same as for grpo, except that both stop at EOS; 149 of the 8,000 training problems are shorter
    than 6 tokens and left-padded, and only those meet TRL's missing position ids. Ours evaluates pass@1 every 8
    updates while it trains (excluded from its training time, as TRL's trainer has no evaluation here).
  * dpo: TRL's DPO log-probs are at temperature 1 (DPOConfig has no temperature; ours divides the logits by 0.7). The
    Trainer exempts biases and LayerNorm weights from weight decay (ours decays every weight). TRL's DPO normally
    appends EOS to each response; here it gets our ids, without.
  * reward: TRL's model is GPT2ForSequenceClassification, a bias-free score head initialised N(0, 0.02), trained with
    torch's AdamW (no weight decay); ours is the backbone with a Linear(d, 1) head initialised N(0, 1 / sqrt(d + 1))
    plus
    a trained gain and bias, TF1-style Adam, and the rewards normalized (mean 0, std 1 on 256 base-policy samples)
    before and after training, outside the timed loop (normalization leaves the accuracy unchanged).
  * throughput: ours counts training time from its metrics (train_rloo.py: timing/generation_s + scoring_s + update_s;
    train_dpo.py: timing/update_s); train_reward.py logs no timing, so ours is timed here around its epoch loop, minus
    the held-out evaluation inside it; TRL's is the wall time of trainer.train().
"""

import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_policy as tp  # noqa: E402
import train_rloo  # noqa: E402
from pass_at_k import Args as PassAtK, right_answers  # noqa: E402
from side_by_side import run  # noqa: E402  (a child's peak memory, read from /proc)

METHODS = ("rloo", "grpo", "dpo", "reward", "verifiable")
ARITHMETIC = train_rloo.PRESETS["arithmetic"]  # both sides' settings for verifiable


@dataclass
class Args:
    reward_model: Optional[str] = None
    """our reward model folder (train_reward.py's reward_model/): the reward of rloo and grpo"""
    arithmetic_model: Optional[str] = None
    """verifiable: train_sft.py arithmetic's model (its run's sft_model/), the initial policy and reference of both"""
    methods: List[Literal["rloo", "grpo", "dpo", "reward", "verifiable"]] = field(
        default_factory=lambda: ["rloo", "grpo", "dpo", "reward"])
    """train_rloo.py --advantage rloo / grpo against RLOOTrainer / GRPOTrainer, train_dpo.py against DPOTrainer,
    train_reward.py on pairwise labels against RewardTrainer, train_rloo.py arithmetic against GRPOTrainer with our
    verifier (verifiable)"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """one round per seed and method: ours, then TRL, both with this seed"""
    episodes: int = 2560
    """rloo and grpo: episodes per run (train_rloo.py's default), k per prompt, a multiple of 64"""
    verifiable_episodes: int = 16384
    """verifiable: episodes per run (train_rloo.py arithmetic's 16,384), a multiple of its 256 per update"""
    max_grad_norm: float = 0.0
    """verifiable: both sides clip the gradient's global norm at this value (TRL's own default is 1.0; ours is no
    clipping); 0, neither clips"""
    k: int = 4
    """rloo and grpo: samples per prompt (TRL: num_generations)"""
    labels: int = 2048
    """dpo and reward: training labels, the first ones of data/labels/sentiment_offline_5k.json (ours' default); each
    best-of-4 label gives 3 pairs (its best sample against each other one), so 3 x labels must be a multiple of 16"""
    test_labels: int = 512
    """reward: held-out labels, the last ones of the file (train_reward.py's default), 3 held-out pairs each"""
    heldout: int = 256
    """held-out queries (the ones after the rloo prompts in the seed's query order) on which every final policy's gold
    score and KL to the initial policy are measured: one sample each at temperature 0.7"""
    trl_python: str = "benchmark/.trl116-venv/bin/python"
    """python of the virtual environment with trl 1.16.0 (benchmark/trl116-requirements.txt)"""
    out: str = "runs/side_by_side_trl116"
    """folder for the runs, result.json and result.md"""
    previous: List[str] = field(default_factory=list)
    """result.json files of earlier runs of this script with other seeds and the same settings: their rounds join this
    run's in the summary (the seeds, run one call at a time, as one table; a figure a round lacks is left out of its
    mean)"""


def run_dir_of(root: Path) -> Path:
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return run_dir


def metrics_of(run_dir: Path) -> list:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


@torch.no_grad()
def gold_and_kl(policy_dir: str, queries: torch.Tensor, reference) -> dict:
    """Gold score (VADER) of one sample per held-out query at temperature 0.7 (the draws of side_by_side.py's `gold`),
    and the KL of the policy to the initial one on those samples: sum over the response of log pi - log ref, both at
    temperature 0.7, averaged over the queries (train_rloo.py's objective/kl)."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    pad = tokenizer.pad_token_id
    torch.manual_seed(12345)
    responses, logprobs, _, _ = tp.Sampler(model, pad, 0.7)(queries, 24)
    query_responses = torch.cat([queries, responses], 1)
    ref_logprobs = tp.response_logprobs(tp.response_logits(reference, query_responses, pad, 24), responses, 0.7, pad)[0]
    gold = statistics.mean(tp.gold_scorer("vader")(tokenizer.batch_decode(responses), None))
    return {"gold": gold, "kl": (logprobs - ref_logprobs).sum(1).mean().item()}


def pass_at_1(policy_dir: str, problems: list, n: int = 8) -> float:
    """The share of n answers per held-out problem (data/arithmetic/validation) that the verifier finds right, sampled
    at the arithmetic preset's temperature, the same draws for every policy (benchmark/pass_at_k.py's)."""
    return sum(right_answers(policy_dir, problems, PassAtK(n=n, batch_size=512))) / (n * len(problems))


def pairs_json(pairs: tuple, order=None) -> dict:
    """(queries, chosen, rejected) token tensors, optionally reordered, as the JSON the TRL scripts read."""
    queries, chosen, rejected = pairs if order is None else (t[order] for t in pairs)
    return {"query": queries.tolist(), "chosen": chosen.tolist(), "rejected": rejected.tolist()}


def label_pairs(script: str, num_train: int, num_test: int, tokenizer) -> tuple:
    """(train pairs, held-out pairs), each (queries, chosen, rejected): train_dpo.py's pairs (preference_pairs: each
    best-of-4 label's best sample against each other one) of the first num_train and the last num_test labels of the
    default label file, read by `script`'s (train_dpo or train_reward) own load_labels."""
    import importlib

    import train_dpo

    module = importlib.import_module(script)
    train, test, _, _ = module.load_labels(module.Args(num_train=num_train, num_test=num_test), tokenizer)
    return train_dpo.preference_pairs(*train), train_dpo.preference_pairs(*test)


def timed_train_reward():
    """The child that runs our train_reward.py, unchanged, with the flags in sys.argv, timing its epoch loop (the tqdm
    over the updates) minus the held-out evaluations inside it; writes <run folder>/timing.json. Started by main() as
    python -c "...; timed_train_reward()" <train_reward.py flags>."""
    import train_reward

    clock = {"loop_s": 0.0, "eval_s": 0.0, "in_loop": False}
    make_bar, accuracy = train_reward.tqdm, train_reward.accuracy

    class TimedBar:
        def __init__(self, *args, **kwargs):
            self.bar = make_bar(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.bar, name)

        def __iter__(self):
            clock["in_loop"], start = True, time.perf_counter()
            yield from self.bar
            clock["loop_s"] += time.perf_counter() - start
            clock["in_loop"] = False

    def timed_accuracy(*args, **kwargs):
        start = time.perf_counter()
        result = accuracy(*args, **kwargs)
        if clock["in_loop"]:
            clock["eval_s"] += time.perf_counter() - start
        return result

    train_reward.tqdm, train_reward.accuracy = TimedBar, timed_accuracy
    sys.argv = ["train_reward.py", *sys.argv[1:]]
    run_dir = train_reward.train(train_reward.cli(train_reward.Args, train_reward.PRESETS, train_reward.__doc__))
    (Path(run_dir) / "timing.json").write_text(json.dumps({"train_s": clock["loop_s"] - clock["eval_s"], **clock}))


def round_of(method: str, r: int, seed: int, a: Args, out: Path, heldout: torch.Tensor, reference,
             shared: dict) -> list:
    """Ours, then TRL, for one method and seed: two result rows."""
    ours_dir, trl_dir = out / f"{method}_ours_{r}", out / f"{method}_trl_{r}"
    for d in (ours_dir, trl_dir):  # this script's own outputs of an earlier measurement
        shutil.rmtree(d, ignore_errors=True)
    rows = [{"method": method, "system": s, "round": r, "seed": seed} for s in ("ours", "trl")]
    if method in ("rloo", "grpo"):
        reward_model = str(Path(a.reward_model).resolve())
        queries_file = out / f"queries_{seed}.json"
        res = run([sys.executable, "train_rloo.py", "--advantage", method, "--reward_model", reward_model,
                   "--total_episodes", str(a.episodes), "--k", str(a.k), "--seed", str(seed), "--run_root",
                   str(ours_dir), "--save_every", "0", "--print_sample_every", "100000"],
                   out / f"{method}_ours_{r}.log")
        run_dir = run_dir_of(ours_dir)
        m = metrics_of(run_dir)
        train_s = sum(x["timing/generation_s"] + x["timing/scoring_s"] + x["timing/update_s"] for x in m)
        rows[0].update(unit="episodes/s", throughput=a.episodes / train_s, train_s=train_s, **res,
                       **gold_and_kl(str(run_dir / "policy"), heldout, reference))
        res = run([a.trl_python, "benchmark/trl_critic_free.py", "--trainer", method, "--reward_model", reward_model,
                   "--queries", str(queries_file), "--output_dir", str(trl_dir), "--total_episodes", str(a.episodes),
                   "--k", str(a.k), "--seed", str(seed)], out / f"{method}_trl_{r}.log")
        trl = json.loads((trl_dir / "result.json").read_text())
        rows[1].update(unit="episodes/s", throughput=trl["episodes_per_s"], train_s=trl["train_s"], **res,
                       **gold_and_kl(str(trl_dir / "policy"), heldout, reference))
    elif method == "dpo":
        res = run([sys.executable, "train_dpo.py", "--num_train", str(a.labels), "--seed", str(seed), "--run_root",
                   str(ours_dir), "--save_every", "0", "--eval_every", "100000"], out / f"dpo_ours_{r}.log")
        run_dir = run_dir_of(ours_dir)
        m = [x for x in metrics_of(run_dir) if "timing/update_s" in x]
        train_s = sum(x["timing/update_s"] for x in m)
        rows[0].update(unit="pairs/s", throughput=m[-1]["pairs"] / train_s, train_s=train_s, **res,
                       **gold_and_kl(str(run_dir / "policy"), heldout, reference))
        pairs = shared["dpo_pairs"]
        order = torch.randperm(len(pairs[0]), generator=torch.Generator().manual_seed(seed))  # train_dpo.py's order
        pairs_file = out / f"dpo_pairs_{seed}.json"
        pairs_file.write_text(json.dumps(pairs_json(pairs, order)))
        res = run([a.trl_python, "benchmark/trl_dpo.py", "--pairs", str(pairs_file), "--output_dir", str(trl_dir),
                   "--seed", str(seed)], out / f"dpo_trl_{r}.log")
        trl = json.loads((trl_dir / "result.json").read_text())
        rows[1].update(unit="pairs/s", throughput=trl["pairs_per_s"], train_s=trl["train_s"], **res,
                       **gold_and_kl(str(trl_dir / "policy"), heldout, reference))
    elif method == "verifiable":
        n = a.verifiable_episodes
        model = str(Path(a.arithmetic_model).resolve())
        clip = ["--max_grad_norm", str(a.max_grad_norm)] if a.max_grad_norm > 0 else []  # ours: inf is none
        res = run([sys.executable, "train_rloo.py", "arithmetic", "--base_model", model, "--total_episodes", str(n),
                   "--seed", str(seed), "--run_root", str(ours_dir), "--save_every", "0", *clip],
                  out / f"verifiable_ours_{r}.log")
        run_dir = run_dir_of(ours_dir)
        m = [x for x in metrics_of(run_dir) if "timing/generation_s" in x]
        train_s = sum(x["timing/generation_s"] + x["timing/scoring_s"] + x["timing/update_s"] for x in m)
        rows[0].update(unit="episodes/s", throughput=n / train_s, train_s=train_s, **res,
                       pass_at_1=pass_at_1(str(run_dir / "policy"), shared["problems"]))
        settings = [x for key in ("batch_size", "k", "nminibatches", "noptepochs", "response_length", "temperature",
                                  "lr", "beta") for x in (f"--{key}", str(ARITHMETIC[key]))]
        res = run([a.trl_python, "benchmark/trl_critic_free.py", "--trainer", "grpo", "--verifier",
                   ARITHMETIC["verifier"], "--base_model", model, "--queries", str(out / f"problems_{seed}.json"),
                   "--output_dir", str(trl_dir), "--total_episodes", str(n), "--seed", str(seed),
                   "--max_grad_norm", str(a.max_grad_norm), *settings], out / f"verifiable_trl_{r}.log")
        trl = json.loads((trl_dir / "result.json").read_text())
        rows[1].update(unit="episodes/s", throughput=trl["episodes_per_s"], train_s=trl["train_s"], **res,
                       pass_at_1=pass_at_1(str(trl_dir / "policy"), shared["problems"]))
    else:
        train_pairs, test_pairs = shared["reward_pairs"]
        n_train, n_test = len(train_pairs[0]), len(test_pairs[0])
        code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'benchmark')!r}]; "
                "import side_by_side_trl116 as s; s.timed_train_reward()")
        res = run([sys.executable, "-c", code, "--label_dataset", str(shared["reward_labels"]), "--num_train",
                   str(n_train), "--num_test", str(n_test), "--seed", str(seed), "--run_root", str(ours_dir),
                   "--save_every", "0", "--eval_every", "100000"], out / f"reward_ours_{r}.log")
        run_dir = run_dir_of(ours_dir)
        train_s = json.loads((run_dir / "timing.json").read_text())["train_s"]
        accuracy = [x for x in metrics_of(run_dir) if "test/accuracy" in x][-1]["test/accuracy"]
        rows[0].update(unit="pairs/s", throughput=(n_train // 16 * 16) / train_s, train_s=train_s, **res,
                       accuracy=accuracy)
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))  # train_reward.py's order
        pairs_file = out / f"reward_pairs_{seed}.json"
        pairs_file.write_text(json.dumps({"train": pairs_json(train_pairs, order), "test": pairs_json(test_pairs)}))
        res = run([a.trl_python, "benchmark/trl_reward.py", "--pairs", str(pairs_file), "--output_dir", str(trl_dir),
                   "--seed", str(seed)], out / f"reward_trl_{r}.log")
        trl = json.loads((trl_dir / "result.json").read_text())
        rows[1].update(unit="pairs/s", throughput=trl["pairs_per_s"], train_s=trl["train_s"], **res,
                       accuracy=trl["test_accuracy"])
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def table(summary: dict) -> str:
    lines = ["| method | system | throughput | peak RSS (GB) | gold | KL | held-out accuracy | pass@1 | ours / TRL "
             "throughput |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda s, k, f: (f.format(s[k]) + (f" ± {s[k + '_std']:.3f}" if s.get(k + "_std") else "")) if k in s else ""
    for method, systems in summary.items():
        for system in ("ours", "trl"):
            s = systems[system]
            ratio = f"{systems['ratio_ours_over_trl']['throughput']:.2f}x" if system == "ours" else ""
            lines.append(f"| {method} | {'TRL 1.16' if system == 'trl' else 'ours'} | {fmt(s, 'throughput', '{:.2f}')} "
                         f"{s['unit']} | "
                         f"{s['peak_rss_gb']:.2f} | {fmt(s, 'gold', '{:+.3f}')} | {fmt(s, 'kl', '{:.2f}')} | "
                         f"{fmt(s, 'accuracy', '{:.3f}')} | {fmt(s, 'pass_at_1', '{:.3f}')} | {ratio} |")
    return "\n".join(lines)


def main(a: Args):
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.episodes % 64 or 64 % a.k:
        sys.exit(f"error: --episodes {a.episodes} must be a multiple of the batch of 64, and 64 of --k {a.k}")
    if {"rloo", "grpo"} & set(a.methods) and a.reward_model is None:
        sys.exit("error: rloo and grpo need --reward_model")
    if "verifiable" in a.methods and (a.arithmetic_model is None or a.verifiable_episodes % ARITHMETIC["batch_size"]):
        sys.exit(f"error: verifiable needs --arithmetic_model and --verifiable_episodes a multiple of "
                 f"{ARITHMETIC['batch_size']}")
    if (3 * a.labels) % 16 or 3 * a.labels < 64:
        sys.exit(f"error: --labels {a.labels} give {3 * a.labels} pairs: at least 64 and a multiple of 16 needed")
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "nano")
    sentiment = bool({"rloo", "grpo", "dpo"} & set(a.methods))  # their prompts and the policies' gold and KL
    reference = AutoModelForCausalLM.from_pretrained(ROOT / "data" / "nano").eval() if sentiment else None
    texts = tp.load_texts(str(ROOT / "data" / "corpus.jsonl.gz"), "train") if sentiment else None
    shared = {}
    if "verifiable" in a.methods:
        shared["problems"] = tp.load_texts(str(ROOT / ARITHMETIC["eval_dataset"]), "validation")
        shared["train_problems"] = tp.load_texts(str(ROOT / ARITHMETIC["query_dataset"]), "train")
        shared["initial_pass_at_1"] = pass_at_1(a.arithmetic_model, shared["problems"])
        print(f"initial pass@1 of {a.arithmetic_model}: {shared['initial_pass_at_1']:.3f}", flush=True)
    if "dpo" in a.methods:
        shared["dpo_pairs"] = label_pairs("train_dpo", a.labels, a.test_labels, tokenizer)[0]
    if "reward" in a.methods:
        # the pairwise label file: the training labels' pairs, then the held-out labels' pairs (train_reward.py takes
        # --num_train from the start and --num_test from the end), with a copy of the labels' meta.json (tokenizer, pad)
        shared["reward_pairs"] = pairs = label_pairs("train_reward", a.labels, a.test_labels, tokenizer)
        shared["reward_labels"] = labels = out / "pairwise_labels.json"
        rows = [dict(zip(("query", "chosen", "rejected"), x)) for p in pairs for x in zip(*(t.tolist() for t in p))]
        labels.write_text(json.dumps(rows))
        shutil.copy(ROOT / "data" / "labels" / "sentiment_offline_5k.meta.json", labels.with_suffix(".meta.json"))
    results = [row for path in a.previous for row in json.loads(Path(path).read_text())["runs"]]
    if {row["seed"] for row in results} & set(a.seeds):
        sys.exit(f"error: --previous already holds a round of one of the --seeds {a.seeds}")
    for r, seed in enumerate(a.seeds, start=len({row["seed"] for row in results})):  # rounds go on from --previous
        # our train_rloo.py --seed s trains on the first episodes / k queries of this order (batch_size / k per update);
        # TRL gets exactly these; the next `heldout` ones measure every final policy of this seed
        heldout = None
        if sentiment:
            prompts = a.episodes // a.k
            queries = next(tp.query_batches(texts, tokenizer, 32, 24, prompts + a.heldout, seed=seed))[0]
            (out / f"queries_{seed}.json").write_text(json.dumps(queries[:prompts].tolist()))
            heldout = queries[prompts:]
        if "verifiable" in a.methods:  # ours trains on the first episodes / k problems of this order; TRL gets them
            problems = next(tp.query_batches(shared["train_problems"], tokenizer, ARITHMETIC["query_length"],
                                             ARITHMETIC["response_length"], a.verifiable_episodes // ARITHMETIC["k"],
                                             seed))[0]
            (out / f"problems_{seed}.json").write_text(json.dumps(problems.tolist()))
        for method in a.methods:
            results += round_of(method, r, seed, a, out, heldout, reference, shared)
    summary = {}
    for method in a.methods:
        summary[method] = {}
        for system in ("ours", "trl"):
            rows = [x for x in results if x["method"] == method and x["system"] == system]
            values = {k: [x[k] for x in rows if k in x] for k in ("throughput", "peak_rss_gb", "gold", "kl",
                                                                  "accuracy", "pass_at_1")}
            # a figure a round lacks is left out of its mean
            s = {k: statistics.mean(v) for k, v in values.items() if v}
            s.update({f"{k}_std": statistics.stdev(v) for k, v in values.items() if len(v) > 1 and k != "peak_rss_gb"})
            summary[method][system] = {**s, "unit": rows[0]["unit"]}
        ours, trl = summary[method]["ours"], summary[method]["trl"]
        summary[method]["ratio_ours_over_trl"] = {k: ours[k] / trl[k] for k in ("throughput", "peak_rss_gb")}
    initial = {"initial_pass_at_1": shared["initial_pass_at_1"]} if "initial_pass_at_1" in shared else {}
    (out / "result.json").write_text(json.dumps({"runs": results, "summary": summary, **initial}, indent=2))
    md = table(summary) + (f"\n\npass@1 of the initial model: {initial['initial_pass_at_1']:.3f}" if initial else "")
    (out / "result.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__, use_underscores=True))

"""Compare summarization policies (base, SFT, PPO, ...) on the same held-out TL;DR posts: ROUGE-1/2/L against the
reference summaries, the reward model's win rate against the reference and its mean score, the gold judge's score and
its parts (where one exists: the twin's) and the summaries' length; a table and a PNG.

    python benchmark/evaluate.py --policy base=data/nano sft=runs/tldr_twin/sft_model \\
        ppo=runs/tldr_twin__1__<time>/policy/policy --reward_model runs/tldr_twin__1__<time>/reward/reward_model \\
        --eval_dataset data/tldr/validation.jsonl.gz --out benchmark/tldr_twin_eval.png

Every policy summarizes the same --num_eval posts (the first ones of the shuffle with seed 0, as train_policy.py's
evaluation takes them) at --temperature (SFD: 0.01), each summary cut after its first EOS, with the same sampling seed.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import List, Literal, Optional

import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_policy as tp  # noqa: E402

METRICS = ["eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/win_rate", "eval/score", "eval/gold_score",
           "eval/faithful", "eval/coverage", "eval/repeated", "eval/words"]


@dataclass
class Args:
    policy: List[str] = field(default_factory=list)
    """NAME=MODEL ...: the policies to evaluate (model folders, hub ids or .gguf files), space-separated, in the order
    of the table"""
    reward_model: Optional[str] = None
    """reward model folder (train_reward.py's reward_model/) for the win rate and score; None leaves them out"""
    eval_dataset: str = "data/tldr/validation.jsonl.gz"
    """held-out TL;DR posts with reference summaries (.jsonl(.gz) or a hub dataset)"""
    eval_split: str = "validation"
    """split of a hub eval_dataset"""
    num_eval: int = 256
    """posts summarized by every policy"""
    query_length: int = 160
    """query tokens (SFD: 512)"""
    response_length: int = 48
    """summary tokens sampled (SFD: 53)"""
    temperature: float = 0.01
    """sampling temperature (SFD's evaluation: 0.01)"""
    gold_labeler: Literal["tldr_judge", "none"] = "tldr_judge"
    """the twin's judge, or none for real data"""
    seed: int = 1
    """sampling seed, the same for every policy"""
    out: str = "benchmark/tldr_eval.png"
    """the PNG; the table also goes to <out>.json"""


def evaluate_policy(model_path: str, reward_model, a: Args, gold_fn) -> tuple:
    """(metrics, summaries) of one policy on the held-out posts."""
    lm, tokenizer = tp.prepare_lm(*tp.load_base_model(model_path))
    lm.eval()
    texts = tp.load_texts(a.eval_dataset, a.eval_split, "--eval_dataset")
    queries, references = next(tp.query_batches(texts, tokenizer, a.query_length, a.response_length,
                                                min(a.num_eval, len(texts)), seed=0))
    one_process = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"), reduce=lambda t,
                                  reduction: t)
    run = SimpleNamespace(truncate_token="eos", truncate_after=0)
    torch.manual_seed(a.seed)
    scorer = reward_model if reward_model is not None else (lambda tokens, pad: torch.zeros(len(tokens)))
    metrics, summaries = tp.evaluate(tp.Sampler(lm, tokenizer.pad_token_id, a.temperature), scorer, queries,
                                     references, tokenizer, run, gold_fn, one_process)
    if reward_model is None:
        for k in ("eval/win_rate", "eval/score", "eval/reference_score"):
            metrics.pop(k)
    metrics["eval/words"] = sum(len(s.split()) for s in summaries) / len(summaries)
    if gold_fn is tp.tldr_judge:  # the judge's parts, to see what moved its score
        posts = [tp.query_post(q) for q in tokenizer.batch_decode([q[q != tokenizer.pad_token_id] for q in queries])]
        parts = [tp.judge_summary(p, s) for p, s in zip(posts, summaries)]
        metrics.update({f"eval/{k}": sum(x[k] for x in parts) / len(parts) for k in ("faithful", "coverage",
                                                                                     "repeated")})
    return metrics, summaries


def plot(rows: dict, out: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in METRICS if all(m in r for r in rows.values())]
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 3.2))
    for ax, metric in zip(axes, names):
        ax.bar(list(rows), [r[metric] for r in rows.values()], color=[f"C{i}" for i in range(len(rows))])
        ax.set_title(metric.removeprefix("eval/"), fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(a: Args):
    if not a.policy:
        tp.fail("--policy NAME=MODEL is required (at least one)")
    reward_model = None
    if a.reward_model is not None:
        reward_model = tp.load_reward_model(a.reward_model)[0].eval()
    gold_fn = tp.gold_scorer(a.gold_labeler if a.gold_labeler == "tldr_judge" else "none")
    rows, samples = {}, {}
    for spec in a.policy:
        name, _, path = spec.partition("=")
        rows[name], samples[name] = evaluate_policy(path, reward_model, a, gold_fn)
        print(f"{name}: " + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in rows[name].items()), flush=True)
    columns = [m for m in METRICS if all(m in r for r in rows.values())]
    print(f"\n{a.num_eval} held-out posts of {a.eval_dataset}, temperature {a.temperature}")
    print("| policy | " + " | ".join(c.removeprefix("eval/") for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in columns) + " |")
    plot(rows, a.out)
    Path(a.out).with_suffix(".json").write_text(json.dumps({"args": vars(a), "metrics": rows,
                                                            "samples": {k: v[:5] for k, v in samples.items()}},
                                                            indent=2))
    print(f"plot: {a.out}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__, use_underscores=True))

"""pass@k of policies on a verifiable task: n answers per held-out problem sampled at the task's temperature, each
checked by the verifier, and for every k = 1, 2, 4, ..., n the unbiased estimate of the chance that at least one of k
answers is right, 1 - C(n - c, k) / C(n, k) for a problem with c right answers of n (Chen et al. 2021, "Evaluating
Large Language Models Trained on Code", eq. 1), averaged over the problems. RL that only sharpens the policy raises
pass@1 and leaves pass@k at large k where it was, or lowers it (Yue et al. 2025, arXiv 2504.13837).

    python benchmark/pass_at_k.py runs/arithmetic/sft_model runs/grpo_arithmetic__1__<time>/policy \
        --out runs/benchmark/pass_at_k.json --plot docs/images/pass_at_k.png
    python benchmark/pass_at_k.py --replot runs/benchmark/verifiable__<commit>/seed*/pass_at_k.json \
        --plot docs/images/pass_at_k.png                 # the saved tables of benchmark/verifiable.sh, drawn
"""

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import tyro
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_policy as tp  # noqa: E402


@dataclass
class Args:
    models: tyro.conf.Positional[List[str]] = field(default_factory=list)
    """policy folders (an SFT model, a trained policy) to measure, each under its folder's name in the table"""
    labels: Optional[List[str]] = None
    """names of the models in the table and the plot (default: their folders)"""
    problems: str = "data/arithmetic/test.jsonl.gz"
    """held-out problems (rows with a "problem")"""
    num_problems: int = 128
    """the first this many problems"""
    n: int = 64
    """answers sampled per problem; pass@k for k = 1, 2, 4, ... up to n"""
    verifier: str = "arithmetic"
    """the program that checks each answer (train_policy.VERIFIERS)"""
    query_length: int = 6
    """problem tokens, left-padded (the arithmetic presets' 6)"""
    response_length: int = 32
    """answer tokens sampled (the arithmetic presets' 32); an answer without EOS by then is cut off, and wrong"""
    temperature: float = 0.7
    """sampling temperature (the presets')"""
    batch_size: int = 256
    """answers sampled at once"""
    seed: int = 0
    """the same draws for every model"""
    out: Optional[str] = None
    """write the table as JSON here"""
    plot: Optional[str] = None
    """draw pass@k against k (log scale) here"""
    replot: List[str] = field(default_factory=list)
    """instead of sampling, draw --plot from these saved --out files (several seeds: their mean, each seed faintly)"""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c right answers among n samples: 1 - C(n - c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def right_answers(model_dir: str, problems: list, args: Args) -> list:
    """How many of n answers, sampled by the model in model_dir, to each problem the verifier finds right."""
    lm, tokenizer = tp.prepare_lm(*tp.load_base_model(model_dir))
    lm.eval()
    sampler, pad = tp.Sampler(lm, tokenizer.pad_token_id, args.temperature), tokenizer.pad_token_id
    queries = torch.tensor([tp.format_problem_query(p["problem"], tokenizer, args.query_length) for p in problems])
    torch.manual_seed(args.seed)
    rows = queries.repeat_interleave(args.n, 0)  # (P n, Q)
    correct = []
    for batch in rows.split(args.batch_size):
        responses = tp.truncate_responses(sampler(batch, args.response_length)[0], tokenizer.eos_token_id, 0, pad)
        correct.append(tp.check_answers(args.verifier, batch, responses, tokenizer)["correct"])
    return torch.cat(correct).view(-1, args.n).sum(1).long().tolist()


def draw(runs: list, path: str, title: str):
    """pass@k against k (log scale): per model the mean over runs (dicts label -> {pass@k}), each run faintly."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for color, label in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], runs[0]):
        ks = sorted(int(key[5:]) for key in runs[0][label] if key.startswith("pass@"))
        curves = [[run[label][f"pass@{k}"] for k in ks] for run in runs]
        ax.plot(ks, [sum(c) / len(c) for c in zip(*curves)], marker="o", color=color, label=label)
        if len(curves) > 1:
            for curve in curves:
                ax.plot(ks, curve, color=color, alpha=0.25, linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (answers sampled per problem)")
    ax.set_ylabel("pass@k")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args: Args):
    if args.replot:
        saved = [json.load(open(path)) for path in args.replot]
        first = saved[0]["args"]
        draw([s["results"] for s in saved], args.plot, f"{first['verifier']}: pass@k, {first['num_problems']} test "
             f"problems, T = {first['temperature']}, {len(saved)} seed(s)")
        return None
    problems = tp.load_texts(args.problems, "test", "--problems")[: args.num_problems]
    ks = [2**i for i in range(int(math.log2(args.n)) + 1)]
    labels = args.labels or [Path(m).name for m in args.models]
    results = {}
    for label, model in zip(labels, args.models):
        t0 = time.time()
        counts = right_answers(model, problems, args)
        results[label] = {"model": model, "seconds": time.time() - t0,
                          **{f"pass@{k}": sum(pass_at_k(args.n, c, k) for c in counts) / len(counts) for k in ks}}
    table = Table(title=f"pass@k on {len(problems)} problems of {args.problems}, n = {args.n}, T = {args.temperature}")
    for column in ["model", *[f"pass@{k}" for k in ks]]:
        table.add_column(column)
    for label, r in results.items():
        table.add_row(label, *[f"{r[f'pass@{k}']:.3f}" for k in ks])
    Console().print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        json.dump({"args": vars(args), "results": results}, open(args.out, "w"), indent=1)
    if args.plot:
        draw([results], args.plot, f"{args.verifier}: pass@k, {len(problems)} test problems, T = {args.temperature}")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))

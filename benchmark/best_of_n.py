"""Best-of-n with a learned reward: for each query, n samples of the initial policy at the task's temperature, and the
one the reward model scores highest kept. The kept sample's distribution is KL(best-of-n || policy) = log n - (n-1)/n
away from the policy (Stiennon et al. 2020, appendix G.3; Gao, Schulman & Hilton 2022, section 2.2), so best-of-n
traces the proxy (learned reward) and gold (the labeler behind the embedded labels: VADER, or the summarization twin's
judge) scores against the distance d = sqrt(KL) from the initial policy without any training: the first curve of Gao et
al.'s over-optimization picture, with their best-of-n form R(d) = d (alpha - beta d) fitted to it.

    python benchmark/best_of_n.py --reward_model runs/both__1__<time>/reward/reward_model     # the embedded world
    python benchmark/best_of_n.py --reward_model runs/tldr_twin__1__<time>/reward/reward_model \
        --base_model runs/tldr_twin/sft_model --query_dataset data/tldr/validation.jsonl.gz --query_length 160 \
        --response_length 48 --truncate_token eos --gold_labeler tldr_judge --num_queries 256 --max_n 8   # the twin

Every n is estimated from the same --max_n samples per query: they are cut into max_n / n disjoint groups of n and the
best of each group is kept, an unbiased estimate of best-of-n that uses every sample (and, since a group of 2n is two
groups of n, one whose proxy never falls as n grows).
"""

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_policy as tp  # noqa: E402


@dataclass
class Args:
    reward_model: str
    """reward model folder (train_reward.py's reward_model/): the proxy that picks the best of n"""
    base_model: str = "data/nano"
    """the initial policy that samples (the reward model's base in train_both.py)"""
    query_dataset: str = "data/corpus.jsonl.gz"
    """queries, as train_policy.py's --query_dataset"""
    query_split: str = "train"
    """split of a hub query dataset"""
    query_length: int = 32
    """query tokens, as train_policy.py's"""
    response_length: int = 24
    """tokens sampled per response"""
    temperature: float = 0.7
    """sampling temperature (the task's)"""
    num_queries: int = 64
    """queries, each sampled max_n times"""
    max_n: int = 256
    """the largest n, a power of 2; n = 1, 2, 4, ..., max_n are all estimated from these samples"""
    batch_size: int = 256
    """samples drawn and scored per forward pass"""
    truncate_token: Optional[str] = None
    """as train_policy.py's: responses are cut after it before they are scored ("eos" for TL;DR: SFD's EOS trick)"""
    truncate_after: int = 0
    """as train_policy.py's: the truncate token counts from this response index on"""
    penalty_reward_value: float = -1.0
    """as train_policy.py's: the proxy score of a response without the truncate token"""
    gold_labeler: Literal["vader", "tldr_judge", "none"] = "vader"
    """the gold score of the kept samples: VADER (the embedded labels' labeler), the summarization twin's judge, or
    none"""
    seed: int = 1
    """sampling seed"""
    out: str = "benchmark/best_of_n.json"
    """the table, as JSON (with the arguments)"""


def bon_kl(n: int) -> float:
    """KL(best-of-n || policy) = log n - (n - 1) / n, for rewards without ties (Stiennon et al. 2020, appendix G.3)."""
    return math.log(n) - (n - 1) / n


def fit_gao(d: list, r: list, form: Literal["bon", "rl"]) -> tuple:
    """(alpha, beta) of Gao et al.'s functional forms by least squares, for scores r measured from the initial policy's
    (r(0) = 0) at distances d = sqrt(KL): best-of-n R(d) = d (alpha - beta d), RL R(d) = d (alpha - beta log d)
    (Gao, Schulman & Hilton 2022, eq. 1 and 2)."""
    d = torch.tensor(d, dtype=torch.float64)
    second = d * d if form == "bon" else d * torch.log(d.clamp(min=1e-12))
    features = torch.stack([d, -second], 1)  # (points, 2)
    alpha, beta = torch.linalg.lstsq(features, torch.tensor(r, dtype=torch.float64)[:, None]).solution[:, 0].tolist()
    return alpha, beta


def best_of_n(proxy: torch.Tensor, gold: torch.Tensor, n: int) -> tuple:
    """(mean proxy, mean gold) of the best-of-n samples: each query's (q, N) samples cut into N // n groups of n, the
    sample with the highest proxy kept from each group."""
    q, N = proxy.shape
    groups = (N // n, n)
    best = proxy[:, : N // n * n].reshape(q, *groups).argmax(-1, keepdim=True)  # (q, N // n, 1)
    pick = lambda x: x[:, : N // n * n].reshape(q, *groups).gather(-1, best).mean().item()
    return pick(proxy), pick(gold)


@torch.no_grad()
def sample_and_score(a: Args) -> tuple:
    """(proxy, gold), each (num_queries, max_n): the reward model's and the gold labeler's scores of max_n samples of
    every query."""
    lm, tokenizer = tp.prepare_lm(*tp.load_base_model(a.base_model))
    reward_model, _ = tp.load_reward_model(a.reward_model)
    lm.eval(), reward_model.eval()
    pad = tokenizer.pad_token_id
    texts = tp.load_texts(a.query_dataset, a.query_split)
    # (q, Q)
    queries = next(tp.query_batches(texts, tokenizer, a.query_length, a.response_length, a.num_queries, seed=0))[0]
    gold_fn = tp.gold_scorer(a.gold_labeler)
    sampler = tp.Sampler(lm, pad, a.temperature)
    torch.manual_seed(a.seed)
    repeated = queries.repeat_interleave(a.max_n, 0)  # (q * max_n, Q): query i's samples are rows i*max_n ...
    proxy, gold = [], []
    truncate_token = tp.truncate_token_id(a.truncate_token, tokenizer)
    for start in tqdm(range(0, len(repeated), a.batch_size), desc="best-of-n samples"):
        chunk = repeated[start : start + a.batch_size]
        responses = sampler(chunk, a.response_length)[0]  # (b, R)
        if truncate_token is not None:  # scored as PPO scores its rollouts: cut, and penalized without the token
            responses = tp.truncate_responses(responses, truncate_token, a.truncate_after, pad)
        scores = reward_model(torch.cat([chunk, responses], 1), pad)
        if truncate_token is not None:
            scores = tp.penalize(scores, responses, truncate_token, a.truncate_after, a.penalty_reward_value)
        proxy.append(scores)
        if gold_fn is not None:
            decoded = tokenizer.batch_decode([r[r != pad] for r in responses],
                                             skip_special_tokens=truncate_token is not None)
            gold.append(torch.tensor(gold_fn(decoded, tokenizer.batch_decode([q[q != pad] for q in chunk]))))
    proxy = torch.cat(proxy).view(a.num_queries, a.max_n)
    gold = torch.cat(gold).view(a.num_queries, a.max_n) if gold else torch.full_like(proxy, float("nan"))
    return proxy, gold


def main(a: Args) -> list:
    if a.max_n < 1 or a.max_n & (a.max_n - 1):
        tp.fail(f"--max_n {a.max_n} is not a power of 2")
    proxy, gold = sample_and_score(a)
    rows = []
    for k in range(int(math.log2(a.max_n)) + 1):
        n = 2**k
        p, g = best_of_n(proxy, gold, n)
        rows.append({"n": n, "kl": bon_kl(n), "d": math.sqrt(bon_kl(n)), "proxy": p, "gold": g})
    table = Table(title=f"best-of-n by {a.reward_model} ({a.num_queries} queries x {a.max_n} samples)")
    for column in ("n", "KL (nats)", "d = sqrt(KL)", "proxy", "gold"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["n"]), f"{r['kl']:.3f}", f"{r['d']:.3f}", f"{r['proxy']:+.3f}", f"{r['gold']:+.3f}")
    Console().print(table)
    # Gao et al.'s best-of-n form fitted to the gains over n = 1 (their R(d) starts at 0)
    fits = {}
    for name in ("proxy", "gold"):
        alpha, beta = fit_gao([r["d"] for r in rows], [r[name] - rows[0][name] for r in rows], "bon")
        fits[name] = {"alpha": alpha, "beta": beta}
        print(f"{name}: R(d) = d ({alpha:.3f} - {beta:.3f} d)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": asdict(a), "rows": rows, "fits": fits}, indent=2))
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))

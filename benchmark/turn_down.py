"""Does the gold score turn down while the proxy climbs? Gao, Schulman & Hilton (2022, section 3.3) found less
over-optimization with more reward-model data; this asks the embedded sentiment world the same question. Reward models
trained on 256, 512, 1,024 and 2,048 labels (train_reward.py --num_train) are each optimized by PPO without a KL
penalty (--kl_coef 0 --no_adaptive_kl) for 5,120 episodes, and the proxy (that reward model) and gold (VADER) scores of
the samples are followed against the distance from the initial policy, d = sqrt(KL).

    bash benchmark/overoptimization.sh                      # runs them (PARTS=labels for this part only), then this
    python benchmark/turn_down.py --root runs/overoptimization --out docs/images/turn_down.png

Points are every 4 updates averaged (256 samples). Gold is measured from the initial policy's (best-of-1 of
bon_<seed>.json, 64 x 256 samples); the proxy as the reward model gives it, which its normalization sets to mean 0 on
the initial policy's samples (train_reward.py --normalize_after). Per run: the peak gold (the best point), the gold at
the end, and their difference (the turn-down; a point's standard error is about 0.02, so a drop past 0.05 is counted as
one), the proxy's gain from the peak-gold point to the end, and Gao et al.'s RL form d(alpha - beta log d) fitted to
its gold points with the distance where that form peaks, d* = exp(alpha / beta - 1).
"""

import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tyro  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from best_of_n import fit_gao  # noqa: E402
from overoptimization import mean_std, ppo_points, runs  # noqa: E402


@dataclass
class Args:
    root: str = "runs/overoptimization"
    """the folder benchmark/overoptimization.sh wrote (its labels/, reward/ and bon_<seed>.json)"""
    out: str = "docs/images/turn_down.png"
    """the plot; the table goes to the same name with .md, the points and figures to .json"""
    bin_updates: int = 4
    """PPO updates averaged into one point"""
    drop: float = 0.05
    """a run turned down when its gold at the end is this far below its peak (about 2.5 standard errors of a point)"""


def accuracy(run: Path) -> float:
    """Held-out accuracy of a train_reward.py run at its end."""
    return json.loads((run / "summary.json").read_text())["test/accuracy/after"]


def run_figures(points: list) -> dict:
    """The turn-down figures of one run's (kl, proxy, gold) points (scores already relative to the initial policy)."""
    peak = max(range(len(points)), key=lambda i: points[i][2])
    alpha, beta = fit_gao([math.sqrt(p[0]) for p in points if p[0] > 1e-6], [p[2] for p in points if p[0] > 1e-6], "rl")
    return {"kl_end": points[-1][0], "gold_peak": points[peak][2], "d_at_peak": math.sqrt(max(points[peak][0], 0)),
            "gold_end": points[-1][2], "drop": points[peak][2] - points[-1][2], "proxy_end": points[-1][1],
            "proxy_gain_after_peak": points[-1][1] - points[peak][1], "alpha": alpha, "beta": beta,
            "d_star": math.exp(alpha / beta - 1) if beta > 0 and alpha / beta < 50 else math.inf}


def main(a: Args):
    root = Path(a.root)
    ppo = {key: m for key, m in runs(root / "labels").items() if key[0].startswith("ppo_nokl_")}  # not the reward runs
    if not ppo:
        sys.exit(f"error: {root}/labels: no finished runs (run PARTS=labels bash benchmark/overoptimization.sh first)")
    reward_runs = {**{(e, s): p for p in (root / "labels").glob("reward_*__*__*") for e, s, _ in [p.name.split("__")]},
                   **{("reward_2048", s): p for p in (root / "reward").glob("reward__*__*") for _, s,
                      _ in [p.name.split("__")]}}
    curves, figures, accs = {}, {}, {}
    for (exp, seed), metrics in sorted(ppo.items(), key=lambda kv: (int(kv[0][0].split("_")[-1]), kv[0][1])):
        n = int(exp.split("_")[-1])
        gold0 = json.loads((root / f"bon_{seed}.json").read_text())["rows"][0]["gold"]
        pts = [(k, p, g - gold0) for k, p, g in ppo_points(metrics, a.bin_updates)]
        curves.setdefault(n, {})[seed] = pts
        figures.setdefault(n, {})[seed] = run_figures(pts)
        accs.setdefault(n, {})[seed] = accuracy(reward_runs[(f"reward_{n}", str(seed))])

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = dict(zip(sorted(curves), ["tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple"]))
    for ax, index, name in ((axes[0], 2, "gold (VADER) - initial"), (axes[1], 1, "proxy (that reward model)")):
        for n, per_seed in sorted(curves.items()):
            for i, (seed, pts) in enumerate(sorted(per_seed.items())):
                ax.plot([math.sqrt(max(p[0], 0)) for p in pts], [p[index] for p in pts], "-o", ms=3, alpha=0.7,
                        color=colors[n],
                        label=f"{n} labels (accuracy {statistics.mean(accs[n].values()):.3f})" if i == 0 else None)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("d = sqrt(KL(policy || initial policy))  [nats^0.5]")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    seeds = len(next(iter(curves.values())))
    fig.suptitle(f"PPO without a KL penalty against reward models trained on fewer labels ({seeds} "
                 f"seed{'s' * (seeds > 1)} "
                 "each, 5,120 episodes)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)

    lines = ["| labels | reward model held-out accuracy | KL at the end | peak gold (at d) | gold at the end | gold "
             "drop from the peak | runs that turned down | proxy at the end (gain after the gold peak) | RL fit alpha, "
             "beta | fitted peak d* |", "|---" * 10 + "|"]
    unsigned = lambda values: mean_std(values).replace("+", "")  # accuracies, KLs, distances
    for n, per_seed in sorted(figures.items()):
        f = lambda key: [x[key] for x in per_seed.values()]
        d_star = [x for x in f("d_star") if math.isfinite(x)]
        peaked = "" if len(d_star) == len(per_seed) else f" ({len(d_star)} of {len(per_seed)} peak)"
        lines.append(f"| {n} | {unsigned(list(accs[n].values()))} | {unsigned(f('kl_end'))} | "
                     f"{mean_std(f('gold_peak'))} "
                     f"(d {unsigned(f('d_at_peak'))}) | {mean_std(f('gold_end'))} | {mean_std(f('drop'))} | "
                     f"{sum(x > a.drop for x in f('drop'))} of {len(per_seed)} | {mean_std(f('proxy_end'))} "
                     f"({mean_std(f('proxy_gain_after_peak'))}) | {mean_std(f('alpha'))}, {mean_std(f('beta'))} | "
                     f"{unsigned(d_star) if d_star else 'none'}{peaked} |")
    table = "\n".join(lines)
    Path(a.out).with_suffix(".md").write_text(table + "\n")
    Path(a.out).with_suffix(".json").write_text(json.dumps(
        {"curves": {n: {str(s): p for s, p in v.items()} for n, v in curves.items()},
         "figures": {n: {str(s): x for s, x in v.items()} for n, v in figures.items()},
         "accuracy": {n: {str(s): x for s, x in v.items()} for n, v in accs.items()}}, indent=1))
    print(table)
    print(f"plot: {a.out}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
